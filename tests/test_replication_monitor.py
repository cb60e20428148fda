"""callbacks.replication.ReplicationMonitor: what it logs, that its numbers are right,
that resume continues the history, and that 2 DDP processes give the 1-process numbers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.loggers.logger import Logger

from callbacks.replication import HISTORY_FILE, SUMMARY_FILE, ReplicationMonitor
from datamodules.images import ProceduralTrainData
from lit.commands.lightning_cli import LitCLI
from models.ddpm import DDPMModule

REPO = Path(__file__).resolve().parents[1]
TINY = dict(resolution=16, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            sample_steps=3, warmup_steps=2, learning_rate=1e-3)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))


def monitor(**overrides: Any) -> ReplicationMonitor:
    return ReplicationMonitor(**{"num_samples": 5, "top_k": 2, "num_copies_shown": 3, "verbose": False, **overrides})


def fit(tmp_path: Path, callbacks: list[pl.Callback], max_steps: int, ckpt_path: str | None = None,
        loggers: list[Logger] | None = None) -> tuple[pl.Trainer, DDPMModule]:
    pl.seed_everything(0)
    model = DDPMModule(**TINY)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
                         logger=loggers or False,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(model, datamodule=ProceduralTrainData(num_images=7, resolution=16, batch_size=4), ckpt_path=ckpt_path)
    return trainer, model


def test_logs_expected_keys_and_files(tmp_path: Path) -> None:
    recorder = RecordingLogger()
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    watch = monitor(every_n_epochs=1)
    trainer, _ = fit(tmp_path, [watch], max_steps=3, loggers=[tensorboard, recorder])
    # 7 images / batch 4 = 2 steps per epoch: checks at start, after epoch 1, and at the end (step 3)
    assert watch.checked_steps() == [0, 2, 3]
    logged = {step: metrics for step, metrics in recorder.calls if "replication/rate@0.5" in metrics}
    assert sorted(logged) == [0, 2, 3]
    expected = {f"replication/rate@{t}" for t in ("0.5", "0.8", "0.9", "0.95")} | {
        f"replication/top1_{s}" for s in ("mean", "median", "p95", "max")}
    expected |= {k.replace("replication/", "replication_baseline/") for k in expected}
    expected |= {f"replication_time/{p}" for p in ("reference", "sampling", "embedding", "search", "logging")}
    assert expected <= set(logged[3])
    log_dir = Path(tensorboard.log_dir)
    history = list(csv.DictReader((log_dir / HISTORY_FILE).open()))
    assert [row["step"] for row in history] == ["0", "2", "3", "baseline"]
    assert (log_dir / SUMMARY_FILE).stat().st_size > 10_000
    assert (log_dir / "replication" / "scores_step_0000003.csv").is_file()
    assert (log_dir / "training_subset.tsv").read_text().count("procedural://") == 7

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert {"replication/top1_generations", "replication_baseline/top1_training"} <= set(events.Tags()["histograms"])
    assert {"replication/similarity_histogram", "replication/top_copies"} <= set(events.Tags()["images"])
    assert trainer.global_step == 3


def test_numbers_match_a_hand_computation(tmp_path: Path) -> None:
    """Top-1 scores = max over training images of the pixel descriptor's cosine (mean-centred pixels)."""
    watch = monitor(every_n_steps=2, thresholds=[0.1, 0.3], match_mirrors=True)
    trainer, model = fit(tmp_path, [watch], max_steps=2)
    data = ProceduralTrainData(num_images=7, resolution=16)
    train = torch.stack([data.reference_dataset()[i]["image"] for i in range(7)])
    generated = model.sample(watch.seeds, steps=None)

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x.double(), size=32, mode="bilinear", align_corners=False)
        flat = x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
        return flat / flat.norm(dim=1, keepdim=True)

    mirrored = torch.flip(train, dims=[-1])  # match_mirrors: a training image also matches as its mirror
    sims = torch.maximum(embed(generated) @ embed(train).T, embed(generated) @ embed(mirrored).T)
    top1 = sims.max(dim=1).values
    assert torch.allclose(watch.latest["top1"].double(), top1, atol=1e-4)
    row = watch.history[-1]
    assert row["rate@0.3"] == pytest.approx(float((top1 > 0.3).double().mean()))
    assert row["top1_median"] == pytest.approx(float(top1.median()), abs=1e-4)  # 5 values: true median
    base = torch.maximum(embed(train) @ embed(train).T, embed(train) @ embed(mirrored).T)
    base.fill_diagonal_(-2.0)
    assert torch.allclose(watch.baseline_scores.double(), base.max(dim=1).values, atol=1e-4)

    plain = monitor(every_n_steps=2, match_mirrors=False)
    fit(tmp_path, [plain], max_steps=2)
    direct = (embed(generated) @ embed(train).T).max(dim=1).values
    assert torch.allclose(plain.latest["top1"].double(), direct, atol=1e-4)


