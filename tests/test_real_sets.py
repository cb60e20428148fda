"""Real retrieval-set loaders on tiny fake layouts of each official format."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.real.common import CroppedImageDataset, DatasetLayoutError, class_retrieval_set, crop_box
from datamodules.real.cub import CUB200DataModule
from datamodules.real.gpr1200 import GPR1200DataModule
from datamodules.real.instre import INSTREDataModule
from datamodules.real.oxford_paris import RevisitedOxfordParis, protocol_ground_truth
from datamodules.retrieval import RetrievalSet
from lit.io import load_image
from tests.reference_scores import cosine_scores


def _write_image(path: Path, seed: int, size: tuple[int, int] = (20, 24)) -> None:
    """A small random RGB image (height, width = size) in the format of the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _brute_force_class_truth(labels: Sequence[Any]) -> tuple[list[int], list[list[int]]]:
    """Query rows (images whose class has another image) and their positives, by double loop."""
    queries, positives = [], []
    for q, label in enumerate(labels):
        others = [g for g, other in enumerate(labels) if other == label and g != q]
        if others:
            queries.append(q)
            positives.append(others)
    return queries, positives


def _gallery_paths(retrieval_set: RetrievalSet) -> list[str]:
    return [Path(p).name for p in retrieval_set.gallery.paths]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- shared pieces
def test_class_retrieval_set_matches_brute_force(tmp_path: Path) -> None:
    labels = ["a", "b", "a", "c", "b", "a", "d", "d"]
    paths = [tmp_path / f"{i}.png" for i in range(len(labels))]
    with pytest.warns(UserWarning, match="1 class"):
        rs = class_retrieval_set(paths, labels, "toy")
    queries, positives = _brute_force_class_truth(labels)
    assert rs.query_in_gallery == queries
    assert rs.positives == positives
    assert len(rs.gallery) == len(labels)  # the singleton "c" stays as a distractor
    assert [Path(p).name for p in rs.queries.paths] == [f"{q}.png" for q in queries]  # type: ignore[attr-defined]


def test_crop_box_rounds_like_pil(tmp_path: Path) -> None:
    path = tmp_path / "im.png"
    _write_image(path, seed=1, size=(30, 40))
    box = (3.4, 2.5, 21.6, 17.5)
    ours = crop_box(torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1), box)
    reference = torch.from_numpy(np.array(Image.open(path).crop(box))).permute(2, 0, 1)
    assert torch.equal(ours, reference)
    with pytest.raises(ValueError, match="outside"):
        crop_box(torch.zeros(3, 10, 10), (20.0, 20.0, 30.0, 30.0))


def test_cropped_dataset_follows_downscaling(tmp_path: Path) -> None:
    path = tmp_path / "im.png"
    _write_image(path, seed=2, size=(40, 40))
    full = CroppedImageDataset([path], [(0.0, 0.0, 20.0, 40.0)])[0]["image"]
    small = CroppedImageDataset([path], [(0.0, 0.0, 20.0, 40.0)], max_pixels=20 * 20)[0]["image"]
    assert full.shape == (3, 40, 20)
    assert small.shape == (3, 20, 10)  # half the image, at half the resolution
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(full, pixels[:, 0:40, 0:20])  # the left half of the stored image
    whole = load_image(path, max_pixels=20 * 20)  # the same downscaling: 40 x 40 -> 20 x 20, scale 1/2
    assert whole is not None and whole.shape == (3, 20, 20)
    halved = F.interpolate(pixels[None], size=(20, 20), mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(whole, halved.clamp(0, 1), rtol=0, atol=1e-6)
    assert torch.equal(small, whole[:, 0:20, 0:10])  # box (0, 0, 20, 40) scaled by 1/2: x 0..10, y 0..20
    # an offset box: (10, 8, 30, 36) in stored pixels is (5, 4, 15, 18) in the downscaled image
    offset = CroppedImageDataset([path], [(10.0, 8.0, 30.0, 36.0)], max_pixels=20 * 20)[0]["image"]
    assert torch.equal(offset, whole[:, 4:18, 5:15])
    assert torch.equal(CroppedImageDataset([path], [(10.0, 8.0, 30.0, 36.0)])[0]["image"], pixels[:, 8:36, 10:30])


# ---------------------------------------------------------------- revisited Oxford / Paris
IMLIST = [f"db_{i}" for i in range(7)]
QIMLIST = ["db_0", "q_extra", "db_6"]
BOXES = [[2.4, 1.6, 15.5, 12.5], [0.0, 0.0, 24.0, 20.0], [5.0, 5.0, 9.0, 11.0]]
EASY = [[1, 2], [], [5]]
HARD = [[3], [4], []]
JUNK = [[5], [], [0]]


def _oxford(root: Path, name: str = "roxford5k", **overrides: Any) -> Path:
    """A fake revisitop folder: gnd_<name>.pkl and jpg/<name>.jpg."""
    gnd = [{"bbx": b, "easy": e, "hard": h, "junk": j} for b, e, h, j in zip(BOXES, EASY, HARD, JUNK)]
    data = {"imlist": IMLIST, "qimlist": QIMLIST, "gnd": gnd, **overrides}
    root.mkdir(parents=True, exist_ok=True)
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(data))
    for seed, image in enumerate(dict.fromkeys([*IMLIST, *QIMLIST])):
        _write_image(root / "jpg" / f"{image}.jpg", seed)
    return root


