"""One name, one number: the ReplicationMonitor's check and ``lit scan`` over the same generations and
training images, with the same descriptor and options, report the same replication rates, top-1
summary, self-similarity baseline and duplicate counts (both call :mod:`lit.replication`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from callbacks.replication import ReplicationMonitor
from datamodules.images import ImageFolderTrainData
from datamodules.procedural import ProceduralScenes
from lit.commands.scan.command import main as scan
from lit.replication import stat_names
from tests.test_replication_monitor import RecordingLogger

SIZE = 32  # the pixel descriptor's input size: both paths embed the images as they are
THRESHOLDS = [0.5, 0.8, 0.9, 0.95]


def _quantized(image: torch.Tensor) -> torch.Tensor:
    """An image whose values survive a PNG round trip exactly (k / 255)."""
    return (image * 255).round() / 255


def _save(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """14 training images (image 5 duplicates image 2, images 9-11 are three copies of image 8, image 13
    is image 4 mirrored) and 7 generations (two copies, a mirrored copy, a blend, three new scenes)."""
    root = tmp_path_factory.mktemp("monitor_vs_scan")
    scenes = ProceduralScenes(14, SIZE, seed=31)
    train = [_quantized(scenes[i]["image"]) for i in range(14)]
    train[5] = train[2].clone()
    for i in (9, 10, 11):
        train[i] = train[8].clone()
    train[13] = train[4].flip(-1)
    for i, image in enumerate(train):
        _save(image, root / "train" / f"t{i:02d}.png")
    new = ProceduralScenes(3, SIZE, seed=32)
    gens = [train[0], train[8], train[6].flip(-1), _quantized(0.7 * train[3] + 0.3 * new[0]["image"]),
            *[_quantized(new[i]["image"]) for i in range(3)]]
    for i, image in enumerate(gens):
        _save(image, root / "gen" / f"g{i:02d}.png")
    return root, torch.stack(gens)


class FixedSamples(pl.LightningModule):
    """A stand-in generator: ``sample(seeds)`` returns the fixed generations (seed s -> image s)."""

    def __init__(self, generations: torch.Tensor) -> None:
        super().__init__()
        self.generations = generations
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.weight ** 2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, seeds: list[int], steps: int | None = None, sampler: str | None = None,
               batch_size: int | None = None) -> torch.Tensor:
        return self.generations[torch.tensor(seeds, dtype=torch.long)]


@pytest.mark.parametrize("match_mirrors", [False, True], ids=["plain", "mirror-aware"])
def test_monitor_and_scan_report_the_same_numbers(images: tuple[Path, torch.Tensor], tmp_path: Path,
                                                  match_mirrors: bool) -> None:
    root, generations = images
    logger = RecordingLogger()
    watch = ReplicationMonitor(match_mirrors=match_mirrors, num_samples=len(generations), top_k=3,
                               thresholds=THRESHOLDS, every_n_steps=100, check_at_end=False, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[watch],
                         default_root_dir=tmp_path)
    data = ImageFolderTrainData(root=str(root / "train"), resolution=SIZE, batch_size=4, random_flip=False)
    trainer.fit(FixedSamples(generations), datamodule=data)
    assert watch.checked_steps() == [0]
    logged = next(metrics for step, metrics in logger.calls if step == 0 and "replication/rate@0.5" in metrics)

    out = tmp_path / "scan"
    scan(["--generations", str(root / "gen"), "--training", str(root / "train"), "--out", str(out),
          "--k", "3", "--thresholds", json.dumps(THRESHOLDS), "--match_mirrors", str(match_mirrors).lower(),
          "--dtype", "float32", "--device", "cpu", "--progress", "false", "--report_rows", "0"])
    summary = json.loads((out / "summary.json").read_text())

    assert summary["match_mirrors"] is match_mirrors
    assert summary["generations"]["count"] == 7 and summary["training"]["count"] == 14
    assert summary["baseline"]["exact"] is True and summary["baseline"]["label"] == "exact: all 14 training images"
    for prefix, scan_stats in (("replication", summary["top1"]), ("replication_baseline", summary["baseline"])):
        scan_values = [*scan_stats["rates"].values(), *(scan_stats[s] for s in ("mean", "median", "p95", "max"))]
        for name, value in zip(stat_names(THRESHOLDS, f"{prefix}/"), scan_values):
            assert logged[name] == pytest.approx(value, abs=1e-6), name
    assert summary["top1"]["rates"]["0.95"] >= (3 if match_mirrors else 2) / 7  # the copies (and the mirrored one)
    assert summary["baseline"]["max"] == pytest.approx(1.0, abs=1e-6)

    duplicates = summary["duplicates"]
    assert duplicates["exhaustive"] is True and duplicates["random_sample"]["exact"] is True
    mine = watch.latest["duplicates"]
    assert mine["threshold"] == duplicates["threshold"] == 0.95
    for group in ("top_matches", "random_training"):
        for key in ("count", "max"):
            assert mine[group][key] == duplicates[group][key], (group, key)
        for key in ("mean", "median", "share_with_duplicates"):
            assert mine[group][key] == pytest.approx(duplicates[group][key], abs=1e-12), (group, key)
    assert logged["replication/top_match_duplicates_mean"] == pytest.approx(duplicates["top_matches"]["mean"])
    assert logged["replication_baseline/duplicates_share"] == pytest.approx(
        duplicates["random_training"]["share_with_duplicates"])
    # exhaustive counts: images 8-11 are one group of four (3 duplicates each), however small k is;
    # mirror-aware, images 4 and 13 are duplicates of each other too
    expected = [1, 1, 3, 3, 3, 3] + ([1, 1] if match_mirrors else [])
    assert sorted(int(c) for c in watch.training_duplicates if c > 0) == sorted(expected)
    assert duplicates["random_training"]["max"] == 3
