"""Segmix sets: determinism (runs, processes, COCO vs VOC), placement, manifest reuse/rebuild,
resume after a killed build, skips and the datamodule."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules.synthetic.build import SyntheticSkipWarning, build_synthetic
from datamodules.synthetic.builder import StageTimer
from datamodules.synthetic.manifest import MANIFEST, read_manifest
from datamodules.synthetic.masks import CocoMaskSource, VocMaskSource
from datamodules.synthetic.segmix import RegionAugmentation, SegmixBuilder, SegmixDataModule
from datamodules.synthetic.sources import SourceRef, split_queries_and_pool
from lit.io import load_image
from photo_fixtures import PhotoSet

REPO = Path(__file__).resolve().parents[1]
SIZE = 48
NO_AUGMENTATION = RegionAugmentation(flip_probability=0, jitter_probability=0, autocontrast_probability=0,
                                     solarize_probability=0, blur_probability=0)


def make_builder(photos: PhotoSet, form: str, folder: Path, seed: int = 0, **kwargs) -> SegmixBuilder:
    """Segmix over the 8 picked val images: 4 queries, 4 pool images (seeded split)."""
    val = photos.split("val")
    if form == "voc":
        source = VocMaskSource(val / "images", val / "masks", image_set=_write_ids(photos, folder))
    else:
        images = json.loads((val / "annotations.json").read_text())["images"]
        source = CocoMaskSource(val / "annotations.json", val / "images",
                                image_ids=[im["id"] for im in images if im["file_name"][:-4] in photos.picks])
    queries, pool = split_queries_and_pool(len(source), seed, None, 0.5, has_pool=False)
    kwargs.setdefault("mixes_per_query", 2)
    return SegmixBuilder(source, [SourceRef(source.ids[r], source.paths[r]) for r in pool], queries, seed=seed,
                         output_size=SIZE, **kwargs)


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").glob("*.png"))}


def test_same_seed_same_bytes_and_coco_equals_voc(tmp_path: Path, photos: PhotoSet) -> None:
    voc = build_synthetic(make_builder(photos, "voc", tmp_path), tmp_path / "voc", progress=False)
    again = build_synthetic(make_builder(photos, "voc", tmp_path), tmp_path / "again", progress=False, num_workers=2)
    coco = build_synthetic(make_builder(photos, "coco", tmp_path), tmp_path / "coco", progress=False)
    assert voc.num_items == 8 and not voc.reused
    assert files(tmp_path / "voc") == files(tmp_path / "again") == files(tmp_path / "coco")
    items = [read_manifest(tmp_path / name)["items"] for name in ("voc", "coco")]
    assert items[0] == items[1]
    other = build_synthetic(make_builder(photos, "voc", tmp_path, seed=1), tmp_path / "seed1", progress=False)
    assert other.num_items == 8 and files(tmp_path / "seed1") != files(tmp_path / "voc")
    assert {"decode", "resize", "augment", "composite", "encode", "write"} <= set(voc.stage_seconds)
    assert again.num_items == coco.num_items == 8


def test_same_bytes_in_other_processes_and_thread_counts(tmp_path: Path, photos: PhotoSet) -> None:
    """What DDP ranks rely on: a fresh process rendering with another torch thread count
    writes the same bytes as this one."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
        torch.set_num_threads(int(sys.argv[2]))
        from pathlib import Path
        from test_segmix import make_builder
        from photo_fixtures import PhotoSet
        from datamodules.synthetic.build import build_synthetic
        out = Path(sys.argv[1]); out.mkdir()
        photos = PhotoSet("given", Path(sys.argv[4]), {{}}, tuple(sys.argv[5].split(",")))
        build_synthetic(make_builder(photos, "voc", out), out / "set", progress=False, num_workers=int(sys.argv[3]))
    """)
    threads = 2 if torch.get_num_threads() == 1 else 1  # a thread count other than this process's
    run = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "other"), str(threads), "0",
                            str(photos.root), ",".join(photos.picks)])
    build_synthetic(make_builder(photos, "voc", tmp_path), tmp_path / "here", progress=False)
    assert run.wait(timeout=120) == 0
    reference = files(tmp_path / "here")
    assert len(reference) == 8 and files(tmp_path / "other" / "set") == reference


def test_manifest_reuse_and_rebuild(tmp_path: Path, photos: PhotoSet) -> None:
    root = tmp_path / "set"
    build_synthetic(make_builder(photos, "voc", tmp_path), root, progress=False)
    manifest = read_manifest(root)
    assert manifest["kind"] == "segmix" and manifest["seed"] == 0
    assert manifest["pool_ids"] and not set(manifest["pool_ids"]) & set(manifest["query_ids"])
    item = manifest["items"][0]
    assert {"file", "query", "query_id", "pool_id", "pool_box", "region", "placement", "augmentation"} <= set(item)
    stamp = (root / item["file"]).stat().st_mtime_ns
    assert build_synthetic(make_builder(photos, "voc", tmp_path), root, progress=False).reused
    assert (root / item["file"]).stat().st_mtime_ns == stamp
    changed = build_synthetic(make_builder(photos, "voc", tmp_path, mixes_per_query=1), root, progress=False)
    assert not changed.reused and changed.num_items == 4
    assert len(files(root)) == 4 and read_manifest(root)["parameters"]["mixes_per_query"] == 1
    (root / read_manifest(root)["items"][0]["file"]).unlink()  # a lost file also rebuilds
    assert not build_synthetic(make_builder(photos, "voc", tmp_path, mixes_per_query=1), root, progress=False).reused


class _Killed(Exception):
    pass


def test_killed_build_leaves_no_manifest_and_resumes(tmp_path: Path, photos: PhotoSet) -> None:
    builder = make_builder(photos, "voc", tmp_path)
    original = builder.render_query
    calls = []

    def dying(row: int, timer: StageTimer):
        if len(calls) == 2:
            raise _Killed
        calls.append(row)
        return original(row, timer)

    builder.render_query = dying  # type: ignore[method-assign]
    with pytest.raises(_Killed):
        build_synthetic(builder, tmp_path / "set", progress=False)
    assert not (tmp_path / "set" / MANIFEST).exists() and len(files(tmp_path / "set")) == 4
    resumed = build_synthetic(make_builder(photos, "voc", tmp_path), tmp_path / "set", progress=False)
    assert resumed.rendered_queries == 2 and resumed.num_items == 8
    build_synthetic(make_builder(photos, "voc", tmp_path), tmp_path / "fresh", progress=False)
    assert files(tmp_path / "set") == files(tmp_path / "fresh")
    assert read_manifest(tmp_path / "set")["items"] == read_manifest(tmp_path / "fresh")["items"]


def _pool_canvas(builder: SegmixBuilder, item: dict) -> torch.Tensor:
    pool = {ref.id: ref.path for ref in builder.pool()}
    x0, y0, x1, y1 = item["pool_box"]
    square = load_image(pool[item["pool_id"]])[:, y0:y1, x0:x1]
    canvas = F.interpolate(square[None], size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (canvas[0].clamp(0, 1) * 255).round()


def _outside(box: list[int], margin: int = 1) -> torch.Tensor:
    keep = torch.ones(SIZE, SIZE, dtype=torch.bool)
    x0, y0, x1, y1 = box
    keep[max(0, y0 - margin): y1 + margin, max(0, x0 - margin): x1 + margin] = False
    return keep


def test_objects_land_in_their_box_on_the_recorded_pool_crop(tmp_path: Path, photos: PhotoSet) -> None:
    builder = make_builder(photos, "voc", tmp_path, object_probability=1.0, augmentation=NO_AUGMENTATION,
                           object_scale=(0.4, 0.6), max_rotation=0.0)
    build_synthetic(builder, tmp_path / "set", progress=False)
    for item in read_manifest(tmp_path / "set")["items"]:
        assert item["region"].startswith("object:")
        synthetic = load_image(tmp_path / "set" / item["file"]) * 255
        canvas = _pool_canvas(builder, item)
        box = item["placement"]["box"]
        outside = _outside(box, margin=0)
        assert (synthetic - canvas).abs()[:, outside].max() <= 1.0  # untouched pool pixels
        inside = ~_outside(box, margin=0)
        assert (synthetic - canvas).abs()[:, inside].mean() > 3.0  # something was pasted there
        longer = max(box[2] - box[0], box[3] - box[1])
        assert 0.4 * SIZE - 2 <= longer <= 0.6 * SIZE + 2


def test_background_shows_the_pool_through_object_holes(tmp_path: Path, photos: PhotoSet) -> None:
    builder = make_builder(photos, "voc", tmp_path, object_probability=0.0, augmentation=NO_AUGMENTATION)
    build_synthetic(builder, tmp_path / "set", progress=False)
    queries = {ref.id: ref for ref in builder.queries()}
    for item in read_manifest(tmp_path / "set")["items"]:
        assert item["region"] == "background"
        synthetic = load_image(tmp_path / "set" / item["file"]) * 255
        canvas = _pool_canvas(builder, item)
        x0, y0, x1, y1 = item["placement"]["box"]
        assert max(x1 - x0, y1 - y0) == SIZE  # letterboxed: the longer side fills the canvas
        assert (synthetic - canvas).abs()[:, _outside(item["placement"]["box"], 0)].max() <= 1.0
        masked = builder.source[builder.source.ids.index(item["query_id"])]
        stack = torch.cat([load_image(queries[item["query_id"]].path), masked.background[None].float()])
        resized = F.interpolate(stack[None], size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True,
                                align_corners=False)[0]
        window = synthetic[:, y0:y1, x0:x1]
        solid, hole = resized[3] > 0.999, resized[3] < 0.001
        assert solid.any() and hole.any()
        assert (window[:, solid] - (resized[:3, solid].clamp(0, 1) * 255).round()).abs().max() <= 1.0
        assert (window[:, hole] - canvas[:, y0:y1, x0:x1][:, hole]).abs().max() <= 1.0


def test_queries_without_a_usable_region_are_counted_skips(tmp_path: Path, photos: PhotoSet) -> None:
    with pytest.warns(SyntheticSkipWarning, match="4 of 4 queries skipped"):
        report = build_synthetic(make_builder(photos, "voc", tmp_path, min_region_area=0.99), tmp_path / "set",
                                 progress=False)
    assert report.num_skipped == 4 and report.num_items == 0
    assert "min_region_area" in read_manifest(tmp_path / "set")["skipped"][0]["reason"]


def test_bad_arguments_and_overlapping_pool(tmp_path: Path, photos: PhotoSet) -> None:
    val = photos.split("val")
    source = VocMaskSource(val / "images", val / "masks", image_set=_write_ids(photos, tmp_path))
    refs = [SourceRef(source.ids[r], source.paths[r]) for r in range(len(source))]
    with pytest.raises(ValueError, match="shares 1 image"):
        SegmixBuilder(source, refs[:1], [0, 1])
    with pytest.raises(ValueError, match="object_probability"):
        SegmixBuilder(source, refs[4:], [0], object_probability=1.5)
    with pytest.raises(ValueError, match="blur_probability"):
        RegionAugmentation(blur_probability=2)
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        SegmixDataModule(root=str(tmp_path / "nope"), output_dir=str(tmp_path / "o")).make_builder()


def _write_ids(photos: PhotoSet, folder: Path) -> Path:
    (folder / "ids.txt").write_text("\n".join(photos.picks) + "\n")
    return folder / "ids.txt"


def test_datamodule_builds_a_retrieval_set(tmp_path: Path, photos: PhotoSet) -> None:
    distractors = tmp_path / "distractors"
    distractors.mkdir()
    for i in range(2):
        (distractors / f"d{i}.png").write_bytes(b"")  # placeholders: only listed, never loaded here
    data = SegmixDataModule(root=str(photos.split("val")), mask_format="coco", num_queries=3, pool_fraction=0.9,
                            output_dir=str(tmp_path / "set"), output_size=SIZE, mixes_per_query=2,
                            distractors=str(distractors), progress=False, batch_size=4)
    data.prepare_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing unexpected
        data.setup("test")
    retrieval = data.retrieval_set
    assert len(retrieval.queries) == 3 and len(retrieval.gallery) == 3 * 2 + 2
    assert retrieval.positives == [[0, 1], [2, 3], [4, 5]]
    manifest = read_manifest(tmp_path / "set")
    assert [retrieval.queries[q]["path"] for q in range(3)] == manifest["query_paths"]
    assert retrieval.gallery[0]["image"].shape == (3, SIZE, SIZE)
    assert retrieval.gallery.path(7).endswith("d1.png")
    assert len(manifest["pool_ids"]) == round(0.9 * photos.counts["val"])  # bsds300: 90


def test_split_refuses_too_many_queries_with_the_fix() -> None:
    queries, pool = split_queries_and_pool(10, 0, 5, 0.5, has_pool=False)
    assert len(queries) == 5 and len(pool) == 5 and not set(queries) & set(pool)
    with pytest.raises(ValueError, match=r"num_queries 1000 exceeds the 5 images .*10 sources, 5 in the pool.*null"):
        split_queries_and_pool(10, 0, 1000, 0.5, has_pool=False)


def test_bad_pool_image_is_redrawn_and_strict_stops_at_it(tmp_path: Path, photos: PhotoSet) -> None:
    from lit.io import ImageLoadError

    good = make_builder(photos, "voc", tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    pool = [SourceRef("broken", broken), *good.pool()]

    def builder(strict: bool = False) -> SegmixBuilder:
        return SegmixBuilder(good.source, pool, good.query_rows, seed=0, output_size=SIZE, mixes_per_query=2,
                             strict=strict)

    report = build_synthetic(builder(), tmp_path / "set", progress=False, num_workers=2)
    assert report.num_skipped == 0 and report.num_items == 8  # every readable query kept
    items = read_manifest(tmp_path / "set")["items"]
    redrawn = [item for item in items if "replaced_pool" in item]
    assert redrawn and all(item["pool_id"] != "broken" for item in items)
    assert all([bad["pool_id"] for bad in item["replaced_pool"]] == ["broken"] for item in redrawn)
    again = build_synthetic(builder(), tmp_path / "again", progress=False)
    assert files(tmp_path / "again") == files(tmp_path / "set") and again.manifest["items"] == items
    with pytest.raises(ImageLoadError, match="broken.jpg.*strict"):
        build_synthetic(builder(strict=True), tmp_path / "strict", progress=False)
    assert read_manifest(tmp_path / "strict") is None
