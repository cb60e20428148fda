"""callbacks.retrieval.RetrievalMetricsCallback: values against scikit-learn and against ``lit test``'s
evaluator, ModelCheckpoint / EarlyStopping on ``retrieval/mAP``, eval mode, the TensorBoard grid,
the LightningCLI config, and 2 DDP processes = 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.metrics import average_precision_score
from torch import nn

from callbacks.retrieval import GRID_TAG, ItemCache, RetrievalMetricsCallback, eval_mode
from datamodules.images import ProceduralTrainData
from datamodules.retrieval import FolderRetrievalDataModule, ProceduralRetrievalDataModule
from lit.commands.lightning_cli import LitCLI
from models.descriptor import Descriptor
from models.descriptor_config import DescriptorConfig
from models.registry import build_descriptor
from models.retrieval import RetrievalEvaluator
from tests.descriptor_standin import StandInDescriptorModule

REPO = Path(__file__).resolve().parents[1]
SMALL_SET = dict(num_queries=7, copies_per_query=2, num_distractors=9, image_size=32, batch_size=4)


class PixelModule(pl.LightningModule):
    """The ``pixel`` descriptor behind the callback's contract; one dummy parameter to train."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.pixel = build_descriptor("pixel")

    @property
    def descriptor(self) -> Descriptor:
        return self.pixel

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, module: pl.LightningModule, callbacks: list[pl.Callback], max_epochs: int = 1,
        logger: Any = False) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path, logger=logger,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(module, datamodule=ProceduralTrainData(num_images=4, resolution=16, batch_size=4))
    return trainer


def _patterned_images(root: Path) -> None:
    """Three classes of 3 noisy images around a shared coarse pattern (classes differ a little); widths differ."""
    rng = np.random.default_rng(0)
    common = rng.integers(80, 176, size=(4, 4, 3))
    for label in range(3):
        base = common + rng.integers(-25, 25, size=(4, 4, 3))
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            pattern = np.kron(base, np.ones((5, 7, 1)))[:20, : 20 + 4 * i]
            pixels = np.clip(pattern + rng.integers(-60, 60, size=pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_metrics_match_sklearn_on_a_hand_made_set(tmp_path: Path) -> None:
    """Folder set of differently sized files, each query in the gallery (excluded from its own ranking)."""
    _patterned_images(tmp_path / "data")
    datamodule = FolderRetrievalDataModule(root=str(tmp_path / "data"))
    callback = RetrievalMetricsCallback(datamodule, ks=[1, 2], batch_size=4, verbose=False)
    fit(tmp_path, PixelModule(), [callback])
    retrieval_set = datamodule.retrieval_set
    pixel = build_descriptor("pixel")

    def embed(dataset: Any) -> np.ndarray:
        with torch.no_grad():
            return np.stack([pixel(dataset[i]["image"][None])[0].double().numpy() for i in range(len(dataset))])

    queries, gallery = embed(retrieval_set.queries), embed(retrieval_set.gallery)
    aps, recall1, hit2, rr = [], [], [], []
    for q, positives in enumerate(retrieval_set.positives):
        scores = gallery @ queries[q]
        truth = np.zeros(len(gallery), dtype=bool)
        truth[positives] = True
        keep = np.arange(len(gallery)) != retrieval_set.query_in_gallery[q]
        scores, truth = scores[keep], truth[keep]
        aps.append(average_precision_score(truth, scores))
        ranked = truth[np.lexsort((np.arange(len(scores)), -scores))]
        recall1.append(ranked[:1].sum() / truth.sum())
        hit2.append(float(ranked[:2].any()))
        rr.append(1.0 / (1 + int(np.argmax(ranked))))
    expected = {"mAP": np.mean(aps), "recall@1": np.mean(recall1), "hit_rate@2": np.mean(hit2), "MRR": np.mean(rr)}
    assert 0.2 < expected["mAP"] < 1.0  # neither trivial nor perfect, so the comparison means something
    for name, value in expected.items():
        assert callback.last[name] == pytest.approx(value, abs=1e-9), name


def test_equals_the_lit_test_evaluator(tmp_path: Path) -> None:
    callback = RetrievalMetricsCallback(ProceduralRetrievalDataModule(**SMALL_SET), ks=[1, 5], batch_size=5,
                                        verbose=False)
    fit(tmp_path, PixelModule(), [callback])
    evaluator = RetrievalEvaluator(descriptor=DescriptorConfig("pixel"), ks=[1, 5], grid_queries=0)
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
               default_root_dir=tmp_path).test(evaluator, datamodule=ProceduralRetrievalDataModule(**SMALL_SET),
                                                verbose=False)
    assert set(evaluator.results) == set(callback.last)
    for name, value in evaluator.results.items():
        assert callback.last[name] == pytest.approx(value, abs=1e-6), name


def test_checkpoint_and_early_stopping_monitor_map(tmp_path: Path) -> None:
    """ModelCheckpoint keeps the best mAP; EarlyStopping (patience 1, unreachable min_delta) stops after 2 checks;
    a module with dropout leaves each check in train mode, and eval mode makes the checks repeatable."""
    pl.seed_everything(0)
    module = StandInDescriptorModule(lr=0.0)  # dropout in the backbone, weights fixed
    callback = RetrievalMetricsCallback(ProceduralRetrievalDataModule(**SMALL_SET), ks=[1], batch_size=8,
                                        verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="retrieval/mAP", mode="max", save_top_k=1)
    stopper = EarlyStopping(monitor="retrieval/mAP", mode="max", patience=1, min_delta=1.0)
    trainer = fit(tmp_path, module, [callback, checkpoint, stopper], max_epochs=5)
    assert [row["epoch"] for row in callback.history] == [0, 1]  # stopped by EarlyStopping
    assert callback.history[0]["mAP"] == callback.history[1]["mAP"]  # dropout off during checks
    assert module.training and module.backbone.head_drop.training  # train mode given back
    assert Path(checkpoint.best_model_path).is_file()
    assert float(checkpoint.best_model_score) == pytest.approx(callback.history[0]["mAP"], abs=1e-6)
    assert float(trainer.callback_metrics["retrieval/mAP"]) == pytest.approx(callback.last["mAP"], abs=1e-6)
    state = torch.load(checkpoint.best_model_path, weights_only=True)["callbacks"][callback.state_key]
    assert state["history"][0]["mAP"] == callback.history[0]["mAP"]


def test_eval_mode_restores_each_submodule() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2)))
    net.train()
    net[2][0].eval()  # a frozen part stays frozen
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[1].training and net[2].training and not net[2][0].training