def _build(module: Any) -> RetrievalSet:
    module.setup("test")
    return module.retrieval_set


def test_protocols_hand_computed() -> None:
    positives, junk = protocol_ground_truth(EASY, HARD, JUNK, "easy")
    assert positives == [[1, 2], [], [5]] and junk == [[3, 5], [4], [0]]
    positives, junk = protocol_ground_truth(EASY, HARD, JUNK, "medium")
    assert positives == [[1, 2, 3], [4], [5]] and junk == [[5], [], [0]]
    positives, junk = protocol_ground_truth(EASY, HARD, JUNK, "hard")
    assert positives == [[3], [4], []] and junk == [[1, 2, 5], [], [0, 5]]
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_ground_truth(EASY, HARD, JUNK, "extreme")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("protocol", "kept", "positives", "junk"),
    [
        ("easy", [0, 2], [[1, 2], [5]], [[3, 5], [0]]),
        ("medium", [0, 1, 2], [[1, 2, 3], [4], [5]], [[5], [], [0]]),
        ("hard", [0, 1], [[3], [4]], [[1, 2, 5], []]),
    ],
)
def test_oxford_protocols_drop_empty_queries(
    tmp_path: Path, protocol: str, kept: list[int], positives: list[list[int]], junk: list[list[int]]
) -> None:
    module = RevisitedOxfordParis(str(_oxford(tmp_path / "ox")), protocol=protocol)  # type: ignore[arg-type]
    assert module.name == f"rOxford5k-{protocol.title()}"  # a Table 1 column per set and protocol
    with pytest.warns(UserWarning) as record:
        rs = _build(module)
    dropped = [QIMLIST[q] for q in range(3) if q not in kept]
    assert module.dropped_queries == dropped
    assert any(f"{len(dropped)} of 3 queries have no positives" in str(w.message) for w in record) == bool(dropped)
    assert rs.positives == positives and rs.junk == junk
    assert rs.query_in_gallery is None  # queries are crops, evaluated against the whole database
    assert _gallery_paths(rs) == [f"{n}.jpg" for n in IMLIST]
    assert [Path(p).name for p in rs.queries.paths] == [f"{QIMLIST[q]}.jpg" for q in kept]  # type: ignore[attr-defined]


def test_oxford_queries_are_cropped_like_pil(tmp_path: Path) -> None:
    root = _oxford(tmp_path / "par", name="rparis6k")
    with pytest.warns(UserWarning):  # tiny file: counts differ from the official one
        rs = _build(RevisitedOxfordParis(str(root), dataset="rparis6k", protocol="medium"))
    for q, box in enumerate(BOXES):
        item = rs.queries[q]
        with Image.open(root / "jpg" / f"{QIMLIST[q]}.jpg") as image:
            reference = np.asarray(image.convert("RGB").crop(tuple(box)), dtype=np.float32) / 255.0
        assert item["image"].shape[1:] == reference.shape[:2]
        np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), reference, atol=1e-6)
    assert rs.gallery[0]["image"].shape == (3, 20, 24)  # the gallery is never cropped


