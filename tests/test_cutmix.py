"""Cutmix sets: determinism, patch geometry and content, datamodule, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules.synthetic.build import build_synthetic
from datamodules.synthetic.cutmix import CutmixBuilder, CutmixDataModule
from datamodules.synthetic.manifest import read_manifest
from datamodules.synthetic.sources import SourceRef, folder_refs
from lit.io import load_image
from photo_fixtures import PhotoSet

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def val_images(photos: PhotoSet) -> Path:
    return photos.split("val") / "images"


def make_builder(photos: PhotoSet, seed: int = 0, **kwargs) -> CutmixBuilder:
    refs = folder_refs(val_images(photos))[:8]
    kwargs.setdefault("mixes_per_query", 2)
    return CutmixBuilder(refs[:4], refs[4:], seed=seed, output_size=SIZE, **kwargs)


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").glob("*.png"))}


def _resized(image: torch.Tensor, box: list[int], size: int) -> torch.Tensor:
    """Reference crop + antialiased resize (as 8-bit levels)."""
    x0, y0, x1, y1 = box
    crop = image[:, y0:y1, x0:x1][None]
    return (F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)[0].clamp(0, 1) * 255).round()


def test_deterministic_and_seed_dependent(tmp_path: Path, photos: PhotoSet) -> None:
    first = build_synthetic(make_builder(photos), tmp_path / "a", progress=False)
    build_synthetic(make_builder(photos), tmp_path / "b", progress=False, num_workers=2)
    build_synthetic(make_builder(photos, seed=3), tmp_path / "c", progress=False)
    assert first.num_items == 8
    assert files(tmp_path / "a") == files(tmp_path / "b") != files(tmp_path / "c")
    assert build_synthetic(make_builder(photos), tmp_path / "a", progress=False).reused
    assert not build_synthetic(make_builder(photos, patch_fraction=(0.2, 0.3)), tmp_path / "a",
                               progress=False).reused


def test_patch_is_a_square_of_the_query_pasted_in_the_recorded_pool_crop(tmp_path: Path, photos: PhotoSet) -> None:
    builder = make_builder(photos, patch_fraction=(0.3, 0.5), mixes_per_query=3)
    build_synthetic(builder, tmp_path / "set", progress=False)
    queries = {ref.id: ref.path for ref in builder.queries()}
    pool = {ref.id: ref.path for ref in builder.pool()}
    sides = []
    for item in read_manifest(tmp_path / "set")["items"]:
        assert item["region"] == "patch" and item["pool_id"] in pool and item["query_id"] in queries
        synthetic = load_image(tmp_path / "set" / item["file"]) * 255
        tx0, ty0, tx1, ty1 = item["placement"]["box"]
        side = tx1 - tx0
        assert side == ty1 - ty0 and 0 <= tx0 and 0 <= ty0 and tx1 <= SIZE and ty1 <= SIZE
        assert 0.3 * SIZE - 1 <= side <= 0.5 * SIZE + 1
        sides.append(side)
        sx0, sy0, sx1, sy1 = item["placement"]["source_box"]
        assert sx1 - sx0 == sy1 - sy0
        patch = _resized(load_image(queries[item["query_id"]]), item["placement"]["source_box"], side)
        assert (synthetic[:, ty0:ty1, tx0:tx1] - patch).abs().max() <= 1.0
        canvas = _resized(load_image(pool[item["pool_id"]]), item["pool_box"], SIZE)
        outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
        outside[ty0:ty1, tx0:tx1] = False
        assert (synthetic[:, outside] - canvas[:, outside]).abs().max() <= 1.0
    assert len(set(sides)) > 1  # random sizes


def test_datamodule_with_explicit_pool(tmp_path: Path, photos: PhotoSet) -> None:
    queries, pool = val_images(photos), photos.split("train") / "images"
    data = CutmixDataModule(root=str(queries), pool=str(pool), num_queries=3, output_dir=str(tmp_path / "set"),
                            output_size=SIZE, mixes_per_query=2, progress=False)
    data.setup("test")  # builds on demand outside DDP
    retrieval = data.retrieval_set
    assert len(retrieval.queries) == 3 and retrieval.positives == [[0, 1], [2, 3], [4, 5]]
    manifest = read_manifest(tmp_path / "set")
    assert len(manifest["pool_ids"]) == photos.counts["train"]  # bsds300: 200
    assert all(Path(p).parent == queries for p in manifest["query_paths"])
    assert retrieval.gallery[5]["image"].shape == (3, SIZE, SIZE)


def test_errors(tmp_path: Path, photos: PhotoSet) -> None:
    refs = folder_refs(val_images(photos))[:4]
    with pytest.raises(ValueError, match="shares 2 image"):
        CutmixBuilder(refs[:2], refs[:2])
    with pytest.raises(ValueError, match="patch_fraction"):
        CutmixBuilder(refs[:2], refs[2:], patch_fraction=(0.5, 0.2))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CutmixDataModule(root=str(tmp_path / "missing"), output_dir=str(tmp_path / "o")).make_builder()
    with pytest.raises(ValueError, match="num_queries 9 exceeds"):
        CutmixDataModule(root=str(val_images(photos)), num_queries=9, pool_fraction=0.95,
                         output_dir=str(tmp_path / "o")).make_builder()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="1 of 1 queries skipped"):
        report = build_synthetic(CutmixBuilder([SourceRef("broken", broken)], refs), tmp_path / "s", progress=False)
    assert report.num_skipped == 1 and "cannot load image" in read_manifest(tmp_path / "s")["skipped"][0]["reason"]


def _lit_test_cutmix(tmp_path: Path, root: Path, name: str, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "lit.commands.cli", "test", "-c", str(REPO / "configs" / "cutmix.yaml"),
            f"--data.init_args.root={root}", "--data.init_args.num_queries=null",
            "--data.init_args.mixes_per_query=2", f"--data.init_args.output_size={SIZE}",
            f"--data.init_args.output_dir={tmp_path / name / 'set'}", "--data.init_args.build_workers=0",
            "--data.init_args.progress=false", "--data.init_args.batch_size=3",
            "--model.init_args.descriptor.name=pixel", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.logger.init_args.name={name}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next((tmp_path / name).rglob("metrics.json")).read_text())


def test_ddp_build_and_scores_match_one_process(tmp_path: Path, procedural_photos: PhotoSet) -> None:
    """`lit test` on 2 DDP processes: rank 0 builds, both read; the set's bytes and every
    metric equal a 1-process run (7 queries x 2 mixes: both shards padded)."""
    root = tmp_path / "images"
    root.mkdir()
    for ref in folder_refs(val_images(procedural_photos))[:14]:
        (root / ref.path.name).write_bytes(ref.path.read_bytes())
    single = _lit_test_cutmix(tmp_path, root, "single", ["--trainer.devices=1"])
    double = _lit_test_cutmix(tmp_path, root, "ddp", ["--trainer.devices=2", "--trainer.strategy=ddp"])
    assert files(tmp_path / "single" / "set") == files(tmp_path / "ddp" / "set")
    assert len(files(tmp_path / "ddp" / "set")) == 14
    assert double["num_queries"] == single["num_queries"] == 7
    assert double["dataset"] == single["dataset"] == "Cutmix"
    for metric, value in single["metrics"].items():
        assert double["metrics"][metric] == pytest.approx(value, abs=1e-6), metric


def _copies(folder: Path, refs: list[SourceRef], broken: list[str]) -> Path:
    """``folder`` holding copies of ``refs`` plus files named ``broken`` that are not images."""
    folder.mkdir(parents=True)
    for ref in refs:
        (folder / ref.path.name).write_bytes(ref.path.read_bytes())
    for name in broken:
        (folder / name).write_bytes(b"this is not an image")
    return folder


def test_bad_pool_image_is_redrawn_deterministically_and_recorded(tmp_path: Path, photos: PhotoSet) -> None:
    refs = folder_refs(val_images(photos))[:7]
    broken = SourceRef("broken", _copies(tmp_path / "bad", [], ["broken.jpg"]) / "broken.jpg")
    pool = [refs[4], broken, refs[5], refs[6]]

    def builder() -> CutmixBuilder:
        return CutmixBuilder(refs[:4], pool, seed=0, mixes_per_query=3, output_size=SIZE)

    report = build_synthetic(builder(), tmp_path / "a", progress=False)
    build_synthetic(builder(), tmp_path / "b", progress=False, num_workers=2)
    assert report.num_skipped == 0 and report.num_items == 12  # no readable query lost
    assert files(tmp_path / "a") == files(tmp_path / "b")  # the redraw is seeded, not process-dependent
    items = read_manifest(tmp_path / "a")["items"]
    assert items == read_manifest(tmp_path / "b")["items"]
    redrawn = [item for item in items if "replaced_pool" in item]
    assert redrawn, "seed 0 draws the broken pool image at least once (12 draws from 4)"
    readable = {ref.id: ref.path for ref in pool if ref.id != "broken"}
    for item in redrawn:
        assert [bad["pool_id"] for bad in item["replaced_pool"]] == ["broken"]
        assert "cannot load image" in item["replaced_pool"][0]["reason"]
        assert item["pool_id"] in readable  # the canvas really is the recorded replacement
        synthetic = load_image(tmp_path / "a" / item["file"]) * 255
        canvas = _resized(load_image(readable[item["pool_id"]]), item["pool_box"], SIZE)
        tx0, ty0, tx1, ty1 = item["placement"]["box"]
        outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
        outside[ty0:ty1, tx0:tx1] = False
        assert (synthetic[:, outside] - canvas[:, outside]).abs().max() <= 1.0
    # items that drew a readable image are what they were: same query box, pool and paste
    for item in items:
        if "replaced_pool" not in item:
            assert item["pool_id"] in readable


def test_every_skip_is_counted_in_metrics_json_with_its_reason(tmp_path: Path, photos: PhotoSet) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from models.descriptor_config import DescriptorConfig
    from models.retrieval import RetrievalEvaluator

    refs = folder_refs(val_images(photos))[:7]
    root = _copies(tmp_path / "queries", refs[:4], ["zz_broken_query.png"])
    pool = _copies(tmp_path / "pool", refs[4:], ["broken_pool.jpg"])
    data = CutmixDataModule(root=str(root), pool=str(pool), output_dir=str(tmp_path / "set"), output_size=SIZE,
                            mixes_per_query=3, progress=False, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run"),
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="1 of 5 queries skipped"):
        trainer.test(RetrievalEvaluator(descriptor=DescriptorConfig("pixel"), grid_queries=0), datamodule=data)
    metrics = json.loads(next((tmp_path / "run").rglob("metrics.json")).read_text())
    assert metrics["num_queries"] == 4 and metrics["queries_skipped"] == 1
    assert list(metrics["skipped_queries"]) == [str(root / "zz_broken_query.png")]
    assert "cannot load image" in metrics["skipped_queries"][str(root / "zz_broken_query.png")]
    replaced = [item for item in read_manifest(tmp_path / "set")["items"] if "replaced_pool" in item]
    assert replaced, "seed 0 draws the broken pool image at least once (12 draws from 4)"
    assert list(metrics["skipped_sources"]) == ["pool image broken_pool"]
    assert "cannot load image" in metrics["skipped_sources"]["pool image broken_pool"]


def test_strict_stops_at_the_first_bad_file_naming_it(tmp_path: Path, photos: PhotoSet) -> None:
    from lit.commands.lightning_cli import LitCLI
    from lit.io import ImageLoadError

    refs = folder_refs(val_images(photos))[:6]
    root = _copies(tmp_path / "queries", refs[:3], ["zz_broken_query.png"])
    pool = _copies(tmp_path / "pool", refs[3:], [])
    cli = LitCLI(args=["-c", str(REPO / "configs" / "cutmix.yaml"), f"--data.init_args.root={root}",
                       f"--data.init_args.pool={pool}", "--data.init_args.num_queries=null",
                       f"--data.init_args.output_dir={tmp_path / 'set'}", f"--data.init_args.output_size={SIZE}",
                       "--data.init_args.build_workers=2", "--data.init_args.progress=false",
                       "--data.init_args.strict=true", "--model.init_args.descriptor.name=pixel"], run=False)
    assert cli.datamodule.strict is True
    with pytest.raises(ImageLoadError, match="zz_broken_query.png.*strict"):
        cli.datamodule.setup("test")
    assert read_manifest(tmp_path / "set") is None  # nothing half-built is read as a set
    lenient = CutmixDataModule(root=str(root), pool=str(pool), output_dir=str(tmp_path / "set"), output_size=SIZE,
                               progress=False)
    with pytest.warns(UserWarning, match="1 of 4 queries skipped"):
        lenient.setup("test")
    assert len(lenient.retrieval_set.queries) == 3
