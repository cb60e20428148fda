"""datamodules.captioned and its pieces: sources, scene captions, controlled duplication, caption
mitigations, DDP slicing, exact resume and the training records."""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
from collections import Counter
from itertools import accumulate
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from datamodules.caption_draws import (
    CaptionDraws,
    CaptionPolicy,
    duplicated_count,
    duplicated_rows,
)
from datamodules.caption_sources import safe_keys
from datamodules.captioned import CaptionedImageDataModule
from datamodules.procedural import ObjectSpec, draw_scene
from datamodules.samplers import WeightedResumableSampler
from datamodules.scene_captions import (
    colour_name,
    relation,
    scene_captions,
    seed_captions,
)
from datamodules.training_records import CAPTION_COLUMNS
from lit.errors import UserError
from lit.io import ImageLoadError
from lit.seeding import derive_seed
from tests.test_extract import write_tar
from tests.test_resume import Kill


def procedural(**overrides: object) -> CaptionedImageDataModule:
    options: dict[str, object] = {"procedural": 12, "resolution": 16, "batch_size": 4, "draw_seed": 5}
    return CaptionedImageDataModule(**{**options, **overrides})  # type: ignore[arg-type]


def within(count: int, trials: int, probability: float, sigmas: float = 4.0) -> bool:
    """Whether ``count`` successes in ``trials`` lie within ``sigmas`` binomial standard deviations."""
    return abs(count - trials * probability) <= sigmas * math.sqrt(trials * probability * (1 - probability))


def reference_draws(weights: list[float], count: int, seed: int) -> list[int]:
    """Weighted draws with replacement written independently (bisect over Python sums)."""
    uniforms = torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).tolist()
    cumulative = list(accumulate(weights))
    return [min(bisect.bisect_right(cumulative, u * cumulative[-1]), len(weights) - 1) for u in uniforms]


# ------------------------------------------------------------------ controlled duplication, sampler


def test_duplicated_images_are_a_seeded_choice_of_the_fraction() -> None:
    keys = [f"k{i}" for i in range(40)]
    chosen = duplicated_rows(keys, 0.05, seed=3)
    assert sum(chosen) == 2 == duplicated_count(40, 0.05)
    assert chosen == duplicated_rows(keys, 0.05, seed=3) and chosen != duplicated_rows(keys, 0.05, seed=4)
    reordered = list(reversed(keys))  # the choice follows the keys, not the order they are listed in
    assert {k for k, d in zip(reordered, duplicated_rows(reordered, 0.05, 3)) if d} == {
        k for k, d in zip(keys, chosen) if d}
    assert duplicated_count(16, 0.01) == 1 and duplicated_count(16, 0.0) == 0 and duplicated_count(10, 0.25) == 3
    with pytest.raises(UserError, match="dup_fraction"):
        duplicated_count(10, 1.5)


def test_duplication_weights_are_exact_and_seeded_over_epochs() -> None:
    data = procedural(procedural=40, dup_fraction=0.1, dup_weight=5, repeats=50, draw_seed=11)
    data.prepare_images()
    dup = data.draws.duplicated
    assert sum(dup) == 4 and data.weights == [5.0 if d else 1.0 for d in dup]
    assert data.epoch_draws == 50 * (36 + 4 * 5)  # an epoch: repeats x the sum of the weights
    sampler = data.train_sampler(data.train_dataset(), 11, 1, 0)
    counts: Counter[int] = Counter()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        rows = [row for row, _, _ in sampler]
        # the exact draws: an independent implementation of the same seeded weighted draw
        assert rows == reference_draws(data.weights, data.epoch_draws, derive_seed(11, epoch))
        counts.update(rows)
    again = data.train_sampler(data.train_dataset(), 11, 1, 0)
    again.set_epoch(2)
    assert [row for row, _, _ in again] == rows  # a fresh sampler reproduces the epoch
    total = 3 * data.epoch_draws
    dup_draws = sum(counts[row] for row in range(40) if dup[row])
    assert within(dup_draws, total, 20 / 56)  # 4 images of weight 5 among a total weight of 56
    ratio = (dup_draws / 4) / ((total - dup_draws) / 36)
    assert 4.25 < ratio < 5.75  # duplicated images are drawn dup_weight times as often
    assert all(within(counts[row], total, (5 if dup[row] else 1) / 56, 4.5) for row in range(40))


