"""Exact resume: an interrupted-and-resumed DDPM fit reproduces the uninterrupted one.

Pure parts: the resumable sampler (order a function of seed and epoch; DDP shards as
``torch.utils.data.DistributedSampler``; resume continues the order), per-draw augmentation,
the epoch-end checkpoint repair. End to end: a tiny fit killed after its last checkpoint and
resumed from an epoch-end and from a mid-epoch checkpoint gives bit-identical weights, EMA
weights and replication-monitor history on CPU, the same logged steps, no second checkpoint;
the same for 2 DDP processes resumed mid-epoch.
"""

from __future__ import annotations

import copy
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
from torch.utils.data import DistributedSampler

from callbacks.replication import ReplicationMonitor
from datamodules.images import ProceduralTrainData, TrainingImages
from datamodules.samplers import ResumableDataLoader, ResumableShuffleSampler, epoch_order
from lit.resume import close_finished_epoch
from lit.seeding import derive_seed
from models.ddpm import DDPMModule
from tests.test_replication_monitor import REPO, TINY, RecordingLogger

# --------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("length", [7, 8, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_like_distributed_sampler(length: int, world: int, drop_last: bool) -> None:
    """Unshuffled, every rank gets what torch's DistributedSampler gives it (padding and drop_last)."""
    data = list(range(length))
    for rank in range(world):
        ours = ResumableShuffleSampler(data, seed=0, num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        theirs = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        assert [i for i, _ in ours] == list(theirs)
        assert len(ours) == len(theirs)


def test_order_is_a_function_of_seed_and_epoch() -> None:
    data = list(range(11))
    one, two = ResumableShuffleSampler(data, seed=5), ResumableShuffleSampler(data, seed=5)
    orders = []
    for epoch in range(3):
        one.set_epoch(epoch)
        two.set_epoch(epoch)
        first = list(one)
        assert first == list(two) == list(one)  # same (seed, epoch): same items, same draw seeds
        assert sorted(i for i, _ in first) == data
        orders.append([i for i, _ in first])
    assert orders[0] != orders[1] != orders[2]
    other = ResumableShuffleSampler(data, seed=6)
    assert [i for i, _ in other] != orders[0]
    # ranks split the same epoch order: together they cover it once, each draw seed once
    shards = [list(ResumableShuffleSampler(data, seed=5, num_replicas=3, rank=r)) for r in range(3)]
    order = epoch_order(len(data), 5, 0)
    padded = order + order[:1]  # 11 items on 3 ranks: the first one again
    assert [s[k][0] for k in range(4) for s in shards] == padded
    seeds = [seed for s in shards for _, seed in s]
    assert len(set(seeds)) == 12 and seeds[0] == derive_seed(5, 0, 0)


def test_resume_continues_the_uninterrupted_order() -> None:
    data = list(range(10))
    straight = ResumableShuffleSampler(data, seed=3, num_replicas=2, rank=1)
    epochs = []
    for epoch in range(3):
        straight.set_epoch(epoch)
        epochs.append(list(straight))
    resumed = ResumableShuffleSampler(data, seed=3, num_replicas=2, rank=1)
    resumed.resume(1, 2)
    resumed.set_epoch(1)  # Lightning sets the same epoch again: the position is kept
    assert list(resumed) == epochs[1][2:]
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]  # the offset applied once
    rolled = ResumableShuffleSampler(data, seed=3, num_replicas=2, rank=1)
    rolled.resume(1, 5)  # the whole share of epoch 1 done: the next epoch, from its start
    assert rolled.epoch == 2 and list(rolled) == epochs[2]
    with pytest.raises(ValueError, match="rank"):
        ResumableShuffleSampler(data, num_replicas=2, rank=2)
    # the loader Lightning sees: its state is the trainer's position, loading it resumes the sampler
    class Rows(list):  # a dataset that returns the index it was asked for
        def __getitem__(self, key: Any) -> Any:
            return key[0]

    sampler = ResumableShuffleSampler(data, seed=3, num_replicas=2, rank=1)
    loader = ResumableDataLoader(Rows(data), batch_size=2, sampler=sampler, position=lambda: {"epoch": 1, "batches": 1})
    assert loader.state_dict() == {"epoch": 1, "batches": 1}
    loader.load_state_dict(loader.state_dict())
    assert [i for batch in loader for i in batch.tolist()] == [i for i, _ in epochs[1][2:]]