def test_resume_continues_history_without_gap(tmp_path: Path) -> None:
    class Crash(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 7:
                raise RuntimeError("killed")

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    killed = monitor(every_n_steps=2)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path, [killed, Crash(), checkpoints], max_steps=10)
    assert killed.checked_steps() == [0, 2, 4, 6]  # step 6 came after the last checkpoint (step 4)
    resumed = monitor(every_n_steps=2)
    checkpoint = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    fit(tmp_path, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_steps=10, ckpt_path=str(checkpoint))
    assert resumed.checked_steps() == [0, 2, 4, 6, 8, 10]
    assert resumed.history[:3] == killed.history[:3]  # restored from the checkpoint, not recomputed


def _write_config(tmp_path: Path, pretrained: Path, name: str) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 1, "enable_progress_bar": False,
            "enable_checkpointing": False, "enable_model_summary": False,
            "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": name, "version": 0}},
            "callbacks": [{"class_path": "callbacks.replication.ReplicationMonitor",
                           "init_args": {"num_samples": 5, "top_k": 2, "every_n_steps": 100, "check_at_end": False,
                                         "verbose": False}}],
        },
        "model": {"class_path": "models.ddpm.DDPMModule", "init_args": {**TINY, "pretrained": str(pretrained)}},
        "data": {"class_path": "datamodules.images.ProceduralTrainData",
                 "init_args": {"num_images": 7, "resolution": 16, "batch_size": 2}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _scores(tmp_path: Path, name: str) -> list[list[float]]:
    with (tmp_path / name / "version_0" / "replication" / "scores_step_0000000.csv").open() as handle:
        return [[float(v) for v in row.values()] for row in csv.DictReader(handle)]


def test_ddp_two_processes_give_the_one_process_numbers(tmp_path: Path) -> None:
    """The check before the first optimizer step, from the same (pretrained) weights: per-seed
    top-1 scores and training matches identical for 1 and 2 processes (5 seeds, 7 images: uneven)."""
    torch.manual_seed(3)
    DDPMModule(**TINY).unet.save_pretrained(tmp_path / "unet")
    LitCLI(args=["fit", "-c", str(_write_config(tmp_path, tmp_path / "unet", "one"))])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lit.commands.cli", "fit", "-c", str(_write_config(tmp_path, tmp_path / "unet", "two")),
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _scores(tmp_path, "one"), _scores(tmp_path, "two")
    assert len(one) == len(two) == 5
    assert [row[0] for row in one] == [row[0] for row in two] == [0, 1, 2, 3, 4]  # seeds
    assert torch.allclose(torch.tensor(one), torch.tensor(two), atol=1e-5)
    first = {name: list(csv.DictReader((tmp_path / name / "version_0" / HISTORY_FILE).open()))[0] for name in ("one", "two")}
    for key in first["one"]:
        assert float(first["one"][key]) == pytest.approx(float(first["two"][key]), abs=1e-5), key


@pytest.mark.parametrize("cadence", ["every_n_steps", "every_n_epochs"])
def test_model_checkpoint_monitors_the_replication_rate(tmp_path: Path, cadence: str) -> None:
    """The scalars reach trainer.callback_metrics through pl_module.log: ModelCheckpoint finds
    replication/rate@0.5 and saves, whether the checks run per step or per epoch."""
    watch = monitor(**{cadence: 1 if cadence == "every_n_epochs" else 2}, thresholds=[0.25, 0.5])
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="replication/rate@0.5", mode="max",
                                  save_top_k=1, filename="{step}-{replication/rate@0.5:.3f}",
                                  auto_insert_metric_name=False,
                                  **({"every_n_train_steps": 2} if cadence == "every_n_steps" else {}))
    trainer, _ = fit(tmp_path, [watch, checkpoints], max_steps=4)
    assert watch.checked_steps() == [0, 2, 4]
    assert checkpoints.best_model_path and Path(checkpoints.best_model_path).is_file()
    best = max(row["rate@0.5"] for row in watch.history if row["step"] > 0)  # no checkpoint at step 0
    assert float(checkpoints.best_model_score) == pytest.approx(best)
    last = watch.history[-1]
    for name in ("rate@0.25", "rate@0.5", "top1_mean", "top1_max"):
        assert float(trainer.callback_metrics[f"replication/{name}"]) == pytest.approx(last[name], abs=1e-6), name
    assert float(trainer.callback_metrics["replication_baseline/top1_mean"]) == pytest.approx(
        watch.baseline.as_dict()["top1_mean"], abs=1e-6)


