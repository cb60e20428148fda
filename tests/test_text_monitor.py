"""callbacks.text_replication.TextReplicationMonitor: per-group scalars through Lightning, scores equal
to an independent UNet hook, a score-only mode that searches nothing, and 2 DDP processes equal to 1."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

import callbacks.replication as replication_module
from callbacks.text_replication import PAIRS_FILE, TEXT_HISTORY_FILE, TextReplicationMonitor
from lit.memorization import noise_difference_norm
from models.descriptor_config import DescriptorConfig
from models.text_diffusion import TextDiffusionModule
from tests.text_standins import TINY_TEXT, scenes

REPO = Path(__file__).resolve().parents[1]


def _monitor(**options: object) -> TextReplicationMonitor:
    return TextReplicationMonitor(descriptor=DescriptorConfig(name="pixel"), every_n_steps=2, num_samples=4,
                                  sample_steps=3, guidance_scale=3.0, thresholds=[0.5, 0.9], seed=0, **options)


def _fit(root: Path, monitor: TextReplicationMonitor, steps: int = 2) -> tuple[pl.Trainer, TextDiffusionModule]:
    pl.seed_everything(0)
    module = TextDiffusionModule(**TINY_TEXT)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=root, callbacks=[monitor],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=scenes(count=8, batch_size=4))
    return trainer, module


def test_monitor_logs_both_groups_and_scores_equal_a_unet_hook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monitor = _monitor()
    trainer, module = _fit(tmp_path, monitor)
    assert [row["step"] for row in monitor.history] == [0, 2]
    metrics = trainer.callback_metrics
    for name in ("replication/duplicated/rate@0.5", "replication/unique/own_share", "replication/own_share",
                 "replication/duplicated/top1_p95", "memorization/duplicated/score_mean",
                 "memorization/unique/score_mean", "memorization/auc_duplicated", "memorization/auc_copied@0.5"):
        assert name in metrics, name
    assert monitor.duplicated.tolist().count(True) == 2  # half of the pairs from the duplicated images
    log_dir = Path(trainer.log_dir)
    pairs = list(csv.DictReader((log_dir / PAIRS_FILE).open()))
    assert [row["group"] for row in pairs].count("duplicated") == 2 and pairs[0]["seed"] == "0"
    history = list(csv.DictReader((log_dir / TEXT_HISTORY_FILE).open()))
    assert [row["step"] for row in history] == ["0", "2"]
    printed = capsys.readouterr().out
    assert "Memorization of training captions: 2 duplicated and 2 unique captions" in printed and "own dup" in printed

    # the monitor's last scores against an independent hook on the same pipeline, same pairs and seeds
    pipeline = module.pipeline()
    recorded: list[torch.Tensor] = []
    def hook(unet: torch.nn.Module, args: tuple, output: object) -> None:
        uncond, cond = output[0].chunk(2) if isinstance(output, tuple) else output.sample.chunk(2)
        recorded.append(noise_difference_norm(cond, uncond))
    handle = pipeline.unet.register_forward_hook(hook)
    try:
        pipeline(prompt=monitor.captions, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                 generator=[torch.Generator().manual_seed(s) for s in monitor.seeds])
    finally:
        handle.remove()
    expected = torch.stack(recorded).mean(dim=0)
    got = torch.tensor([monitor._scores[p][0] for p in range(4)])
    assert torch.allclose(got, expected, rtol=1e-5)
    dup = monitor.duplicated
    assert monitor.history[-1]["memorization/duplicated/score_mean"] == pytest.approx(float(expected[dup].mean()), rel=1e-5)


def test_score_only_searches_nothing_and_agrees_with_the_full_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = _monitor()
    _fit(tmp_path / "full", full)
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the score-only monitor searched or embedded")
    monkeypatch.setattr(replication_module, "top_matches", refuse)
    monkeypatch.setattr(replication_module, "embed_dataset", refuse)
    only = _monitor(score_only=True)
    trainer, _ = _fit(tmp_path / "only", only)
    assert only.descriptor is None and only.train_features is None
    assert [row["step"] for row in only.history] == [0, 2]
    for row_full, row_only in zip(full.history, only.history):
        assert not any(key.startswith(("duplicated/", "unique/", "rate@")) for key in row_only)
        for key in ("memorization/duplicated/score_mean", "memorization/unique/score_mean", "memorization/auc_duplicated"):
            assert row_only[key] == pytest.approx(row_full[key], rel=1e-6), key
    assert "memorization/auc_duplicated" in trainer.callback_metrics


def test_guidance_must_be_above_one() -> None:
    with pytest.raises(ValueError, match="guidance_scale must be > 1"):
        TextReplicationMonitor(descriptor=DescriptorConfig(name="pixel"), guidance_scale=1.0)


def _config(root: Path, devices: int) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                    "max_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "enable_checkpointing": False, "default_root_dir": str(root),
                    "callbacks": [{"class_path": "callbacks.text_replication.TextReplicationMonitor",
                                   "init_args": {"descriptor": {"name": "pixel"}, "every_n_steps": 5, "num_samples": 6,
                                                 "sample_steps": 3, "guidance_scale": 3.0, "check_at_end": False}}]},
        "model": {"class_path": "models.text_diffusion.TextDiffusionModule", "init_args": TINY_TEXT},
        "data": {"class_path": "datamodules.captioned.CaptionedImageDataModule",
                 "init_args": {"procedural": 8, "resolution": 16, "batch_size": 2, "dup_fraction": 0.25, "dup_weight": 2.0}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_ddp_processes_log_what_one_process_logs(tmp_path: Path) -> None:
    """The check before training (identical weights on both ranks): each rank samples half the pairs;
    the gathered scores and statistics equal one process's."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = {}
    for devices in (1, 2):
        command = [sys.executable, "-m", "lit.commands.cli", "fit", "-c", str(_config(tmp_path / f"d{devices}", devices))]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        history = next((tmp_path / f"d{devices}").rglob(TEXT_HISTORY_FILE))
        rows[devices] = list(csv.DictReader(history.open()))
    assert [row["step"] for row in rows[1]] == [row["step"] for row in rows[2]] == ["0"]
    one, two = rows[1][0], rows[2][0]
    assert one.keys() == two.keys()
    for key in one:
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5, abs=1e-6, nan_ok=True), key
    assert float(one["memorization/score_mean"]) > 0