def test_ddp_ranks_slice_the_one_process_sequence() -> None:
    sampler = WeightedResumableSampler([3.0, 1.0, 1.0, 2.0], length=11, seed=4)
    sampler.set_epoch(1)
    single = list(sampler)
    assert [index for _, index, _ in single] == list(range(11, 22))  # epoch * length + position
    shards = []
    for rank in range(2):
        shard = WeightedResumableSampler([3.0, 1.0, 1.0, 2.0], length=11, seed=4, num_replicas=2, rank=rank)
        shard.set_epoch(1)
        shards.append(list(shard))
        assert len(shard) == 6
    merged = [item for pair in zip(*shards) for item in pair]
    assert merged[:11] == single  # rank r takes positions r, r + 2, ...: the global sequence
    assert merged[11] == single[0]  # the padding repeats the first draw: same row, index and seed


def test_ddp_batches_equal_one_process_batches() -> None:
    data = procedural(dup_fraction=0.25, dup_weight=3, dup_caption="varied", procedural_captions=4,
                      token_addition=0.5)
    dataset = data.train_dataset()
    single = [dataset[item] for item in data.train_sampler(dataset, 5, 1, 0)]
    ranks = [[dataset[item] for item in data.train_sampler(dataset, 5, 2, rank)] for rank in range(2)]
    merged = {item["index"]: item for shard in ranks for item in shard}
    assert sorted(merged) == [item["index"] for item in single]
    for item in single:
        other = merged[item["index"]]
        assert other["caption"] == item["caption"] and other["key"] == item["key"]
        assert torch.equal(other["image"], item["image"])


