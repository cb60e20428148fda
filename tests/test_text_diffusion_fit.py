"""TextDiffusionModule under ``lit fit``: a killed-and-resumed fit equals the uninterrupted one (bit-exact
on CPU, from an epoch-end and a mid-epoch checkpoint, mitigations on); 2 DDP processes train what 1
process trains on the same global batches; the pipeline written at the end of the fit and the one
``lit export`` writes from the last checkpoint are the same model and load for generation."""

from __future__ import annotations

import json
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

from lit.commands.cli import main as lit_main
from lit.commands.lightning_cli import LitCLI
from models.text_diffusion import TextDiffusionModule
from models.text_pipeline import PixelTextToImagePipeline, load_text_pipeline
from tests.test_resume import Kill
from tests.text_standins import TINY_TEXT, caption_of, scenes

REPO = Path(__file__).resolve().parents[1]
#: every draw the module makes is on: caption dropout, embedding noise and mixup
MITIGATED: dict[str, Any] = {**TINY_TEXT, "caption_dropout": 0.3, "embedding_noise": 0.1, "embedding_mixup": 1.0,
                             "ema_decay": 0.9}


def _fit(root: Path, folder: str, max_steps: int, extra: list[pl.Callback],
         ckpt_path: Path | None = None) -> TextDiffusionModule:
    pl.seed_everything(0, verbose=False)
    model = TextDiffusionModule(**MITIGATED)
    epoch_end = ModelCheckpoint(dirpath=root / folder, every_n_epochs=1, save_last=True, save_top_k=-1)
    mid_epoch = ModelCheckpoint(dirpath=root / folder / "mid", every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[epoch_end, mid_epoch, *extra])
    # 6 scenes, 2 of them drawn twice as often: 8 draws an epoch, 4 batches of 2
    try:
        trainer.fit(model, datamodule=scenes(6, random_flip=True, caption_replacement=0.3), ckpt_path=ckpt_path)
    except RuntimeError as error:
        assert "killed" in str(error)
    return model


