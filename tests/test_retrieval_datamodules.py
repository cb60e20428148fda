"""Tests for the retrieval set, collate function and the three retrieval datamodules."""

from __future__ import annotations

import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.procedural import ProceduralScenes
from datamodules.retrieval import (
    FolderRetrievalDataModule,
    ImageFileDataset,
    ListRetrievalDataModule,
    ProceduralRetrievalDataModule,
    RetrievalDataModule,
    RetrievalSet,
    collate_images,
)
from lit.io import ImageSkipWarning


class _Sized(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def path(self, index: int) -> str:
        return f"item{index}"

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.zeros(3, 2, 2), "index": index, "path": self.path(index)}


def _write(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _all_batches(loader) -> list[dict]:
    return list(loader)


# ---------------------------------------------------------------- RetrievalSet


def test_retrieval_set_accepts_valid_ground_truth() -> None:
    rs = RetrievalSet(_Sized(2), _Sized(4), positives=[[1, 2], [3]], junk=[[0], []], query_in_gallery=[0, -1])
    assert rs.num_positives.tolist() == [2, 1] and rs.num_positives.dtype == torch.int64
    assert rs.exclude.tolist() == [0, -1]
    assert RetrievalSet(_Sized(1), _Sized(1), positives=[[0]]).exclude.tolist() == [-1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"positives": [[0], []]}, "query #1 .*item1.* has no positives"),
        ({"positives": [[0], [4]]}, "positives of query #1.*\\[4\\].*outside 0..3"),
        ({"positives": [[0]]}, "positives has 1 entries but there are 2 queries"),
        ({"positives": [[0, 0], [1]]}, "repeated gallery rows \\[0\\]"),
        ({"positives": [[0], [1]], "junk": [[0], []]}, "query #0.*both positive and junk"),
        ({"positives": [[0], [1]], "query_in_gallery": [0, -1]}, "query #0.*own gallery row 0"),
        ({"positives": [[0], [1]], "query_in_gallery": [5, -1]}, "query_in_gallery row 5"),
    ],
)
def test_retrieval_set_rejects_bad_ground_truth(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetrievalSet(_Sized(2), _Sized(4), **kwargs)


# ---------------------------------------------------------------- collate


def test_collate_stacks_equal_sizes() -> None:
    batch = collate_images([{"image": torch.rand(3, 4, 5), "index": i, "path": f"p{i}"} for i in (3, 1)])
    assert batch["image"].shape == (2, 3, 4, 5)
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [3, 1]
    assert batch["path"] == ["p3", "p1"] and batch["skipped"] == []


def test_collate_keeps_mixed_sizes_as_list_and_drops_failures() -> None:
    items = [
        {"image": torch.rand(3, 4, 5), "index": 0, "path": "a.jpg"},
        {"image": None, "index": 1, "path": "broken.jpg"},
        {"image": torch.rand(3, 6, 2), "index": 2, "path": "c.jpg"},
    ]
    batch = collate_images(items)
    assert isinstance(batch["image"], list) and [tuple(x.shape) for x in batch["image"]] == [(3, 4, 5), (3, 6, 2)]
    assert batch["image"][1] is items[2]["image"]
    assert batch["index"].tolist() == [0, 2] and batch["index"].dtype == torch.int64
    assert batch["path"] == ["a.jpg", "c.jpg"] and batch["skipped"] == ["broken.jpg"]


def test_collate_all_failed_and_extra_keys() -> None:
    empty = collate_images([{"image": None, "index": 4, "path": "x.png"}])
    assert empty["image"].shape[0] == 0 and empty["index"].numel() == 0 and empty["skipped"] == ["x.png"]
    masks = collate_images([{"image": torch.rand(3, 2, 2), "mask": torch.zeros(2, 2), "index": i, "path": ""} for i in range(3)])
    assert masks["mask"].shape == (3, 2, 2)


# ---------------------------------------------------------------- base datamodule


class _Counting(RetrievalDataModule):
    def __init__(self, batch_size: int = 2) -> None:
        super().__init__(batch_size=batch_size)
        self.builds = 0

    def build(self) -> RetrievalSet:
        self.builds += 1
        return RetrievalSet(_Sized(3), _Sized(5), positives=[[0], [1], [2]])


def test_setup_builds_once_and_loaders_do_not_shuffle() -> None:
    dm = _Counting()
    with pytest.raises(RuntimeError, match="setup"):
        dm.retrieval_set
    dm.setup("test")
    dm.setup("predict")
    assert dm.builds == 1
    for loaders in (dm.test_dataloader(), dm.predict_dataloader()):
        queries, gallery = loaders
        assert torch.cat([b["index"] for b in queries]).tolist() == [0, 1, 2]
        assert torch.cat([b["index"] for b in gallery]).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size"):
        _Counting(batch_size=0)


# ---------------------------------------------------------------- folder


def _folder_tree(root: Path) -> None:
    _write(root / "cats" / "1.jpg", (250, 0, 0))
    _write(root / "cats" / "nested" / "2.png", (240, 10, 0))
    _write(root / "cats" / "3.PNG", (230, 20, 0), size=(7, 9))
    _write(root / "dogs" / "a.png", (0, 250, 0))
    (root / "dogs" / "b.png").write_bytes(b"")  # a broken image: becomes a counted skip
    _write(root / "lonely" / "only.png", (0, 0, 250))
    (root / "empty").mkdir()
    (root / "cats" / "readme.txt").write_text("not an image")
    _write(root / "loose.png", (9, 9, 9))


def test_folder_ground_truth(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    dm = FolderRetrievalDataModule(root=str(tmp_path), batch_size=4)
    with pytest.warns(UserWarning) as record:
        dm.setup()
    messages = " | ".join(str(w.message) for w in record)
    assert "1 class(es)" in messages and "distractors" in messages and "1 image(s) directly under" in messages
    rs = dm.retrieval_set
    gallery = [Path(p).relative_to(tmp_path).as_posix() for p in rs.gallery.paths]
    assert gallery == ["cats/1.jpg", "cats/3.PNG", "cats/nested/2.png", "dogs/a.png", "dogs/b.png", "lonely/only.png"]
    queries = [Path(p).relative_to(tmp_path).as_posix() for p in rs.queries.paths]
    assert queries == gallery[:5]  # the single-image class gives no query
    assert dm.class_names == ["cats", "dogs", "lonely"]
    # independent ground truth: same top-level folder, different file
    for q, query in enumerate(queries):
        expected = [g for g, other in enumerate(gallery) if other.split("/")[0] == query.split("/")[0] and other != query]
        assert rs.positives[q] == expected
        assert rs.query_in_gallery[q] == gallery.index(query)
    assert dm.hparams["root"] == str(tmp_path) and dm.hparams["batch_size"] == 4


def test_folder_loader_reports_broken_file(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    dm = FolderRetrievalDataModule(root=str(tmp_path), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup()
    _, gallery_loader = dm.test_dataloader()
    with pytest.warns(ImageSkipWarning, match=re.escape("b.png")):
        batches = _all_batches(gallery_loader)
    assert [b["skipped"] for b in batches] == [[], [str(tmp_path / "dogs" / "b.png")]]
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2, 3, 5]
    assert isinstance(batches[0]["image"], list)  # 12x10 and 7x9 images in one batch
    assert torch.allclose(batches[1]["image"][0][:, 0, 0], torch.tensor([0.0, 0.0, 250 / 255]))  # lonely/only.png


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent"):
        FolderRetrievalDataModule(root=str(tmp_path / "absent")).setup()
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        FolderRetrievalDataModule(root=str(tmp_path / "empty")).setup()
    _write(tmp_path / "singles" / "a" / "1.png", (1, 2, 3))
    _write(tmp_path / "singles" / "b" / "1.png", (1, 2, 3))
    with pytest.raises(ValueError, match="no queries"), pytest.warns(UserWarning, match="2 class"):
        FolderRetrievalDataModule(root=str(tmp_path / "singles")).setup()


# ---------------------------------------------------------------- list


def _list_files(tmp_path: Path) -> Path:
    for i in range(2):
        _write(tmp_path / "q" / f"{i}.png", (i * 100, 0, 0))
    for i in range(4):
        _write(tmp_path / "g" / f"{i}.png", (0, i * 60, 0))
    return tmp_path


def test_list_ground_truth_relative_to_json_folder(tmp_path: Path) -> None:
    _list_files(tmp_path)
    truth = {
        "queries": ["q/0.png", "g/3.png"],
        "gallery": ["g/0.png", "g/1.png", "g/2.png", "g/3.png"],
        "positives": [[1], [0, 2]],
        "junk": [[2], []],
    }
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    dm = ListRetrievalDataModule(ground_truth=str(tmp_path / "truth.json"), batch_size=8)
    dm.setup()
    rs = dm.retrieval_set
    assert rs.positives == [[1], [0, 2]] and rs.junk == [[2], []]
    assert rs.query_in_gallery == [-1, 3]  # the second query is gallery row 3
    queries, gallery = (next(iter(loader)) for loader in dm.test_dataloader())
    assert queries["image"].shape == (2, 3, 10, 12) and gallery["image"].shape == (4, 3, 10, 12)
    assert torch.allclose(gallery["image"][2, 1], torch.full((10, 12), 120 / 255))


def test_list_explicit_root(tmp_path: Path) -> None:
    _list_files(tmp_path / "images")
    (tmp_path / "meta").mkdir()
    truth = {"queries": ["q/1.png"], "gallery": ["g/0.png", "g/1.png"], "positives": [[0]]}
    (tmp_path / "meta" / "t.json").write_text(json.dumps(truth))
    dm = ListRetrievalDataModule(str(tmp_path / "meta" / "t.json"), root=str(tmp_path / "images"))
    dm.setup()
    assert dm.retrieval_set.queries.paths == [str(tmp_path / "images" / "q" / "1.png")]
    assert dm.retrieval_set.junk is None


def test_list_errors(tmp_path: Path) -> None:
    _list_files(tmp_path)
    path = tmp_path / "t.json"
    with pytest.raises(FileNotFoundError, match="ground-truth file not found"):
        ListRetrievalDataModule(str(path)).setup()
    path.write_text(json.dumps({"queries": ["q/0.png"]}))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['gallery', 'positives'\]"):
        ListRetrievalDataModule(str(path)).setup()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        ListRetrievalDataModule(str(path)).setup()
    missing = {"queries": ["q/0.png", "q/9.png"], "gallery": [f"g/{i}.png" for i in range(9)], "positives": [[0], [1]]}
    path.write_text(json.dumps(missing))
    with pytest.raises(FileNotFoundError, match=r"6 of 11 image file\(s\).*q/9.png, g/4.png, g/5.png, g/6.png, g/7.png, \.\.\."):
        ListRetrievalDataModule(str(path)).setup()
    bad_rows = {"queries": ["q/0.png"], "gallery": ["g/0.png"], "positives": [[3]]}
    path.write_text(json.dumps(bad_rows))
    with pytest.raises(ValueError, match="q/0.png.*outside 0..0"):
        ListRetrievalDataModule(str(path)).setup()
    path.write_text(json.dumps({**bad_rows, "positives": [["g/0.png"]]}))
    with pytest.raises(ValueError, match="'positives' must be a list"):
        ListRetrievalDataModule(str(path)).setup()


# ---------------------------------------------------------------- procedural


def test_procedural_retrieval_set_is_deterministic_and_well_formed() -> None:
    sets = []
    for _ in range(2):
        dm = ProceduralRetrievalDataModule(num_queries=3, copies_per_query=2, num_distractors=2, image_size=32, batch_size=4)
        dm.setup()
        sets.append(dm.retrieval_set)
    first, second = sets
    assert first.positives == [[0, 1], [2, 3], [4, 5]] and first.query_in_gallery is None
    assert len(first.queries) == 3 and len(first.gallery) == 8
    for row in range(8):
        assert torch.equal(first.gallery[row]["image"], second.gallery[row]["image"])
    assert isinstance(first.queries, ProceduralScenes)
    query = first.queries[1]["image"]
    copies = [first.gallery[r]["image"] for r in (2, 3)]
    assert all(c.shape == (3, 32, 32) and 0 <= float(c.min()) and float(c.max()) <= 1 for c in copies)
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[0], query)
    distractors = [first.gallery[r]["image"] for r in (6, 7)]
    queries = [first.queries[q]["image"] for q in range(3)]
    assert all(not torch.equal(d, q) for d in distractors for q in queries)
    assert first.gallery[2]["path"] == "procedural://0/1#copy0"
    other = ProceduralRetrievalDataModule(num_queries=3, copies_per_query=2, num_distractors=2, image_size=32, seed=1)
    other.setup()
    assert not torch.equal(other.retrieval_set.gallery[0]["image"], first.gallery[0]["image"])


def test_procedural_copies_are_identical_in_worker_processes() -> None:
    dm = ProceduralRetrievalDataModule(num_queries=2, copies_per_query=2, num_distractors=1, image_size=24, batch_size=5, num_workers=1)
    dm.setup()
    _, gallery_loader = dm.test_dataloader()
    (batch,) = list(gallery_loader)
    expected = torch.stack([dm.retrieval_set.gallery[r]["image"] for r in range(5)])
    assert torch.equal(batch["image"], expected) and batch["index"].tolist() == [0, 1, 2, 3, 4]


def test_procedural_argument_checks() -> None:
    with pytest.raises(ValueError, match="copies_per_query"):
        ProceduralRetrievalDataModule(copies_per_query=0)


def test_image_file_dataset_items(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", (0, 0, 0))
    dataset = ImageFileDataset([tmp_path / "a.png"])
    item = dataset[0]
    assert item["index"] == 0 and item["path"] == str(tmp_path / "a.png") and item["image"].shape == (3, 10, 12)


def test_folder_strict_stops_at_the_broken_file_naming_it(tmp_path: Path) -> None:
    from lit.commands.lightning_cli import LitCLI
    from lit.io import ImageLoadError

    _folder_tree(tmp_path)
    cli = LitCLI(args=["--model=models.retrieval.RetrievalEvaluator",
                       "--data=datamodules.retrieval.FolderRetrievalDataModule", f"--data.root={tmp_path}",
                       "--data.strict=true", "--data.batch_size=4"], run=False)
    dm = cli.datamodule
    assert dm.strict is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup()
    _, gallery_loader = dm.test_dataloader()
    with pytest.raises(ImageLoadError, match=re.escape(str(tmp_path / "dogs" / "b.png"))):
        _all_batches(gallery_loader)


def _reads_images(cls: type) -> bool:
    return "root" in inspect.signature(cls).parameters or "ground_truth" in inspect.signature(cls).parameters


def test_every_datamodule_that_reads_images_has_a_strict_option() -> None:
    import importlib
    import pkgutil

    import pytorch_lightning as pl

    import datamodules

    found = []
    for module in pkgutil.walk_packages(datamodules.__path__, prefix="datamodules."):
        loaded = importlib.import_module(module.name)
        for value in vars(loaded).values():
            if (isinstance(value, type) and issubclass(value, pl.LightningDataModule)
                    and value.__module__ == loaded.__name__ and not inspect.isabstract(value) and _reads_images(value)):
                found.append(value.__name__)
                assert inspect.signature(value).parameters["strict"].default is False, value.__name__
    assert {"FolderRetrievalDataModule", "ListRetrievalDataModule", "CUB200DataModule", "GPR1200DataModule",
            "INSTREDataModule", "RevisitedOxfordParis", "CutmixDataModule", "SegmixDataModule",
            "OutpaintingDataModule", "ImageFolderTrainData"} <= set(found)