def test_oxford_missing_pickle_names_file_and_hints_nested_root(tmp_path: Path) -> None:
    _oxford(tmp_path / "datasets" / "roxford5k")
    with pytest.raises(DatasetLayoutError, match=r"gnd_roxford5k\.pkl not found.*did you mean root=.*roxford5k"):
        _build(RevisitedOxfordParis(str(tmp_path / "datasets")))
    with pytest.raises(DatasetLayoutError, match=r"root not found"):
        _build(RevisitedOxfordParis(str(tmp_path / "nowhere")))


def test_oxford_missing_images_are_counted(tmp_path: Path) -> None:
    root = _oxford(tmp_path / "ox")
    (root / "jpg" / "db_3.jpg").unlink()
    (root / "jpg" / "q_extra.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"2 of 8 image files listed in gnd_roxford5k\.pkl are missing.*db_3\.jpg, jpg/q_extra\.jpg"):
        _build(RevisitedOxfordParis(str(root)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gnd": [{"bbx": BOXES[0], "easy": [], "hard": [], "junk": []}]}, "3 query names but 1 'gnd' entries"),
        ({"gnd": [{"bbx": b, "easy": [99], "hard": [], "junk": []} for b in BOXES]}, r"indices \[99\] are outside 0\.\.6"),
        ({"gnd": [{"bbx": [5, 5, 2, 2], "easy": [1], "hard": [], "junk": []}] * 3}, "x2 > x1"),
        ({"gnd": [{"bbx": b, "easy": [1]} for b in BOXES]}, r"lacks key\(s\) \['hard', 'junk'\]"),
    ],
)
def test_oxford_malformed_ground_truth(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(DatasetLayoutError, match=message):
        _build(RevisitedOxfordParis(str(_oxford(tmp_path / "ox", **overrides))))


def test_oxford_pickle_without_keys(tmp_path: Path) -> None:
    root = _oxford(tmp_path / "ox")
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": IMLIST}))
    with pytest.raises(DatasetLayoutError, match="must be a dict with keys 'imlist', 'qimlist', 'gnd'"):
        _build(RevisitedOxfordParis(str(root)))
    (root / "gnd_roxford5k.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DatasetLayoutError, match="cannot read .* as a pickle"):
        _build(RevisitedOxfordParis(str(root)))


def _revisitop_ap(ranking: list[int], positives: list[int], junk: list[int]) -> float:
    """revisitop ``compute_ap`` (trapezoid) on a ranking with the junk items taken out."""
    kept = [g for g in ranking if g not in set(junk)]
    ranks = [i for i, g in enumerate(kept) if g in set(positives)]
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / (2.0 * len(positives))
    return ap


@pytest.mark.parametrize("protocol", ["easy", "hard"])
def test_oxford_end_to_end_revisited_map(tmp_path: Path, protocol: str) -> None:
    """``lit test`` path (evaluator + pixel descriptor) against a numpy revisitop reference."""
    import pytorch_lightning as pl

    from models.descriptor_config import DescriptorConfig
    from models.registry import build_descriptor
    from models.retrieval import RetrievalEvaluator

    module = RevisitedOxfordParis(str(_oxford(tmp_path / "ox")), protocol=protocol, batch_size=2)  # type: ignore[arg-type]
    model = RetrievalEvaluator(descriptor=DescriptorConfig("pixel", input_size=8), ap="revisited", ks=[1])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning):
        trainer.test(model, datamodule=module, verbose=False)
    rs = module.retrieval_set
    descriptor = build_descriptor("pixel", input_size=8)
    with torch.no_grad():
        queries = torch.cat([descriptor([rs.queries[q]["image"]]) for q in range(len(rs.queries))])
        gallery = torch.cat([descriptor([rs.gallery[g]["image"]]) for g in range(len(rs.gallery))])
    scores = cosine_scores(queries, gallery)
    aps = [
        _revisitop_ap(list(np.lexsort((np.arange(len(row)), -row))), rs.positives[q], rs.junk[q])  # type: ignore[index]
        for q, row in enumerate(scores)
    ]
    assert model.results["mAP"] == pytest.approx(float(np.mean(aps)), abs=1e-6)


# ---------------------------------------------------------------- CUB-200-2011
CUB_IMAGES = [  # (image id, class id, relative path)
    (1, 1, "001.A/a1.jpg"), (2, 1, "001.A/a2.jpg"),
    (3, 101, "101.B/b1.jpg"), (4, 101, "101.B/b2.jpg"), (5, 101, "101.B/b3.jpg"),
    (6, 102, "102.C/c1.jpg"),
    (7, 150, "150.D/d1.jpg"), (8, 150, "150.D/d2.jpg"),
]


def _cub(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, _, p in CUB_IMAGES))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in CUB_IMAGES))
    (root / "classes.txt").write_text("".join(f"{c} {c:03d}.bird\n" for c in sorted({c for _, c, _ in CUB_IMAGES})))
    for i, _, p in CUB_IMAGES:
        _write_image(root / "images" / p, seed=i)
    return root