def test_augmentation_is_a_function_of_the_draw_seed() -> None:
    images = [torch.arange(3 * 20 * 24, dtype=torch.int64).reshape(3, 20, 24).remainder(256).to(torch.uint8)]
    train = TrainingImages(images, 16, augment=True)
    torch.manual_seed(0)
    first = train[(0, 1234)]["image"]
    torch.manual_seed(99)  # the global generator does not matter
    assert torch.equal(train[(0, 1234)]["image"], first)
    draws = {tuple(train[(0, seed)]["image"][0, :2, :2].flatten().tolist()) for seed in range(40)}
    flips = {bool(train[(0, seed)]["image"][0, 0, 0] > train[(0, seed)]["image"][0, 0, 1]) for seed in range(40)}
    assert len(draws) > 10 and flips == {True, False}  # many windows, both orientations
    window = images[0][:, 2:18, 5:21]
    candidates = [window.float() / 255, window.flip(-1).float() / 255]
    seed = next(s for s in range(10_000) if any(torch.equal(train[(0, s)]["image"], c) for c in candidates))
    assert any(torch.equal(train[(0, seed)]["image"], c) for c in candidates)  # a plain crop (+ flip) of the image


def test_close_finished_epoch() -> None:
    def progress(ready: int, started: int, processed: int, completed: int) -> dict[str, int]:
        return {"ready": ready, "started": started, "processed": processed, "completed": completed}

    saved_at_epoch_end = {"loops": {"fit_loop": {
        "epoch_progress": {"total": progress(2, 2, 2, 1), "current": progress(2, 2, 2, 1)},
        "epoch_loop.batch_progress": {"total": progress(8, 8, 8, 8), "current": progress(4, 4, 4, 4),
                                      "is_last_batch": True},
        "epoch_loop.scheduler_progress": {"total": {"ready": 8, "completed": 8},
                                          "current": {"ready": 4, "completed": 4}},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
            "step": {"total": {"ready": 8, "completed": 8}, "current": {"ready": 4, "completed": 4}}}},
    }}}
    fixed = copy.deepcopy(saved_at_epoch_end)
    assert close_finished_epoch(fixed)
    fit = fixed["loops"]["fit_loop"]
    assert fit["epoch_progress"]["current"] == fit["epoch_progress"]["total"] == progress(2, 2, 2, 2)
    assert fit["epoch_loop.batch_progress"]["current"] == progress(0, 0, 0, 0)
    assert fit["epoch_loop.batch_progress"]["total"] == progress(8, 8, 8, 8)  # totals kept
    assert not fit["epoch_loop.batch_progress"]["is_last_batch"]
    optimizer = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    assert optimizer["step"]["current"] == {"ready": 0, "completed": 0}
    again = copy.deepcopy(fixed)
    assert not close_finished_epoch(again) and again == fixed  # idempotent
    mid_epoch = copy.deepcopy(saved_at_epoch_end)
    mid_epoch["loops"]["fit_loop"]["epoch_progress"] = {"total": progress(2, 2, 1, 1), "current": progress(2, 2, 1, 1)}
    unchanged = copy.deepcopy(mid_epoch)
    assert not close_finished_epoch(mid_epoch) and mid_epoch == unchanged
    assert not close_finished_epoch({"state_dict": {}})


# --------------------------------------------------------------------------- end to end


class Kill(pl.Callback):
    """Raise after the given optimizer step: the process 'dies' after its last checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


class Batches(pl.Callback):
    """The (global step, dataset rows) of every batch trained."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.seen.append((trainer.global_step, batch["index"].tolist()))


def _fit(root: Path, folder: str, max_steps: int, extra: list[pl.Callback],
         ckpt_path: Path | None = None) -> dict[str, Any]:
    pl.seed_everything(0)
    model = DDPMModule(**{**TINY, "sample_steps": 2})
    monitor = ReplicationMonitor(num_samples=4, top_k=2, num_copies_shown=2, every_n_epochs=2, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=root / folder, every_n_epochs=2, save_last=True, save_top_k=-1)
    mid_epoch = ModelCheckpoint(dirpath=root / folder / "mid", every_n_train_steps=5, save_top_k=-1)
    batches, logger = Batches(), RecordingLogger()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, log_every_n_steps=2, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[monitor, checkpoints, mid_epoch, batches, *extra])
    # 7 images, batch 2: 4 batches an epoch (the last one short); 20 px stored, 16 px random crops
    data = ProceduralTrainData(num_images=7, resolution=16, load_size=20, batch_size=2)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except RuntimeError as error:
        assert "killed" in str(error)
    return {"model": model, "monitor": monitor, "batches": batches.seen, "logged": logger.calls}


def _same_weights(a: DDPMModule, b: DDPMModule) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
            and all(torch.equal(x, y) for x, y in zip(a.ema.shadow_params, b.ema.shadow_params)))