def _same(a: TextDiffusionModule, b: TextDiffusionModule) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_killed_and_resumed_fit_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    steps = 10
    straight = _fit(tmp_path, "straight", steps, [])
    killed = _fit(tmp_path, "killed", steps, [Kill(7)])
    assert not _same(killed, straight)
    assert torch.load(tmp_path / "killed" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert (tmp_path / "killed" / "mid" / "epoch=1-step=6.ckpt").is_file()
    for name, checkpoint in (("epoch_end", tmp_path / "killed" / "last.ckpt"),
                             ("mid_epoch", tmp_path / "killed" / "mid" / "epoch=1-step=6.ckpt")):
        resumed = _fit(tmp_path, name, steps, [], ckpt_path=checkpoint)
        assert _same(resumed, straight), name  # UNet, EMA UNet and text encoder, bit-exact on CPU
        assert resumed.ema.optimization_step == straight.ema.optimization_step == steps
        assert resumed._run_seed == straight._run_seed


def _config(root: Path, devices: int, batch_size: int) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto", "max_steps": 4,
            "enable_progress_bar": False, "enable_model_summary": False, "logger": False, "default_root_dir": str(root),
            "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 4, "filename": "{step}"}},
                          {"class_path": "tests.text_standins.TrainingRecord", "init_args": {"folder": str(root / "record")}}],
        },
        "model": {"class_path": "models.text_diffusion.TextDiffusionModule",
                  "init_args": {**MITIGATED, "export_on_fit_end": "pipeline"}},
        "data": {"class_path": "datamodules.captioned.CaptionedImageDataModule",
                 "init_args": {"procedural": 6, "resolution": 16, "batch_size": batch_size, "dup_fraction": 0.34,
                               "dup_weight": 2.0, "random_flip": True}},
    }
    path = root / "fit.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def test_two_ddp_processes_train_what_one_process_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """6 scenes, 2 drawn twice as often (8 draws an epoch): 1 process with batch 4 and 2 processes with
    batch 2 see the same global batches (datamodules.captioned); with
    every mitigation on (mixup partners from the global batch), each step's loss is the mean of the two
    ranks' losses and the weights agree to float rounding (AdamW amplifies rounding where a gradient is ~0:
    the distance is measured against how far training moved the weights)."""
    LitCLI(args=["fit", "-c", str(_config(tmp_path / "one", devices=1, batch_size=4))])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lit.commands.cli", "fit", "-c", str(_config(tmp_path / "two", devices=2, batch_size=2))]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads((tmp_path / "one" / "record" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / "record" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [step for step, _ in losses] == [step for step, _ in ranks[0]] == [1, 2, 3, 4]
    for (_, loss), (_, first), (_, second) in zip(losses, *ranks):
        assert loss == pytest.approx((first + second) / 2, rel=1e-4)  # the same draws on the same global batch
    one, two = (torch.load(tmp_path / name / "ckpt" / "step=4.ckpt", weights_only=False) for name in ("one", "two"))
    assert one["state_dict"].keys() == two["state_dict"].keys()
    start = torch.load(tmp_path / "one" / "record" / "start.pt")
    assert all(torch.equal(start[k], v) for k, v in torch.load(tmp_path / "two" / "record" / "start.pt").items())
    for prefix in ("unet.", "ema_unet."):
        keys = [k for k in one["state_dict"] if k.startswith(prefix)]
        moved = _norm([one["state_dict"][k] - start[k.removeprefix(prefix)] for k in keys])
        apart = _norm([one["state_dict"][k] - two["state_dict"][k] for k in keys])
        assert moved > 1e-2 and apart < 1e-3 * moved, (prefix, apart, moved)
    text = [k for k in one["state_dict"] if k.startswith("text_encoder.")]
    assert text and all(torch.equal(one["state_dict"][k], two["state_dict"][k]) for k in text)  # built alike
    assert one["ema"]["optimization_step"] == two["ema"]["optimization_step"] == 4

    # the pipeline written at the end of the fit is the checkpoint's EMA model, as lit export writes it
    fit_end = tmp_path / "two" / "lit_runs" / "version_0" / "pipeline"
    exported = tmp_path / "exported"
    capsys.readouterr()
    lit_main(["export", "--ckpt_path", str(tmp_path / "two" / "ckpt" / "step=4.ckpt"), "--out", str(exported)])
    assert f"lit generate --pipeline {exported}" in capsys.readouterr().out
    first, second = load_text_pipeline(fit_end), load_text_pipeline(exported)
    assert isinstance(first, PixelTextToImagePipeline) and isinstance(second, PixelTextToImagePipeline)
    assert all(torch.equal(a, b) for a, b in zip(first.unet.state_dict().values(), second.unet.state_dict().values()))
    ema = {k.removeprefix("ema_unet."): v for k, v in two["state_dict"].items() if k.startswith("ema_unet.")}
    assert all(torch.equal(ema[k], v) for k, v in second.unet.state_dict().items())
    restored = TextDiffusionModule.load_from_checkpoint(tmp_path / "two" / "ckpt" / "step=4.ckpt")  # no datamodule
    kwargs = dict(prompt=[caption_of(2)], num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    images = [pipe(**kwargs, generator=[torch.Generator().manual_seed(9)]).images
              for pipe in (first, second, restored.pipeline())]
    assert torch.allclose(images[0], images[1], atol=1e-6) and torch.allclose(images[0], images[2], atol=1e-6)
    with pytest.raises(SystemExit) as exited:  # refused in one line: lit wrote it, no --overwrite
        lit_main(["export", "--ckpt_path", str(tmp_path / "two" / "ckpt" / "step=4.ckpt"), "--out", str(exported)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("pass --overwrite to replace it")


def test_the_text_encoder_is_built_from_the_datamodule_captions(tmp_path: Path) -> None:
    """From scratch without text_encoder: the tokenizer knows every word of the training captions,
    mitigated ones included (no unknown token inside any caption)."""
    data = scenes(6, caption_replacement=0.5, token_addition=0.5)
    model = TextDiffusionModule(**TINY_TEXT)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert model.tokenizer is not None and set(data.caption_words()) >= {"background", "a"}
    dataset = data.train_dataset()
    drawn = [dataset[(row, 0, seed)]["caption"] for row in range(6) for seed in range(5)]
    assert drawn and data.draws is not None
    unknown = model.tokenizer.unk_token_id
    for caption in [*data.draws.all_captions, *drawn]:
        ids = model.tokenizer(caption).input_ids
        assert unknown not in ids[1:-1], caption