@pytest.mark.parametrize("split", ["test", "train", "all"])
def test_cub_splits_and_ground_truth(tmp_path: Path, split: str) -> None:
    root = _cub(tmp_path / "CUB_200_2011")
    with pytest.warns(UserWarning):  # counts differ from the official release (and singletons)
        rs = _build(CUB200DataModule(str(root), split=split))  # type: ignore[arg-type]
    span = {"test": range(101, 201), "train": range(1, 101), "all": range(1, 201)}[split]
    chosen = [(c, p) for _, c, p in CUB_IMAGES if c in span]
    assert _gallery_paths(rs) == [Path(p).name for _, p in chosen]
    queries, positives = _brute_force_class_truth([c for c, _ in chosen])
    assert rs.query_in_gallery == queries and rs.positives == positives


def test_cub_missing_files_named(tmp_path: Path) -> None:
    root = _cub(tmp_path / "data" / "CUB_200_2011")
    with pytest.raises(DatasetLayoutError, match=r"images\.txt, image_class_labels\.txt, classes\.txt not found.*did you mean"):
        _build(CUB200DataModule(str(tmp_path / "data")))
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"CUB-200-2011: classes\.txt not found"):
        _build(CUB200DataModule(str(root)))


@pytest.mark.filterwarnings("ignore:CUB-200-2011.*official release")
def test_cub_incomplete_or_malformed(tmp_path: Path) -> None:
    root = _cub(tmp_path / "cub")
    (root / "images" / "101.B" / "b2.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 6 image files listed in images\.txt are missing.*101\.B/b2\.jpg"):
        _build(CUB200DataModule(str(root)))
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n")
    with pytest.raises(DatasetLayoutError, match=r"6 image ids of images\.txt have no line in image_class_labels\.txt: 3, 4, 5, 6, 7, \.\.\."):
        _build(CUB200DataModule(str(root)))
    (root / "images.txt").write_text("1 001.A/a1.jpg\nbroken\n")
    with pytest.raises(DatasetLayoutError, match=r"images\.txt line 2 is not '<integer id> <value>'"):
        _build(CUB200DataModule(str(root)))


# ---------------------------------------------------------------- GPR1200
GPR_FILES = ["0_a.jpg", "0_b.jpg", "2_x.jpg", "2_y.jpg", "10_k.jpg", "10_j.jpg"]


def _gpr(folder: Path, names: Sequence[str] = GPR_FILES) -> Path:
    for seed, name in enumerate(names):
        _write_image(folder / name, seed)
    return folder