def test_descriptor_is_recorded_and_random_init_is_named(tmp_path: Path) -> None:
    import json

    from models.descriptor_config import DescriptorConfig

    watch = monitor(every_n_steps=2, descriptor=DescriptorConfig(name="pixel", random_init=True, input_size=16))
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer, _ = fit(tmp_path, [watch], max_steps=1, loggers=[tensorboard])
    recorded = json.loads((Path(tensorboard.log_dir) / "replication" / "descriptor.json").read_text())
    config = DescriptorConfig(name="pixel", random_init=True, input_size=16)
    assert recorded["descriptor"] == config.record(config.build())
    assert "pixel (random init) descriptor" in watch.summary_text(trainer)


def test_sampled_baseline_is_labelled_in_every_output(tmp_path: Path) -> None:
    """baseline_sample: the exact baseline's values on the sampled rows, logged under
    replication_baseline_sampled/, and said so in the CSV, the TensorBoard text, the record and the table."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit.replication import baseline_rows

    recorder = RecordingLogger()
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    exact = monitor(every_n_steps=2, check_at_end=False)
    fit(tmp_path, [exact], max_steps=1)
    watch = monitor(every_n_steps=2, baseline_sample=4)
    trainer, _ = fit(tmp_path, [watch], max_steps=2, loggers=[tensorboard, recorder])
    rows = baseline_rows(7, 4, seed=0).rows
    assert torch.equal(watch.baseline_rows.rows, rows)
    assert torch.allclose(watch.baseline_scores, exact.baseline_scores[rows])
    logged = recorder.calls[-1][1]
    assert "replication_baseline_sampled/top1_mean" in logged
    assert not any(key.startswith("replication_baseline/") for key in logged)
    assert "replication_baseline_sampled/top1_mean" in trainer.callback_metrics
    log_dir = Path(tensorboard.log_dir)
    history = list(csv.DictReader((log_dir / HISTORY_FILE).open()))
    assert history[-1]["step"] == "baseline (sampled: 4 of 7 training images (seed 0))"
    assert history[-1]["num_samples"] == "4"
    record = json.loads((log_dir / "replication" / "descriptor.json").read_text())
    assert record["baseline"]["exact"] is False and record["baseline"]["sample_size"] == 4
    assert record["match_mirrors"] is False
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "histograms": 0}).Reload()
    text = events.Tensors("replication/settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "sampled: 4 of 7 training images (seed 0)" in text and "no mirror matching" in text
    assert "replication_baseline_sampled/top1_training" in events.Tags()["histograms"]
    assert "sampled: 4 of 7 training images (seed 0)" in watch.summary_text(trainer)



def test_every_embedding_of_a_check_uses_the_monitors_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision`` reaches the embedding of a check (``32`` keeps a GPU check in float32; the
    training set and its mirrors take the same options, ``_embed_options``)."""
    import callbacks.replication as replication

    seen: list[str] = []
    real = replication.embed_dataset

    def spy(model: Any, dataset: Any, **options: Any) -> Any:
        seen.append(options["precision"])
        return real(model, dataset, **options)

    monkeypatch.setattr(replication, "embed_dataset", spy)
    images = torch.rand(4, 3, 8, 8)
    features = {}
    for precision in ("32", "bf16"):
        monitor = ReplicationMonitor(precision=precision, num_samples=4, verbose=False)
        monitor.descriptor = monitor.descriptor_config.build()
        monitor.seeds = list(range(4))
        trainer = type("T", (), {"global_rank": 0, "world_size": 1,
                                 "strategy": type("S", (), {"root_device": torch.device("cpu")})()})()
        module = type("M", (), {"device": torch.device("cpu")})()
        features[precision] = monitor._embed_generations(trainer, module, images, list(range(4)))
    assert seen == ["32", "bf16"]
    assert features["32"].dtype == features["bf16"].dtype == torch.float32  # stored in float32 either way
    assert torch.allclose(features["32"], features["bf16"], atol=0.05)
