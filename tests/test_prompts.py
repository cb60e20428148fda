"""Prompt sources (txt, csv, tsv, jsonl, feature stores, webdataset tars), seeded draws and the
word-ablation variants of the paper's Fig. 10 (datamodules/prompts.py)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datamodules.prompts import (
    Prompt,
    PromptRow,
    ablation_prompts,
    ablation_variants,
    draw_prompts,
    prompt_source_summary,
    read_prompt_source,
)
from lit.errors import UserError
from lit.store import StoreWriter
from models.descriptor_config import DescriptorConfig


def _rows(source) -> list[tuple[str, str | None]]:
    return [(row.caption, row.key) for row in source.rows]


def _one_line_error(match: str, path, **columns) -> str:
    with pytest.raises(UserError, match=match) as caught:
        read_prompt_source(path, **columns)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- text files


def test_txt_one_prompt_a_line_blank_lines_counted(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(
        "  A painting of the Great Wave off Kanagawa  \r\n"
        "\n"
        "#hashtag prompt, kept\n"
        "   \t \n"
        "ünïcödé  prompt \u2028 with a line separator\n"
        "\n".encode()
    )
    source = read_prompt_source(path)
    assert source.kind == "txt" and source.path == path.absolute() and source.path.is_absolute()
    assert _rows(source) == [
        ("A painting of the Great Wave off Kanagawa", None),
        ("#hashtag prompt, kept", None),
        ("ünïcödé  prompt \u2028 with a line separator", None),  # inner spacing and Unicode kept
    ]
    assert source.skipped == {"blank line": 3}  # the final newline does not make a fourth
    assert prompt_source_summary(source) == f"read 3 prompts from {path} (txt; 3 blank lines skipped)"


def test_txt_bytes_that_are_not_utf8_skip_their_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\xef\xbb\xbfgood one\nbad \xff\xfe line\nsecond good\n")  # with a byte-order mark
    source = read_prompt_source(path)
    assert _rows(source) == [("good one", None), ("second good", None)]
    assert source.skipped == {"non-UTF-8 row": 1}


# --------------------------------------------------------------------------- tables


def test_csv_columns_found_by_name_and_bad_rows_counted(tmp_path: Path) -> None:
    path = tmp_path / "captions.csv"
    path.write_text(
        "ID,other,Caption\n"
        '7,x,"a cat, sitting"\n'
        "8,y,\n"  # empty caption
        "\n"  # blank line
        "9,z,too,many\n"  # a stray separator: the columns would shift
        '10,w,"two\nlines "\n'  # a quoted newline stays in the prompt
        ",v,no key\n",
        encoding="utf-8",
    )
    source = read_prompt_source(path)
    assert (source.kind, source.caption_column, source.key_column) == ("csv", "Caption", "ID")
    assert _rows(source) == [("a cat, sitting", "7"), ("two\nlines", "10"), ("no key", None)]
    assert source.skipped == {"empty caption": 1, "blank line": 1, "malformed row": 1}
    assert prompt_source_summary(source) == (
        f"read 3 prompts from {path} (csv, caption 'Caption', key 'ID'; "
        "1 empty caption, 1 blank line, 1 malformed row skipped)")


def test_tsv_prefers_caption_over_text_and_key_over_url(tmp_path: Path) -> None:
    path = tmp_path / "laion.tsv"
    path.write_text("url\ttext\tcaption\tkey\nhttp://a\tthe text\tthe caption\tk1\nhttp://b\tt2\tc2\tk2\n")
    source = read_prompt_source(path)
    assert (source.kind, source.caption_column, source.key_column) == ("tsv", "caption", "key")
    assert _rows(source) == [("the caption", "k1"), ("c2", "k2")]
    assert source.skipped == {}
    only_url = tmp_path / "url.tsv"
    only_url.write_text("TEXT\tURL\nhello\thttp://a\n")
    assert _rows(read_prompt_source(only_url)) == [("hello", "http://a")]


def test_explicit_columns_override_and_missing_ones_name_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("image_name,description,caption\nimg1.png,a red barn,ignored\n")
    source = read_prompt_source(path, caption_column="description", key_column="IMAGE_NAME")
    assert (source.caption_column, source.key_column) == ("description", "image_name")
    assert _rows(source) == [("a red barn", "img1.png")]
    message = _one_line_error("no caption column 'prompt'", path, caption_column="prompt")
    assert str(path) in message and "'image_name', 'description', 'caption'" in message
    _one_line_error("no key column 'id'", path, key_column="id")
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("a,b\n1,2\n")
    message = _one_line_error("has no caption column", nothing)
    assert "caption, text, prompt" in message and "'a', 'b'" in message


def test_jsonl_malformed_lines_counted_by_reason(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt": " a fox ", "id": 7}),
        "{not json",
        "[1, 2]",
        "",
        json.dumps({"prompt": "", "id": 8}),
        json.dumps({"id": 9}),
        json.dumps({"prompt": 3.5, "id": 10}),
        json.dumps({"prompt": "日本の城", "id": None}, ensure_ascii=False),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = read_prompt_source(path)
    assert (source.kind, source.caption_column, source.key_column) == ("jsonl", "prompt", "id")
    assert _rows(source) == [("a fox", "7"), ("日本の城", None)]
    assert source.skipped == {"bad JSON line": 1, "non-object JSON line": 1, "blank line": 1,
                              "empty caption": 1, "missing caption": 1, "non-text caption": 1}
    message = _one_line_error("holds no usable prompt", path, caption_column="id")  # ids are numbers, not text
    assert "4 non-text captions" in message and "1 missing caption" in message
    _one_line_error(r"no caption column 'title'.*'prompt', 'id'", path, caption_column="title")


# --------------------------------------------------------------------------- feature stores


def _store(root: Path, captions: bool = True, finalize: bool = True) -> Path:
    writer = StoreWriter(root, DescriptorConfig("pixel").record(), (4,), compare=DescriptorConfig.differences)
    features = np.ones((3, 4), dtype=np.float32)
    # shard "b" holds the first rows (start 0): the store's row order, not the names', is the source order
    writer.write_shard("b", features, ["img/0.jpg", "img/1.jpg", "img/2.jpg"],
                       captions=["  a castle  ", None, " "] if captions else None, start=0)
    writer.write_shard("a", features[:2], ["img/3.jpg", "img/4.jpg"],
                       captions=["a dog", "a cat"] if captions else None, start=3)
    if finalize:
        writer.finalize()
    return root


def test_feature_store_captions_with_store_keys(tmp_path: Path) -> None:
    root = _store(tmp_path / "store")
    source = read_prompt_source(root)
    assert source.kind == "store"
    assert _rows(source) == [("a castle", "img/0.jpg"), ("a dog", "img/3.jpg"), ("a cat", "img/4.jpg")]
    assert source.skipped == {"missing caption": 1, "empty caption": 1}
    assert prompt_source_summary(source) == (
        f"read 3 prompts from {root} (store, keyed; 1 missing caption, 1 empty caption skipped)")


def test_feature_store_without_captions_or_unfinished_is_refused(tmp_path: Path) -> None:
    root = _store(tmp_path / "plain", captions=False)
    message = _one_line_error("records no captions", root)
    assert str(root) in message
    _one_line_error("unfinished feature store", _store(tmp_path / "half", finalize=False))


# --------------------------------------------------------------------------- webdataset tars


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_tar_and_folder_of_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00001.tar", {  # read second: shards in sorted name order
        "s10.jpg": b"img", "s10.txt": b" second shard ",
    })
    _tar(shards / "00000.tar", {
        "s00.jpg": b"img", "s00.txt": "une péniche sur la Seine\n".encode(), "s00.json": b'{"caption": "not used"}',
        "s01.jpg": b"img", "s01.json": json.dumps({"TEXT": "from json"}).encode(),
        "s02.jpg": b"img",  # no caption: skipped
        "s03.jpg": b"img", "s03.json": b"{broken",
        "s04.jpg": b"img", "s04.txt": b"   ",
    })
    single = read_prompt_source(shards / "00000.tar")
    assert single.kind == "webdataset"
    assert _rows(single) == [("une péniche sur la Seine", "s00"), ("from json", "s01")]
    assert single.skipped == {"missing caption": 1, "bad JSON line": 1, "empty caption": 1}
    folder = read_prompt_source(shards)
    assert _rows(folder) == _rows(single) + [("second shard", "s10")]
    assert _rows(read_prompt_source(str(shards) + "/{00000..00001}.tar")) == _rows(folder)


def test_webdataset_damaged_tar_keeps_what_came_before(tmp_path: Path) -> None:
    whole = _tar(tmp_path / "whole.tar", {f"k{i}.txt": f"prompt {i}".encode() for i in range(6)})
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:512 * 5 + 100])  # k0, k1 whole, k2's data cut short
    source = read_prompt_source(cut)
    assert _rows(source)[:2] == [("prompt 0", "k0"), ("prompt 1", "k1")]
    assert source.skipped == {"unreadable tar end": 1}


# --------------------------------------------------------------------------- errors


def test_missing_empty_and_unknown_sources_are_one_line_errors(tmp_path: Path) -> None:
    assert str(tmp_path / "nope.txt") in _one_line_error("not found", tmp_path / "nope.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    message = _one_line_error("holds no usable prompt", blank)
    assert str(blank) in message and "3 blank lines skipped" in message
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _one_line_error("is empty", empty)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("{x\n{y\n")
    assert "2 bad JSON lines skipped" in _one_line_error("holds no usable prompt", bad_json)
    other = tmp_path / "prompts.parquet"
    other.write_bytes(b"PAR1")
    _one_line_error("expected a .txt, .csv, .tsv or .jsonl file", other)
    folder = tmp_path / "folder"
    folder.mkdir()
    _one_line_error("neither a feature store nor a folder of .tar shards", folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a prompt\n")
    _one_line_error("has no columns to choose", prompts, caption_column="caption")


# --------------------------------------------------------------------------- drawing


ROWS = [PromptRow(f"prompt {i}", f"key{i}") for i in range(10)]


def test_draw_none_is_every_row_in_source_order(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("caption,key\na,k0\nb,\nc,k2\n")
    source = read_prompt_source(path)
    assert draw_prompts(source, None, seed=3) == [Prompt(0, "a", "k0"), Prompt(1, "b", None), Prompt(2, "c", "k2")]
    assert draw_prompts(source.rows, None, seed=3) == draw_prompts(source, None, seed=4)


def test_draw_without_replacement_is_seeded_distinct_and_extendable() -> None:
    first = draw_prompts(ROWS, 6, seed=0)
    assert first == draw_prompts(ROWS, 6, seed=0)
    assert [p.index for p in first] == list(range(6))
    assert len({p.text for p in first}) == 6
    assert all(p.source_key == "key" + p.text.split()[-1] for p in first)  # each keeps its own key
    assert [p.text for p in draw_prompts(ROWS, 6, seed=1)] != [p.text for p in first]
    assert [p.text for p in draw_prompts(ROWS, 10, seed=0)][:6] == [p.text for p in first]  # a prefix of larger n
    # Golden draw: the same on every machine and release; a change here changes every user's prompts.
    assert [p.text for p in draw_prompts(ROWS, 4, seed=0)] == GOLDEN_SEED0
    # each row equally likely to be drawn first
    counts = Counter(draw_prompts(ROWS[:4], 1, seed=s)[0].text for s in range(400))
    assert set(counts) == {r.caption for r in ROWS[:4]} and all(60 <= c <= 140 for c in counts.values())


GOLDEN_SEED0 = ["prompt 9", "prompt 0", "prompt 3", "prompt 5"]


def test_draw_more_than_rows_needs_replacement() -> None:
    with pytest.raises(UserError, match="cannot draw 11 prompts without replacement from the 10 rows") as caught:
        draw_prompts(ROWS, 11, seed=0)
    assert "with replacement" in str(caught.value) and "\n" not in str(caught.value)
    drawn = draw_prompts(ROWS[:3], 300, seed=5, replacement=True)
    counts = Counter(p.text for p in drawn)
    assert set(counts) == {"prompt 0", "prompt 1", "prompt 2"} and max(counts.values()) > 1
    assert all(70 <= c <= 130 for c in counts.values())
    assert [p.index for p in drawn] == list(range(300))
    assert drawn == draw_prompts(ROWS[:3], 300, seed=5, replacement=True)
    assert draw_prompts(ROWS[:3], 100, seed=5, replacement=True) == drawn[:100]
    for bad in (0, -2):
        with pytest.raises(UserError, match="positive integer"):
            draw_prompts(ROWS, bad, seed=0)


# --------------------------------------------------------------------------- Fig. 10 ablation


def test_ablation_variants_drop_each_word_then_cut_from_the_end() -> None:
    assert ablation_variants("  a castle  on a hill\n") == [
        ("full", "a castle  on a hill"),
        ("drop 1: a", "castle on a hill"),
        ("drop 2: castle", "a on a hill"),
        ("drop 3: on", "a castle a hill"),
        ("drop 4: a", "a castle on hill"),
        ("drop 5: hill", "a castle on a"),
        ("first 4 words", "a castle on a"),  # the same text as "drop 5": both kept
        ("first 3 words", "a castle on"),
        ("first 2 words", "a castle"),
        ("first 1 words", "a"),
    ]
    assert ablation_variants("castle") == [("full", "castle")]  # never the empty prompt
    with pytest.raises(UserError, match="empty"):
        ablation_variants(" \n")
    prompts = ablation_prompts("red barn")
    assert prompts == [Prompt(0, "red barn", None, "full"), Prompt(1, "barn", None, "drop 1: red"),
                       Prompt(2, "red", None, "drop 2: barn"), Prompt(3, "red", None, "first 1 words")]