@pytest.mark.parametrize("nested", [False, True])
def test_gpr1200_ground_truth(tmp_path: Path, nested: bool) -> None:
    folder = _gpr(tmp_path / "gpr" / "images" if nested else tmp_path / "gpr")
    rs = _build(GPR1200DataModule(str(tmp_path / "gpr"), num_classes=3, images_per_class=2))
    assert _gallery_paths(rs) == ["0_a.jpg", "0_b.jpg", "2_x.jpg", "2_y.jpg", "10_j.jpg", "10_k.jpg"]
    labels = [int(n.split("_")[0]) for n in _gallery_paths(rs)]
    queries, positives = _brute_force_class_truth(labels)
    assert rs.query_in_gallery == queries and rs.positives == positives
    assert folder.is_dir()


def test_gpr1200_counts_and_names_checked(tmp_path: Path) -> None:
    folder = _gpr(tmp_path / "gpr")
    with pytest.raises(DatasetLayoutError, match=r"has 6 images; 3 classes instead of 1200; 3 classes without exactly 10 images: 0 \(2\), 2 \(2\), 10 \(2\)"):
        _build(GPR1200DataModule(str(folder)))
    _write_image(folder / "10_extra.jpg", seed=9)
    with pytest.raises(DatasetLayoutError, match=r"1 classes without exactly 2 images: 10 \(3\)"):
        _build(GPR1200DataModule(str(folder), num_classes=3, images_per_class=2))
    _write_image(folder / "cat.jpg", seed=9)
    with pytest.raises(DatasetLayoutError, match=r"1 of 8 image files .* are not named <class id>_<name>: cat\.jpg"):
        _build(GPR1200DataModule(str(folder), num_classes=None, images_per_class=None))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no image files in .*it has sub-folders sub"):
        _build(GPR1200DataModule(str(tmp_path / "empty")))


# ---------------------------------------------------------------- INSTRE
INSTRE_LAYOUT = {
    "INSTRE-S1": {"01a_book": 3, "02a_mug": 2},
    "INSTRE-S2": {"01b_bridge": 2},
    "INSTRE-M": {"01_pair": 2, "02_pair": 1},
}


def _instre(root: Path) -> Path:
    seed = 0
    for subset, classes in INSTRE_LAYOUT.items():
        for name, count in classes.items():
            for i in range(count):
                seed += 1
                _write_image(root / subset / name / f"{i:03d}.jpg", seed)
                (root / subset / name / f"{i:03d}.txt").write_text("1 1 10 10\n")  # bbox files are ignored
    return root


def test_instre_ground_truth_and_subsets(tmp_path: Path) -> None:
    root = _instre(tmp_path / "INSTRE")
    with pytest.warns(UserWarning, match="single image"):
        rs = _build(INSTREDataModule(str(root), check_counts=False))
    labels = [f"{s}/{c}" for s, classes in INSTRE_LAYOUT.items() for c, n in sorted(classes.items()) for _ in range(n)]
    queries, positives = _brute_force_class_truth(labels)
    assert len(rs.gallery) == 10 and rs.query_in_gallery == queries and rs.positives == positives
    rs = _build(INSTREDataModule(str(root), subsets=["INSTRE-S2"], check_counts=False))
    assert [Path(p).parent.name for p in rs.gallery.paths] == ["01b_bridge", "01b_bridge"]  # type: ignore[attr-defined]


def test_instre_layout_errors(tmp_path: Path) -> None:
    root = _instre(tmp_path / "data" / "INSTRE")
    with pytest.raises(DatasetLayoutError, match=r"INSTRE-S1 has 2 class folders; the release has 100"):
        _build(INSTREDataModule(str(root)))
    with pytest.raises(DatasetLayoutError, match=r"subset folder\(s\) INSTRE-S1, INSTRE-S2, INSTRE-M not found.*did you mean root="):
        _build(INSTREDataModule(str(tmp_path / "data")))
    (root / "INSTRE-S2" / "03_empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="1 class folder.* of INSTRE-S2 hold no images: 03_empty"):
        _build(INSTREDataModule(str(root), check_counts=False))
    with pytest.raises(ValueError, match="subsets must be"):
        INSTREDataModule(str(root), subsets=["INSTRE-X"])  # type: ignore[list-item]