def test_killed_and_resumed_fit_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    steps = 14
    straight = _fit(tmp_path, "straight", steps, [])
    killed = _fit(tmp_path, "killed", steps, [Kill(11)])
    # the killed run's checkpoints: every 2nd epoch's end (step 8; last.ckpt), every 5 steps (5, 10)
    assert sorted(p.name for p in (tmp_path / "killed").glob("*.ckpt")) == ["epoch=1-step=8.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (tmp_path / "killed" / "mid").glob("*.ckpt")) == [
        "epoch=1-step=5.ckpt", "epoch=2-step=10.ckpt"]
    assert torch.load(tmp_path / "killed" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert sorted(p.name for p in (tmp_path / "straight").glob("*.ckpt")) == [
        "epoch=1-step=8.ckpt", "epoch=3-step=14.ckpt", "last.ckpt"]
    reference = _by_step(straight["logged"])
    for name, checkpoint, first in (("epoch_end", tmp_path / "killed" / "last.ckpt", 8),
                                    ("mid_epoch", tmp_path / "killed" / "mid" / "epoch=2-step=10.ckpt", 10)):
        resumed = _fit(tmp_path, name, steps, [], ckpt_path=checkpoint)
        # no batch re-run or skipped: the resumed run trains exactly the uninterrupted run's remaining batches
        assert resumed["batches"] == [b for b in straight["batches"] if b[0] >= first], name
        assert _same_weights(resumed["model"], straight["model"]), name  # bit-exact on CPU, EMA included
        assert resumed["monitor"].history == straight["monitor"].history == resumed["monitor"].history[:3], name
        assert resumed["monitor"].checked_steps() == [0, 8, 14]  # every 2nd epoch (4 batches each) and at the end
        # every step after the checkpoint logged once (what was logged at its step came before
        # it was written), with the uninterrupted run's values
        logged = _by_step(resumed["logged"])
        assert min(logged) > first and sum(len(m) for m in logged.values()) == sum(len(m) for _, m in resumed["logged"])
        expected = {s: m for s, m in reference.items() if s > first}
        assert ({s: _reproducible(m) for s, m in logged.items()}
                == {s: _reproducible(m) for s, m in expected.items()}), name
        # no second checkpoint of an epoch already saved (the bug wrote epoch=1-step=9.ckpt)
        assert sorted(p.name for p in (tmp_path / name).glob("*.ckpt")) == ["epoch=3-step=14.ckpt", "last.ckpt"], name


def _by_step(calls: list[tuple[int | None, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Logged metrics merged per step (a key logged twice at one step would be lost: counted by the caller)."""
    merged: dict[int, dict[str, float]] = {}
    for step, metrics in calls:
        assert step is not None
        merged.setdefault(step, {}).update(metrics)
    return merged


def _reproducible(metrics: dict[str, float]) -> dict[str, float]:
    """All but wall-clock times."""
    return {k: v for k, v in metrics.items() if not k.startswith("replication_time/")}


def _ddp_config(tmp_path: Path) -> Path:
    """A tiny 2-process CPU fit: 13 images on 2 ranks (7 each, one padded), batch 2, random 16 px crops."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 15, "enable_progress_bar": False,
            "enable_model_summary": False, "logger": False,
            "callbacks": [
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 5, "save_top_k": -1,
                               "filename": "{step}"}},
                {"class_path": "callbacks.replication.ReplicationMonitor",
                 "init_args": {"num_samples": 3, "top_k": 1, "every_n_steps": 7, "verbose": False}}],
        },
        "model": {"class_path": "models.ddpm.DDPMModule", "init_args": {**TINY, "sample_steps": 2}},
        "data": {"class_path": "datamodules.images.ProceduralTrainData",
                 "init_args": {"num_images": 13, "resolution": 16, "load_size": 20, "batch_size": 2}},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ddp_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """Two processes: a fit resumed from its step-10 checkpoint (mid-epoch: each rank skips its own
    share of the epoch) ends with the weights, EMA and monitor history of the straight 2-process fit."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lit.commands.cli", "fit", "-c", str(_ddp_config(tmp_path))]
    straight = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    final = torch.load(tmp_path / "ckpt" / "step=15.ckpt", weights_only=False)
    (tmp_path / "ckpt" / "step=15.ckpt").rename(tmp_path / "straight.ckpt")
    resumed = subprocess.run([*command, "--ckpt_path", str(tmp_path / "ckpt" / "step=10.ckpt")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = torch.load(tmp_path / "ckpt" / "step=15.ckpt", weights_only=False)
    assert all(torch.equal(final["state_dict"][k], again["state_dict"][k]) for k in final["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(final["ema"]["shadow_params"], again["ema"]["shadow_params"]))
    history, history_again = ([state["history"] for key, state in checkpoint["callbacks"].items()
                               if key.startswith("ReplicationMonitor")] for checkpoint in (final, again))
    assert history == history_again
    assert [row["step"] for row in history[0]] == [0, 7, 14]  # the end-of-fit check comes after the last checkpoint