def test_sampler_resumes_mid_epoch() -> None:
    sampler = WeightedResumableSampler([1.0, 4.0, 2.0], length=9, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.resume(3, 4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the offset applies once
    with pytest.raises(ValueError, match="weights"):
        WeightedResumableSampler([0.0, 0.0], length=3)


# ------------------------------------------------------------------ captions of a draw


CAPTIONS = [["a red circle", "a crimson disc", "one red round shape"], ["a blue square", "an azure box"],
            ["a green star"], ["a yellow ring", "a golden hoop", "a ring of yellow", "a yellow loop"]]


def draws_of(policy: CaptionPolicy, duplicated: list[bool] | None = None) -> CaptionDraws:
    return CaptionDraws(CAPTIONS, duplicated or [True, False, False, True], policy)


def drawn(draws: CaptionDraws, row: int, count: int = 800) -> list:
    return [draws.draw(row, derive_seed(9, row, n)) for n in range(count)]


def test_same_caption_keeps_the_first_and_varied_draws_among_all() -> None:
    same = draws_of(CaptionPolicy(dup_caption="same"))
    assert {d.text for row in range(4) for d in drawn(same, row, 50)} == {texts[0] for texts in CAPTIONS}
    varied = draws_of(CaptionPolicy(dup_caption="varied"))
    texts = Counter(d.text for d in drawn(varied, 3))
    assert set(texts) == set(CAPTIONS[3]) and all(within(n, 800, 1 / 4) for n in texts.values())
    assert {d.text for d in drawn(varied, 1, 50)} == {"a blue square"}  # a unique image keeps its caption
    assert varied.pool(0) == tuple(CAPTIONS[0]) and varied.pool(1) == ("a blue square",)


def test_several_captions_per_image_for_every_image() -> None:
    draws = draws_of(CaptionPolicy(captions_per_image=2))
    assert {d.text for d in drawn(draws, 1, 100)} == set(CAPTIONS[1])
    assert {d.text for d in drawn(draws, 3, 100)} == set(CAPTIONS[3][:2])
    assert draws.pool(2) == ("a green star",)
    every = draws_of(CaptionPolicy(captions_per_image=None))
    assert every.pool(3) == tuple(CAPTIONS[3]) and every.pool(1) == tuple(CAPTIONS[1])


def test_replacement_rate_matches_its_probability() -> None:
    draws = draws_of(CaptionPolicy(replacement=0.3, replacement_words=4))
    results = drawn(draws, 1, 3000)
    replaced = [d for d in results if "replaced" in d.changes]
    assert within(len(replaced), 3000, 0.3)
    assert all(d.text == "a blue square" for d in results if not d.changes)
    assert all(len(d.text.split()) == 4 and set(d.text.split()) <= set(draws.vocabulary) for d in replaced)
    from_set = draws_of(CaptionPolicy(replacement=0.5, replacement_source="dataset_caption"))
    replaced = [d.text for d in drawn(from_set, 2, 2000) if d.changes]
    assert within(len(replaced), 2000, 0.5)
    assert set(replaced) == {text for texts in CAPTIONS for text in texts}  # any caption of the set


def test_token_addition_adds_count_vocabulary_words() -> None:
    draws = draws_of(CaptionPolicy(token_addition=0.4, token_addition_count=3))
    results = drawn(draws, 0, 2000)
    added = [d for d in results if d.changes == ("added 3",)]
    assert within(len(added), 2000, 0.4) and len(added) + sum(not d.changes for d in results) == 2000
    for d in added:
        extra = Counter(d.text.split()) - Counter(["a", "red", "circle"])
        assert len(d.text.split()) == 6 and sum(extra.values()) == 3 and set(extra) <= set(draws.vocabulary)


def test_word_repetition_repeats_the_captions_words() -> None:
    draws = draws_of(CaptionPolicy(word_repetition=0.25, word_repetition_count=2))
    results = drawn(draws, 3, 2000)
    repeated = [d for d in results if d.changes]
    assert within(len(repeated), 2000, 0.25)
    for d in repeated:
        extra = Counter(d.text.split()) - Counter(["a", "yellow", "ring"])
        assert len(d.text.split()) == 5 and sum(extra.values()) == 2 and set(extra) <= {"a", "yellow", "ring"}


def test_mitigations_draw_independently_and_reproducibly() -> None:
    alone = draws_of(CaptionPolicy(token_addition=0.5))
    both = draws_of(CaptionPolicy(token_addition=0.5, captions_per_image=None))
    seeds = [derive_seed(1, n) for n in range(200)]
    # switching another option on leaves the addition draws as they were
    assert [("added 2" in alone.draw(0, s).changes) for s in seeds] == [
        ("added 2" in both.draw(0, s).changes) for s in seeds]
    assert [alone.draw(0, s) for s in seeds] == [alone.draw(0, s) for s in seeds]
    with pytest.raises(UserError, match="probability"):
        CaptionPolicy(replacement=1.5)
    with pytest.raises(UserError, match="dup_caption"):
        CaptionPolicy(dup_caption="often")  # type: ignore[arg-type]


def test_monitor_pairs_take_both_groups() -> None:
    data = procedural(dup_fraction=0.25, dup_caption="varied", procedural_captions=3)
    pairs = data.monitor_pairs(7, seed=1)
    assert pairs == data.monitor_pairs(7, seed=1) and pairs != data.monitor_pairs(7, seed=2)
    assert [dup for _, _, dup in pairs] == [True] * 3 + [False] * 4
    rows = {key: row for row, key in enumerate(data.keys)}
    for key, caption, dup in pairs:
        assert data.draws.duplicated[rows[key]] == dup and caption in data.draws.pool(rows[key])
    assert len({key for key, _, dup in pairs if dup}) == 3  # 3 duplicated images, each once
    unique_only = procedural().monitor_pairs(5, seed=1)
    assert len(unique_only) == 5 and not any(dup for _, _, dup in unique_only)


# ------------------------------------------------------------------ procedural captions, batches


def test_scene_captions_come_from_the_scene_parameters() -> None:
    assert [colour_name(c) for c in [(1, 0, 0), (0, 0, 1), (0.1, 0.8, 0.1), (0.05, 0.05, 0.05), (0.9, 0.9, 0.9),
                                     (0.5, 0.5, 0.5), (0.4, 0.2, 0.0), (1, 1, 0)]] == [
        "red", "blue", "green", "black", "white", "gray", "brown", "yellow"]
    spec = draw_scene(3, 32).objects[0]
    high = ObjectSpec(**{**spec.__dict__, "centre": (0.5, 0.2)})
    low = ObjectSpec(**{**spec.__dict__, "centre": (0.55, 0.8)})
    assert relation(high, low) == "above" and relation(low, high) == "below"
    scene = draw_scene(7, 64, (2, 2))
    captions = scene_captions(scene, 8)
    assert len(set(captions)) == 8 and captions[:3] == seed_captions(7, 3, (2, 2))
    big = max(range(len(scene.objects)), key=lambda k: scene.areas[k])
    assert colour_name(scene.objects[big].first) in captions[0]
    assert scene_captions(draw_scene(7, 64, (0, 0)))[0].endswith("background")
    with pytest.raises(ValueError, match="count"):
        scene_captions(scene, 9)


def test_procedural_captions_do_not_depend_on_the_resolution() -> None:
    small, large = procedural(procedural_captions=3), procedural(procedural_captions=3, resolution=48)
    small.prepare_images()
    large.prepare_images()
    assert small.draws.captions == large.draws.captions and small.keys == large.keys
    assert len({texts[0] for texts in small.draws.captions}) == 12
    assert small.images[0].shape == (3, 16, 16) and small.images[0].dtype == torch.uint8


def test_batches_follow_the_contract() -> None:
    data = procedural(dup_fraction=0.25, dup_weight=4)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"image", "caption", "key", "index", "duplicated"}
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["duplicated"].dtype == torch.bool and isinstance(batch["caption"], list)
    reference = data.reference_dataset()
    rows = {key: row for row, key in enumerate(data.keys)}
    for image, caption, key, dup in zip(batch["image"], batch["caption"], batch["key"], batch["duplicated"]):
        row = rows[key]
        assert torch.equal(image, reference[row]["image"])  # centre crop, no flip by default
        assert caption == data.draws.captions[row][0] and bool(dup) == data.draws.duplicated[row]


def test_resume_on_other_captions_or_duplication_is_refused() -> None:
    data = procedural(dup_fraction=0.25)
    data.prepare_images()
    state = data.state_dict()
    same = procedural(dup_fraction=0.25)
    same.prepare_images()
    same.load_state_dict(state)
    other = procedural(dup_fraction=0.5)  # the same images, other ones duplicated
    other.prepare_images()
    with pytest.raises(ValueError, match="other captions or other duplicated images"):
        other.load_state_dict(state)


def test_options_fail_in_one_line() -> None:
    with pytest.raises(UserError, match="exactly one of source"):
        CaptionedImageDataModule()
    with pytest.raises(UserError, match="procedural_captions"):
        procedural(procedural_captions=9)
    with pytest.raises(UserError, match="dup_weight"):
        procedural(dup_weight=0)
    with pytest.raises(UserError, match="token_addition"):
        procedural(token_addition=-0.1)
    with pytest.raises(UserError, match="not found"):
        CaptionedImageDataModule(source="/nonexistent/shards/{000..001}.tar").prepare_images()


# ------------------------------------------------------------------ sources and bad images


def _png(path: Path, seed: int, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _encoded(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_folder_with_sidecar_captions_counts_bad_images(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _png(root / "cat.png", 0)
    (root / "cat.txt").write_text("a cat\n\n  a small cat on a mat  \n")
    _png(root / "sub" / "dog.jpg", 1)
    (root / "sub" / "dog.txt").write_text("a dog")
    _png(root / "nocaption.png", 2)
    (root / "broken.png").write_bytes(b"not a png")
    (root / "broken.txt").write_text("broken")
    (root / "notes.txt").write_text("not a caption of anything")
    data = CaptionedImageDataModule(source=str(root), resolution=16, draw_seed=0)
    with pytest.warns(UserWarning, match="2 image"):
        data.setup("fit")
    assert data.keys == ["cat", "sub/dog"]
    assert data.draws.captions == [("a cat", "a small cat on a mat"), ("a dog",)]
    reasons = dict(data.skipped)
    assert reasons[str(root / "nocaption.png")] == "no caption (nocaption.txt missing)"
    assert "not an image" in reasons[str(root / "broken.png")]
    assert data.hparams["skipped_images"] == 2 and data.hparams["training_images"] == 2
    summary = data.write_training_records(tmp_path / "log")
    assert summary["skipped_images"] == 2 and summary["complete"]
    assert "broken.png" in (tmp_path / "log" / "skipped_images.tsv").read_text()
    with pytest.raises(ImageLoadError, match="strict"):
        CaptionedImageDataModule(source=str(root), strict=True).prepare_images()


def test_csv_jsonl_and_tsv_lists(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "img" / "b.png", 1)
    rows = [("a.png", "first of a"), ("img/b.png", "only b"), ("a.png", "second of a"), ("gone.png", "missing"),
            ("a.png", "  ")]
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("file", "caption"), *rows])
    data = CaptionedImageDataModule(source=str(tmp_path / "list.csv"), resolution=16)
    with pytest.warns(UserWarning, match="1 image"):
        data.prepare_images()
    assert data.keys == ["a", "img/b"] and data.draws.captions == [("first of a", "second of a"), ("only b",)]
    assert data.skipped == [(str(tmp_path / "gone.png"), "file not found")]

    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps({"image": f, "text": c}) for f, c in rows[:3]) + "\n")
    data = CaptionedImageDataModule(source=str(tmp_path / "list.jsonl"), resolution=16)
    data.prepare_images()
    assert data.draws.captions == [("first of a", "second of a"), ("only b",)]

    with open(tmp_path / "named.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("img", "desc"), ("a.png", "named columns")])
    data = CaptionedImageDataModule(source=str(tmp_path / "named.csv"), file_column="img", caption_column="desc")
    data.prepare_images()
    assert data.draws.captions == [("named columns",)]
    with pytest.raises(UserError, match="no file column"):
        CaptionedImageDataModule(source=str(tmp_path / "named.csv")).prepare_images()

    (tmp_path / "list.tsv").write_text("path\tcaption\na.png\ttab caption\nimg/b.png\tb tab\n")
    data = CaptionedImageDataModule(source=str(tmp_path / "list.tsv"), resolution=16)
    data.prepare_images()
    assert data.keys == ["a", "img/b"] and data.draws.captions == [("tab caption",), ("b tab",)]


def test_webdataset_shards(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "00000.tar", [
        ("000", {"png": _encoded(0), "txt": b"first caption\nsecond caption"}),
        ("001", {"png": _encoded(1), "json": json.dumps({"caption": ["from json", "again"]}).encode()}),
        ("002", {"png": b"broken", "txt": b"broken image"}),
        ("003", {"png": _encoded(3)}),
        ("004", {"txt": b"no image"}),
    ])
    write_tar(tmp_path / "shards" / "00001.tar", [("100", {"png": _encoded(4), "txt": b"other tar"})])
    for source in (tmp_path / "shards", tmp_path / "shards" / "{00000..00001}.tar"):
        data = CaptionedImageDataModule(source=str(source), resolution=16)
        with pytest.warns(UserWarning, match="3 image"):
            data.prepare_images()
        assert data.keys == ["00000/000", "00000/001", "00001/100"]
        assert data.draws.captions == [("first caption", "second caption"), ("from json", "again"), ("other tar",)]
        assert [reason for _, reason in data.skipped][1:] == ["no caption (.txt or .json)",
                                                              "no image (jpg, jpeg, png, webp)"]
        assert data.sources[0].endswith("00000.tar:000.png")


def test_keys_are_safe_unique_file_names() -> None:
    assert safe_keys(["a.png", "a.jpg", "../x/b c.png", "/abs/d.png", "..png"]) == [
        "a", "a~2", "x/b_c", "abs/d", "image"]


# ------------------------------------------------------------------ training records


def test_training_records(tmp_path: Path) -> None:
    data = procedural(dup_fraction=0.25, dup_weight=5, dup_caption="varied", procedural_captions=3,
                      token_addition=0.5)
    log = tmp_path / "log"
    summary = data.write_training_records(log)
    with open(log / "training_captions.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == CAPTION_COLUMNS
    assert len(rows) == 3 * 3 + 9 * 1  # a duplicated image: its 3 varied captions; a unique one: its first
    for row in rows:
        index = data.keys.index(row["key"])
        dup = data.draws.duplicated[index]
        assert row["copies"] == ("5" if dup else "1") and row["duplicated"] == str(int(dup))
        assert row["caption"] == data.draws.captions[index][int(row["caption_index"])]
        assert float(row["caption_share"]) == pytest.approx(1 / 3 if dup else 1.0, abs=1e-6)
        assert float(row["verbatim_share"]) == pytest.approx(float(row["caption_share"]) / 2, abs=1e-6)
        assert row["file"] == f"training_images/{row['key']}.png"
        stored = torch.from_numpy(np.array(Image.open(log / row["file"]))).permute(2, 0, 1)
        assert torch.equal(stored, data.images[index])
    pngs = sorted(p.name for p in (log / "training_images").glob("*.png"))
    assert pngs == [f"{key}.png" for key in data.keys]
    assert summary["duplicated_images"] == 3 and summary["options"]["dup_weight"] == 5
    assert json.loads((log / "training_records.json").read_text())["files"]["training_captions.csv"]

    fewer = procedural(procedural=5)
    fewer.write_training_records(log)  # a rerun replaces what lit wrote, stale images included
    assert sorted(p.name for p in (log / "training_images").glob("*.png")) == [f"{k}.png" for k in fewer.keys]


def test_training_records_never_replace_a_users_files(tmp_path: Path) -> None:
    data = procedural(procedural=3)
    (tmp_path / "a" / "training_captions.csv").parent.mkdir()
    (tmp_path / "a" / "training_captions.csv").write_text("mine")
    with pytest.raises(UserError, match="not written by lit"):
        data.write_training_records(tmp_path / "a")
    assert (tmp_path / "a" / "training_captions.csv").read_text() == "mine"
    (tmp_path / "b" / "training_images").mkdir(parents=True)
    (tmp_path / "b" / "training_images" / "photo.png").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        data.write_training_records(tmp_path / "b")
    assert (tmp_path / "b" / "training_images" / "photo.png").read_text() == "mine"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "training_records.json").write_text("{}")
    with pytest.raises(UserError, match="not written by lit"):
        data.write_training_records(tmp_path / "c")


# ------------------------------------------------------------------ in a Trainer: records and exact resume


class Recorder(pl.LightningModule):
    """Records the draws it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, str, str]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen += list(zip(batch["index"].tolist(), batch["caption"], batch["key"]))
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, callbacks: list[pl.Callback], ckpt_path: Path | None = None) -> tuple[Recorder, pl.Trainer]:
    model = Recorder()
    every_3 = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                           filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=pl.loggers.CSVLogger(root),
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[every_3, *callbacks])
    data = procedural(dup_fraction=0.25, dup_weight=3, dup_caption="varied", procedural_captions=3,
                      caption_replacement=0.3, word_repetition=0.3)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except RuntimeError as error:
        assert "killed" in str(error)
    return model, trainer


@pytest.mark.filterwarnings("ignore:.*(does not have many workers|smaller than the logging interval|LeafSpec|exists and is not empty).*")
def test_fit_writes_records_and_resumes_exactly(tmp_path: Path) -> None:
    whole, trainer = _fit(tmp_path / "whole", [])  # 18 draws an epoch, batches of 4: epochs of 5 batches
    log = Path(trainer.log_dir)
    assert (log / "training_captions.csv").is_file() and len(list((log / "training_images").glob("*.png"))) == 12
    assert "epoch_draws: 18" in (log / "hparams.yaml").read_text()
    assert [index for index, _, _ in whole.seen[:20]] == list(range(20))  # 18 of epoch 0, then epoch 1's
    killed, _ = _fit(tmp_path / "killed", [Kill(7)])
    assert killed.seen == whole.seen[:len(killed.seen)]
    for step, first in ((3, 12), (6, 22)):  # mid-epoch 0; mid-epoch 1 (5 batches: 18 draws, the last batch of 2)
        resumed, _ = _fit(tmp_path / "killed", [], ckpt_path=tmp_path / "killed" / "ckpt" / f"step={step}.ckpt")
        assert resumed.seen == whole.seen[first:], step  # the captions, keys and draw indices of the straight run
