"""``lit test`` with the RetrievalEvaluator: values against scikit-learn, skips, and DDP = 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from datamodules.retrieval import FolderRetrievalDataModule, ProceduralRetrievalDataModule
from models.extractors import build_descriptor
from models.retrieval import RetrievalEvaluator
from tests.reference_scores import cosine_scores

REPO = Path(__file__).resolve().parents[1]


def _reference_metrics(datamodule: ProceduralRetrievalDataModule) -> dict[str, float]:
    """Embed every image directly, rank by a full numpy cosine matrix, score with scikit-learn."""
    retrieval_set = datamodule.retrieval_set
    descriptor = build_descriptor("pixel")

    def embed(dataset: torch.utils.data.Dataset) -> np.ndarray:
        images = [dataset[i]["image"] for i in range(len(dataset))]
        with torch.no_grad():
            return descriptor(torch.stack(images)).numpy().astype(np.float64)

    queries, gallery = embed(retrieval_set.queries), embed(retrieval_set.gallery)
    scores = cosine_scores(queries, gallery)
    aps, recall1, mrr = [], [], []
    for q, positives in enumerate(retrieval_set.positives):
        truth = np.zeros(gallery.shape[0], dtype=bool)
        truth[positives] = True
        aps.append(average_precision_score(truth, scores[q]))
        order = np.lexsort((np.arange(gallery.shape[0]), -scores[q]))
        ranked_truth = truth[order]
        recall1.append(ranked_truth[:1].sum() / truth.sum())
        mrr.append(1.0 / (1 + int(np.argmax(ranked_truth))))
    return {"mAP": float(np.mean(aps)), "recall@1": float(np.mean(recall1)), "MRR": float(np.mean(mrr))}


def _trainer(tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_metrics_match_sklearn_reference(tmp_path: Path) -> None:
    datamodule = ProceduralRetrievalDataModule(
        num_queries=9, copies_per_query=2, num_distractors=11, image_size=32, seed=3, batch_size=4
    )
    model = RetrievalEvaluator(descriptor="pixel", ks=[1, 5])
    _trainer(tmp_path).test(model, datamodule=datamodule, verbose=False)
    expected = _reference_metrics(datamodule)
    for name, value in expected.items():
        assert model.results[name] == pytest.approx(value, abs=1e-6), name
    report = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert report["num_queries"] == 9 and report["num_gallery"] == 9 * 2 + 11
    assert report["metrics"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert "| pixel |" in next(tmp_path.rglob("metrics.md")).read_text()


def _write_folder_set(root: Path) -> Path:
    """Three classes of flat-colour images (trivially separable) and one corrupt file."""
    rng = np.random.default_rng(0)
    for label, colour in enumerate([(220, 30, 30), (30, 220, 30), (30, 30, 220)]):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            noise = rng.integers(-20, 20, size=(24, 24, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i}.png")
    corrupt = root / "class_0" / "img_broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return corrupt


def test_folder_set_excludes_self_and_counts_skips(tmp_path: Path) -> None:
    corrupt = _write_folder_set(tmp_path / "data")
    datamodule = FolderRetrievalDataModule(root=str(tmp_path / "data"), batch_size=4)
    model = RetrievalEvaluator(descriptor="pixel", input_size=8, ks=[1, 2])
    with pytest.warns(UserWarning, match="img_broken"):
        _trainer(tmp_path).test(model, datamodule=datamodule, verbose=False)
    # each image's two class-mates are the nearest items: perfect scores once self is excluded
    assert model.results["mAP"] == pytest.approx(1.0)
    assert model.results["recall@2"] == pytest.approx(1.0)
    report = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert report["queries_skipped"] == 1
    assert any(Path(name).name == corrupt.name for name in report["skipped_files"])
    assert report["num_gallery"] == 9


def _run_cli(tmp_path: Path, name: str, extra: list[str]) -> dict:
    args = [
        sys.executable, "-m", "lit.cli", "test", "-c", str(REPO / "configs" / "demo_retrieval.yaml"),
        "--data.init_args.num_queries=7", "--data.init_args.copies_per_query=2",
        "--data.init_args.num_distractors=9", "--data.init_args.image_size=32",
        "--data.init_args.batch_size=3", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.logger.init_args.name={name}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next((tmp_path / name).rglob("metrics.json")).read_text())


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    """7 queries and 23 gallery items: DistributedSampler pads both; results must not change."""
    single = _run_cli(tmp_path, "single", ["--trainer.devices=1"])
    double = _run_cli(tmp_path, "ddp", ["--trainer.devices=2", "--trainer.strategy=ddp"])
    assert double["num_queries"] == single["num_queries"] == 7
    assert double["num_gallery"] == single["num_gallery"] == 23
    for name, value in single["metrics"].items():
        assert double["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert 0.0 < single["metrics"]["mAP"] <= 1.0
