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
from lit.errors import UserError
from models.descriptor_config import DescriptorConfig
from models.registry import build_descriptor
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
    model = RetrievalEvaluator(descriptor=DescriptorConfig("pixel"), ks=[1, 5])
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
    model = RetrievalEvaluator(descriptor=DescriptorConfig("pixel", input_size=8), ks=[1, 2])
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
        sys.executable, "-m", "lit.commands.cli", "test", "-c", str(REPO / "configs" / "demo_retrieval.yaml"),
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
    report = json.loads(next((tmp_path / name).rglob("metrics.json")).read_text())
    report["png"] = next((tmp_path / name).rglob("retrievals.png")).read_bytes()
    return report


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    """7 queries and 23 gallery items: DistributedSampler pads both; results must not change,
    nor the retrievals.png grid (the first 5 queries by index, not rank 0's shard 0, 2, 4, 6)."""
    single = _run_cli(tmp_path, "single", ["--trainer.devices=1", "--model.init_args.grid_queries=5"])
    # no logger: both processes write into the one fresh lit_runs/version_0 that rank 0 made
    double = _run_cli(tmp_path, "ddp", ["--trainer.devices=2", "--trainer.strategy=ddp",
                                        "--model.init_args.grid_queries=5", "--trainer.logger=false",
                                        f"--trainer.default_root_dir={tmp_path / 'ddp'}"])
    assert [p.relative_to(tmp_path) for p in (tmp_path / "ddp").rglob("metrics.json")] == [
        Path("ddp/lit_runs/version_0/metrics.json")]
    assert sorted(p.name for p in (tmp_path / "ddp" / "lit_runs").iterdir()) == ["version_0"]
    assert single["png"] == double["png"]
    assert double["num_queries"] == single["num_queries"] == 7
    assert double["num_gallery"] == single["num_gallery"] == 23
    for name, value in single["metrics"].items():
        assert double["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert 0.0 < single["metrics"]["mAP"] <= 1.0


def _small(seed: int = 3) -> ProceduralRetrievalDataModule:
    return ProceduralRetrievalDataModule(num_queries=5, copies_per_query=1, num_distractors=4, image_size=16,
                                         seed=seed, batch_size=4)


def test_trainer_test_returns_the_metrics_of_metrics_json(tmp_path: Path) -> None:
    """Logged through Lightning: trainer.test() returns mAP, MRR, recall@k ... as in metrics.json;
    metrics.json records the descriptor (random init, input size, similarity, normalisation)."""
    model = RetrievalEvaluator(descriptor=DescriptorConfig("pixel", random_init=True, input_size=8), ks=[1, 3])
    returned = _trainer(tmp_path).test(model, datamodule=_small(), verbose=False)
    report = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert set(report["metrics"]) == {"mAP", "MRR", "recall@1", "recall@3", "hit_rate@1", "hit_rate@3",
                                      "precision@1", "precision@3"}
    for per_loader in returned:  # one dict per test dataloader (queries, gallery): the same values
        assert set(per_loader) == set(report["metrics"])
        for name, value in report["metrics"].items():
            assert per_loader[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    config = DescriptorConfig("pixel", random_init=True, input_size=8)
    assert report["descriptor_config"] == config.record(config.build())
    assert report["run_name"] == "pixel (random init)"
    assert report["descriptor_config"]["input_size"] == 8 and report["similarity"] == "cosine"


def test_report_files_it_did_not_write_are_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"mine": 1}')
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    model = RetrievalEvaluator(descriptor=DescriptorConfig("pixel", input_size=8))
    with pytest.raises(UserError, match=f"{tmp_path / 'metrics.json'} already exists and this run did not write it"):
        trainer.test(model, datamodule=_small(), verbose=False)
    assert (tmp_path / "metrics.json").read_text() == '{"mine": 1}'
    assert not (tmp_path / "metrics.md").exists()
    (tmp_path / "metrics.json").unlink()
    trainer.test(model, datamodule=_small(), verbose=False)
    trainer.test(model, datamodule=_small(seed=4), verbose=False)  # its own files: rewritten
    assert json.loads((tmp_path / "metrics.json").read_text())["num_queries"] == 5
