"""Mask sources: COCO (polygon, RLE), VOC palette PNGs, plain folders; canonical order; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.synthetic.masks import (
    CocoMaskSource,
    FolderMaskSource,
    VocMaskSource,
    canonical_instances,
    decode_coco_segmentation,
)
from photo_fixtures import PhotoSet


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Independent COCO RLE encoder: run lengths of the column-major flattening, starting with 0s."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _write_image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 20, 30)).save(path)


def _write_coco(path: Path, images: list[dict], annotations: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def test_coco_and_voc_forms_of_a_photo_set_decode_to_the_same_masks(tmp_path: Path, photos: PhotoSet) -> None:
    val, ids = photos.split("val"), photos.picks[:3]
    image_set = tmp_path / "ids.txt"
    image_set.write_text("\n".join(ids) + "\n")
    voc = VocMaskSource(val / "images", val / "masks", image_set=image_set)
    coco_ids = [im["id"] for im in json.loads((val / "annotations.json").read_text())["images"]
                if im["file_name"].split(".")[0] in ids]
    coco = CocoMaskSource(val / "annotations.json", val / "images", image_ids=coco_ids)
    assert voc.ids == coco.ids == sorted(ids)
    for a, b in zip(voc, coco):
        assert a.id == b.id and a.path == b.path
        assert len(a.instances) == len(b.instances) > 1
        assert all(torch.equal(x, y) for x, y in zip(a.instances, b.instances))
        assert torch.equal(a.background, b.background)
        labels = np.asarray(Image.open(val / "masks" / f"{a.id}.png"))
        assert torch.equal(a.background, torch.from_numpy(labels == 0))
        union = torch.stack(a.instances).any(0)
        assert torch.equal(union | a.background, torch.ones_like(union))  # these sets have no void
        areas = [int(m.sum()) for m in a.instances]
        assert areas == sorted(areas, reverse=True)


def test_canonical_order_is_area_then_first_pixel() -> None:
    a = np.zeros((4, 4), bool); a[0, 2] = True                    # area 1, first pixel 2
    b = np.zeros((4, 4), bool); b[1, 0] = True                    # area 1, first pixel 4
    c = np.zeros((4, 4), bool); c[3, :] = True                    # area 4
    empty = np.zeros((4, 4), bool)
    ordered = canonical_instances([b, empty, a, c])
    assert [torch.equal(x, torch.from_numpy(y)) for x, y in zip(ordered, [c, a, b])] == [True] * 3
    assert len(ordered) == 3


def test_rle_decoding_matches_an_independent_encoder() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((7, 5)) > 0.5
    assert np.array_equal(decode_coco_segmentation(_uncompressed_rle(mask), 7, 5), mask)
    with pytest.raises(ValueError, match="RLE size"):
        decode_coco_segmentation(_uncompressed_rle(mask), 5, 7)
    with pytest.raises(ValueError, match="unsupported"):
        decode_coco_segmentation("nonsense", 7, 5)


def test_polygon_decoding_covers_the_rectangle() -> None:
    mask = decode_coco_segmentation([[2, 3, 12, 3, 12, 9, 2, 9]], 16, 20)  # x0=2..x1=12, y0=3..y1=9
    expected = np.zeros((16, 20), bool)
    expected[3:9, 2:12] = True
    inter, union = (mask & expected).sum(), (mask | expected).sum()
    assert inter / union > 0.8
    assert mask[4:8, 3:11].all() and not mask[:2].any() and not mask[:, 14:].any()


def test_coco_crowd_is_neither_object_nor_background(tmp_path: Path) -> None:
    _write_image(tmp_path / "img" / "a.png", 6, 8)
    obj = np.zeros((6, 8), bool); obj[1:3, 1:4] = True
    crowd = np.zeros((6, 8), bool); crowd[4:, 5:] = True
    annotations = [
        {"id": 1, "image_id": 7, "segmentation": _uncompressed_rle(obj), "iscrowd": 0},
        {"id": 2, "image_id": 7, "segmentation": _uncompressed_rle(crowd), "iscrowd": 1},
        {"id": 3, "image_id": 7, "segmentation": [], "iscrowd": 0},  # empty polygon list: dropped
    ]
    path = _write_coco(tmp_path / "ann.json", [{"id": 7, "file_name": "a.png", "height": 6, "width": 8}], annotations)
    item = CocoMaskSource(path, tmp_path / "img")[0]
    assert item.id == "a" and len(item.instances) == 1
    assert torch.equal(item.instances[0], torch.from_numpy(obj))
    assert torch.equal(item.background, torch.from_numpy(~(obj | crowd)))


def test_voc_void_border_is_ignored(tmp_path: Path) -> None:
    labels = np.zeros((6, 6), np.uint8)
    labels[1:3, 1:3] = 1
    labels[3:5, 3:5] = 2
    labels[0, :] = 255
    mask = Image.fromarray(labels, mode="P")
    mask.putpalette([0, 0, 0] * 256)
    (tmp_path / "masks").mkdir()
    mask.save(tmp_path / "masks" / "x.png")
    _write_image(tmp_path / "images" / "x.jpg", 6, 6)
    item = VocMaskSource(tmp_path / "images", tmp_path / "masks")[0]
    assert len(item.instances) == 2
    assert torch.equal(item.background, torch.from_numpy(labels == 0))
    assert not item.background[0].any() and not any(m[0].any() for m in item.instances)


def test_folder_masks_binary_and_rgb(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "bin.png", 5, 5)
    _write_image(tmp_path / "images" / "rgb.png", 5, 5)
    (tmp_path / "masks").mkdir()
    binary = np.zeros((5, 5), np.uint8); binary[1:4, 1:4] = 255
    Image.fromarray(binary, mode="L").save(tmp_path / "masks" / "bin_mask.png")
    rgb = np.zeros((5, 5, 3), np.uint8); rgb[0, :2] = (255, 0, 0); rgb[4, :] = (0, 0, 255)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "masks" / "rgb_mask.png")
    source = FolderMaskSource(tmp_path / "images", tmp_path / "masks", mask_suffix="_mask")
    assert source.ids == ["bin", "rgb"]
    one, two = source[0], source[1]
    assert len(one.instances) == 1 and torch.equal(one.instances[0], torch.from_numpy(binary > 0))
    assert [int(m.sum()) for m in two.instances] == [5, 2]  # blue row first (larger)
    assert int(two.background.sum()) == 25 - 7


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoMaskSource(tmp_path / "missing.json", tmp_path)
    _write_image(tmp_path / "img" / "a.png", 4, 4)
    images = [{"id": 1, "file_name": "a.png", "height": 4, "width": 4},
              {"id": 2, "file_name": "gone.png", "height": 4, "width": 4}]
    with pytest.raises(FileNotFoundError, match=r"1 of 2 .*gone\.png"):
        CocoMaskSource(_write_coco(tmp_path / "ann.json", images, []), tmp_path / "img")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO instances file"):
        CocoMaskSource(tmp_path / "bad.json", tmp_path / "img")
    with pytest.raises(FileNotFoundError, match="mask folder not found"):
        VocMaskSource(tmp_path / "img", tmp_path / "no_masks")
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((3, 3), np.uint8), mode="L").save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((3, 3), np.uint8), mode="L").save(tmp_path / "masks" / "b.png")
    with pytest.raises(FileNotFoundError, match=r"image\(s\) for masks.*: b"):
        VocMaskSource(tmp_path / "img", tmp_path / "masks")
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"mask of .*a\.png is \(3, 3\).*\(4, 4\)"):
        VocMaskSource(tmp_path / "img", tmp_path / "masks")[0]
    (tmp_path / "ids.txt").write_text("a\nc\n")
    with pytest.raises(FileNotFoundError, match="missing"):
        VocMaskSource(tmp_path / "img", tmp_path / "masks", image_set=tmp_path / "ids.txt")
    Image.new("RGB", (4, 4)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match="palette"):
        VocMaskSource(tmp_path / "img", tmp_path / "masks")[0]
    with pytest.raises(FileNotFoundError, match="expected as masks"):
        FolderMaskSource(tmp_path / "img", tmp_path / "masks", mask_suffix="_m")