class CountingImages(torch.utils.data.Dataset):
    """Four 2x2 images (48 bytes each); item 3 fails to load; counts loads per index."""

    def __init__(self) -> None:
        self.loads = [0] * 4

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.loads[index] += 1
        return {"image": None if index == 3 else torch.full((3, 2, 2), float(index)), "index": index, "mask": 0}


def test_item_cache_keeps_images_within_its_budget() -> None:
    first, second = CountingImages(), CountingImages()
    cache = ItemCache(first, max_bytes=2 * 48)
    other = ItemCache(second, max_bytes=2 * 48, budget_of=cache)  # shares the 96 bytes
    for _ in range(3):
        assert [float(cache[i]["image"][0, 0, 0]) for i in range(3)] == [0.0, 1.0, 2.0] and cache[3]["image"] is None
        assert other[0]["index"] == 0
    assert first.loads == [1, 1, 3, 1]  # 0 and 1 cached; 2 over budget; the failed item 3 costs nothing to keep
    assert second.loads == [3, 0, 0, 0]  # the shared budget was spent by the first cache
    assert set(cache[0]) == {"image", "index"}  # only what embedding needs is kept


def test_grid_every_n_checks_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = RetrievalMetricsCallback(ProceduralRetrievalDataModule(**SMALL_SET), every_n_epochs=1,
                                        grid_every_n_checks=2, batch_size=8, verbose=True)
    board = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = fit(tmp_path, PixelModule(), [callback], max_epochs=3, logger=board)
    board.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    steps_per_epoch = trainer.global_step // 3
    assert [event.step for event in events.Images(GRID_TAG)] == [steps_per_epoch, 3 * steps_per_epoch]  # checks 1, 3
    logged = [event.value for event in events.Scalars("retrieval/mAP")]
    assert logged == pytest.approx([row["mAP"] for row in callback.history], abs=1e-6)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="RetrievalDataModule"):
        RetrievalMetricsCallback(ProceduralTrainData())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        RetrievalMetricsCallback(ProceduralRetrievalDataModule(), every_n_epochs=0)


def _config(tmp_path: Path, name: str) -> Path:
    """A ``lit fit`` config: the stand-in (fixed weights), the callback on a procedural set, a checkpoint."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
            "default_root_dir": str(tmp_path / name),  # where LightningCLI saves config.yaml
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [
                {"class_path": "callbacks.retrieval.RetrievalMetricsCallback",
                 "init_args": {"datamodule": {"class_path": "datamodules.retrieval.ProceduralRetrievalDataModule",
                                              "init_args": SMALL_SET},
                               "ks": [1, 5], "batch_size": 3}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / name), "monitor": "retrieval/mAP", "mode": "max"}},
            ],
        },
        "model": {"class_path": "tests.descriptor_standin.StandInDescriptorModule", "init_args": {"lr": 0.0}},
        "data": {"class_path": "datamodules.images.ProceduralTrainData",
                 "init_args": {"num_images": 4, "resolution": 16, "batch_size": 2}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _history(folder: Path) -> list[dict[str, float]]:
    (checkpoint,) = folder.glob("*.ckpt")
    states = torch.load(checkpoint, weights_only=True)["callbacks"]
    return next(v["history"] for k, v in states.items() if k.startswith("RetrievalMetricsCallback"))


def test_cli_config_prints_and_instantiates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, "cfg")
    with pytest.raises(SystemExit) as info:
        LitCLI(args=["fit", "-c", str(config), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    callback_args = printed["trainer"]["callbacks"][0]["init_args"]
    assert callback_args["datamodule"]["class_path"] == "datamodules.retrieval.ProceduralRetrievalDataModule"
    assert callback_args["datamodule"]["init_args"]["num_queries"] == 7 and callback_args["every_n_epochs"] == 1
    cli = LitCLI(args=["-c", str(config)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RetrievalMetricsCallback)]
    assert isinstance(callback.datamodule, ProceduralRetrievalDataModule) and callback.datamodule.num_queries == 7


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    """7 queries and 23 gallery images on 2 ranks (both padded): the same metrics as 1 process."""
    LitCLI(args=["fit", "-c", str(_config(tmp_path, "single"))])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lit.commands.cli", "fit", "-c", str(_config(tmp_path, "ddp")),
         "--trainer.devices=2", "--trainer.strategy=ddp"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("retrieval (ProceduralRetrieval) epoch 0") == 1  # printed by rank 0 only
    single, double = _history(tmp_path / "single"), _history(tmp_path / "ddp")
    assert len(single) == len(double) == 1
    names = [n for n in single[0] if n not in ("seconds", "step")]
    assert "mAP" in names and "hit_rate@5" in names
    for name in names:
        assert double[0][name] == pytest.approx(single[0][name], abs=1e-6), name
