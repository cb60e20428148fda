"""Feature store: round trips, memory-mapped reads, atomic shards, compatibility and safety."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from lit.errors import UserError
from lit.store import MANIFEST, FeatureStore, StoreWriter, is_store
from models.descriptor_config import DescriptorConfig

RECORD = DescriptorConfig("pixel").record()
DIFFERENCES = DescriptorConfig.differences  # how the store compares descriptor records


def _features(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("shape", [(8,), (3, 4)])
def test_round_trip_in_global_order(tmp_path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    parts = [_features(rng, n, shape) for n in (5, 0, 7)]
    keys = [[f"img{s}_{i}" for i in range(len(p))] for s, p in enumerate(parts)]
    writer = StoreWriter(tmp_path / "store", RECORD, shape, dtype=dtype, compare=DIFFERENCES)
    # written out of order (as ranks would), with a torch tensor for one of them
    writer.write_shard("c", torch.from_numpy(parts[2]), keys[2], captions=[f"cap {k}" for k in keys[2]],
                       labels=list(np.arange(7)), start=12)  # numpy integers are stored as JSON numbers
    writer.write_shard("a", parts[0], keys[0], captions=[f"cap {k}" for k in keys[0]], labels=[9] * 5,
                       start=0, skipped=["broken.png"])
    writer.write_shard("b", parts[1], keys[1], captions=[], labels=[], start=5, skipped=["x.jpg", "y.jpg"])
    manifest = writer.finalize()
    assert [s["name"] for s in manifest["shards"]] == ["a", "b", "c"]

    store = FeatureStore.open(tmp_path / "store")
    expected = np.concatenate(parts).astype(dtype)
    assert len(store) == store.num_rows == 12
    assert store.feature_shape == shape and store.dtype == np.dtype(dtype)
    assert store.descriptor == RECORD
    np.testing.assert_array_equal(store.slice(0, 12), expected)
    assert store.keys == keys[0] + keys[1] + keys[2]
    assert store.captions == [f"cap {k}" for k in store.keys]
    assert store.labels == [9] * 5 + list(range(7))
    assert store.skipped == ["broken.png", "x.jpg", "y.jpg"] and manifest["num_skipped"] == 3
    picks = np.array([11, 0, 5, 5, 4, 7])
    np.testing.assert_array_equal(store.rows(picks), expected[picks])
    np.testing.assert_array_equal(store.rows(picks, dtype=np.float32), expected[picks].astype(np.float32))
    assert store.keys_at(picks) == [store.keys[i] for i in picks]
    assert store.captions_at(picks) == [store.captions[i] for i in picks]  # type: ignore[index]
    store.verify()


def test_unknown_captions_and_labels_are_none(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", RECORD, (4,), compare=DIFFERENCES)
    writer.write_shard("0", np.ones((2, 4)), ["a", "b"])
    writer.finalize()
    store = FeatureStore.open(tmp_path / "s")
    assert store.captions is None and store.labels is None and store.captions_at([1]) is None


def test_iter_blocks_reads_through_memory_maps_in_bounded_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    writer = StoreWriter(tmp_path / "s", RECORD, (256,), dtype="float32", compare=DIFFERENCES)
    parts = [_features(rng, n, (256,)) for n in (1500, 1000, 1500)]  # 4 MB in all
    start = 0
    for i, part in enumerate(parts):
        writer.write_shard(f"{i:03d}", part, [str(start + j) for j in range(len(part))], start=start)
        start += len(part)
    writer.finalize()
    store = FeatureStore.open(tmp_path / "s")
    assert isinstance(store.shard_array(0), np.memmap)

    tracemalloc.start()
    sizes, total = [], np.zeros(256, dtype=np.float64)
    expected_starts = list(range(0, 4000, 300))
    for (block_start, block), expected_start in zip(store.iter_blocks(300), expected_starts, strict=True):
        assert block_start == expected_start
        sizes.append(len(block))
        total += block.sum(axis=0, dtype=np.float64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sizes == [300] * 13 + [100]  # blocks cross shard boundaries but never exceed block_rows
    assert peak < 4 * 300 * 256 * 4  # a few blocks, far below the 4 MB store
    np.testing.assert_allclose(total, np.concatenate(parts).sum(axis=0, dtype=np.float64), rtol=1e-9, atol=1e-9)
    blocks = [b for _, b in store.iter_blocks(999, dtype=np.float32)]
    np.testing.assert_array_equal(np.concatenate(blocks), np.concatenate(parts))


def test_shards_are_idempotent_and_never_silently_replaced(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", RECORD, (4,), compare=DIFFERENCES)
    features = np.arange(8, dtype=np.float32).reshape(2, 4)
    writer.write_shard("0", features, ["a", "b"], start=0)
    npy = tmp_path / "s" / "shard-0.npy"
    before = (npy.read_bytes(), npy.stat().st_mtime_ns)
    writer.write_shard("0", features, ["a", "b"], start=0)  # a rerun: same bytes, untouched file
    assert (npy.read_bytes(), npy.stat().st_mtime_ns) == before
    with pytest.raises(UserError, match="shard-0.npy already exists with other content"):
        writer.write_shard("0", features + 1, ["a", "b"], start=0)
    assert npy.read_bytes() == before[0]
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


def test_killed_writer_leftovers_are_cleaned_and_ignored(tmp_path: Path) -> None:
    root = tmp_path / "s"
    writer = StoreWriter(root, RECORD, (4,), compare=DIFFERENCES)
    writer.write_shard("0", np.ones((2, 4)), ["a", "b"], start=0)
    (root / ".shard-1.npy.abc123.tmp").write_bytes(b"partial")  # killed mid-write
    np.save(root / "shard-2.npy", np.ones((1, 4), dtype=np.float16))  # row file without its .json
    writer = StoreWriter(root, RECORD, (4,), compare=DIFFERENCES)  # the rerun
    assert not (root / ".shard-1.npy.abc123.tmp").exists()
    assert not writer.has_shard("2")
    manifest = writer.finalize()
    assert [s["name"] for s in manifest["shards"]] == ["0"] and manifest["num_rows"] == 2


def test_appending_adds_shards_with_the_same_descriptor(tmp_path: Path) -> None:
    root = tmp_path / "s"
    StoreWriter(root, RECORD, (4,), compare=DIFFERENCES).write_shard("0", np.ones((2, 4)), ["a", "b"],
                                                                 start=0)
    StoreWriter(root, RECORD, (4,), compare=DIFFERENCES).finalize()
    again = StoreWriter(root, RECORD, (4,), compare=DIFFERENCES)
    again.write_shard("1", np.zeros((3, 4)), ["c", "d", "e"], start=2)
    again.finalize()
    store = FeatureStore.open(root)
    assert store.keys == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(store.slice(0, 5, np.float32), np.concatenate([np.ones((2, 4)), np.zeros((3, 4))]))


def test_mismatches_are_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "s"
    StoreWriter(root, RECORD, (4,), compare=DIFFERENCES).finalize()
    other = {**RECORD, "weights_sha256": "0" * 64}
    with pytest.raises(UserError, match=r"weights_sha256 None vs '0000") as raised:
        StoreWriter(root, other, (4,), compare=DIFFERENCES)
    assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match="dtype float16 vs float32"):
        StoreWriter(root, RECORD, (4,), dtype="float32", compare=DIFFERENCES)
    with pytest.raises(UserError, match=r"feature shape \(4,\) vs \(5,\)"):
        StoreWriter(root, RECORD, (5,), compare=DIFFERENCES)

    store = FeatureStore.open(root)
    store.check_compatible(RECORD, DIFFERENCES)
    store.check_compatible(store, DIFFERENCES)
    with pytest.raises(UserError, match="preprocessing") as raised:
        store.check_compatible({**RECORD, "preprocessing": "resize 256 bicubic, crop 224, mean/std ImageNet"},
                               DIFFERENCES)
    assert "\n" not in str(raised.value)
    StoreWriter(tmp_path / "f32", RECORD, (4,), dtype="float32", compare=DIFFERENCES).finalize()
    with pytest.raises(UserError, match="dtype float16 vs float32"):
        store.check_compatible(FeatureStore.open(tmp_path / "f32"), DIFFERENCES)
    StoreWriter(tmp_path / "dino", {**RECORD, "name": "dino_vit_b16"}, (4,), compare=DIFFERENCES).finalize()
    with pytest.raises(UserError, match="name 'pixel' vs 'dino_vit_b16'"):
        store.check_compatible(FeatureStore.open(tmp_path / "dino"), DIFFERENCES)


def test_refuses_folders_it_did_not_create(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match=r"photos: it holds files the suite did not create \(holiday.jpg\)"):
        StoreWriter(root, RECORD, (4,), compare=DIFFERENCES)
    assert sorted(p.name for p in root.iterdir()) == ["holiday.jpg"]
    assert not is_store(root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        StoreWriter(tmp_path / "file", RECORD, (4,), compare=DIFFERENCES)
    with pytest.raises(UserError, match="not a feature store"):
        FeatureStore.open(root)
    StoreWriter(tmp_path / "unfinished", RECORD, (4,), compare=DIFFERENCES)
    with pytest.raises(UserError, match="unfinished feature store"):
        FeatureStore.open(tmp_path / "unfinished")


def test_bad_features_are_refused(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", RECORD, (4,), compare=DIFFERENCES)
    with pytest.raises(ValueError, match="overflow float16"):
        writer.write_shard("0", np.full((1, 4), 1e6), ["a"])
    with pytest.raises(ValueError, match="not finite"):
        writer.write_shard("0", np.full((1, 4), np.nan), ["a"])
    with pytest.raises(ValueError, match=r"expected \(rows, \*\(4,\)\)"):
        writer.write_shard("0", np.ones((1, 5)), ["a"])
    with pytest.raises(ValueError, match="1 keys for 2 rows"):
        writer.write_shard("0", np.ones((2, 4)), ["a"])
    with pytest.raises(UserError, match="dtype must be one of"):
        StoreWriter(tmp_path / "t", RECORD, (4,), dtype="int8", compare=DIFFERENCES)


def test_damaged_shard_fails_verification(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", RECORD, (4,), compare=DIFFERENCES)
    writer.write_shard("0", np.ones((2, 4)), ["a", "b"])
    writer.finalize()
    npy = tmp_path / "s" / "shard-0.npy"
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its checksum"):
        FeatureStore.open(tmp_path / "s").verify()


@pytest.mark.parametrize(("shape", "per_row"), [((512,), 1024), ((197, 768), 197 * 768 * 2)])
def test_bytes_on_disk_per_row(tmp_path: Path, shape: tuple[int, ...], per_row: int) -> None:
    """What the README states: 512-d float16 = 1 KiB a row; DINO tokens (197, 768) float16 = 303 kB."""
    rows = 64 if len(shape) == 1 else 4
    writer = StoreWriter(tmp_path / "s", RECORD, shape, compare=DIFFERENCES)
    writer.write_shard("0", np.zeros((rows, *shape), dtype=np.float32), [str(i) for i in range(rows)])
    manifest = writer.finalize()
    on_disk = (tmp_path / "s" / "shard-0.npy").stat().st_size
    assert manifest["bytes_per_row"] == per_row
    assert per_row * rows < on_disk <= per_row * rows + 128  # the .npy header is the only overhead
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["num_rows"] == rows


def test_a_descriptor_is_compatible_with_the_store_it_made_built_or_not(tmp_path: Path) -> None:
    """``lit scan`` checks an unbuilt ``DescriptorConfig.record()`` against stores written with the built
    descriptor's record: both must describe the same preprocessing (here at a non-default input size)."""
    config = DescriptorConfig("pixel", input_size=16)
    StoreWriter(tmp_path / "s", config.record(config.build()), (768,), compare=DIFFERENCES).finalize()
    store = FeatureStore.open(tmp_path / "s")
    assert store.descriptor["preprocessing"] == "resize 16 bilinear, crop 16, mean/std none"
    store.check_compatible(config.record(), DIFFERENCES)
    with pytest.raises(UserError, match="input_size 16 vs 32"):
        store.check_compatible(DescriptorConfig("pixel").record(), DIFFERENCES)


def test_random_init_stores_of_different_seeds_refuse_each_other(tmp_path: Path) -> None:
    """Two random networks' features are not comparable: the seed is compared like the weights' hash
    (``weights_sha256`` is None for both, which alone used to pass)."""
    seed0 = DescriptorConfig("vit_s16_in1k", random_init=True, input_size=32).record()
    seed1 = DescriptorConfig("vit_s16_in1k", random_init=True, input_size=32, seed=1).record()
    StoreWriter(tmp_path / "s", seed0, (4,), compare=DIFFERENCES).finalize()
    store = FeatureStore.open(tmp_path / "s")
    store.check_compatible(seed0, DIFFERENCES)
    with pytest.raises(UserError, match="seed 0 vs 1") as raised:
        store.check_compatible(seed1, DIFFERENCES)
    assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match="seed 0 vs 1") as raised:
        StoreWriter(tmp_path / "s", seed1, (4,), compare=DIFFERENCES)
    assert "\n" not in str(raised.value)
    unseeded = {k: v for k, v in seed0.items() if k != "seed"}  # a random-init store of an earlier version
    StoreWriter(tmp_path / "old", unseeded, (4,), compare=DIFFERENCES).finalize()
    with pytest.raises(UserError, match="seed None vs 0"):
        FeatureStore.open(tmp_path / "old").check_compatible(seed0, DIFFERENCES)
    # a real descriptor's store of an earlier version (no seed field) stays compatible
    StoreWriter(tmp_path / "pixel", {k: v for k, v in RECORD.items() if k != "seed"}, (4,),
                compare=DIFFERENCES).finalize()
    FeatureStore.open(tmp_path / "pixel").check_compatible(RECORD, DIFFERENCES)


# ----------------------------------------------------------------------------- stores are verified


def _two_shard_store(root: Path) -> Path:
    writer = StoreWriter(root, RECORD, (4,), compare=DIFFERENCES)
    rng = np.random.default_rng(3)
    writer.write_shard("0", _features(rng, 6, (4,)), [f"a{i}" for i in range(6)], start=0)
    writer.write_shard("1", _features(rng, 5, (4,)), [f"b{i}" for i in range(5)], start=6)
    writer.finalize()
    return root


def _damage_message(raised: pytest.ExceptionInfo[UserError], root: Path, file: str, what: str) -> None:
    """One line naming the store, the file and what to do."""
    message = str(raised.value)
    assert "\n" not in message, message
    assert message.startswith(f"feature store {root} is damaged: {file}"), message
    assert what in message and message.endswith("remove it and extract the features again"), message


def test_a_changed_shard_is_refused_before_its_rows_are_used(tmp_path: Path) -> None:
    root = _two_shard_store(tmp_path / "s")
    npy = root / "shard-1.npy"
    data = bytearray(npy.read_bytes())
    for i in range(len(data) - 32, len(data)):  # XOR bytes of the features (the audit XOR-ed 64)
        data[i] ^= 0x01
    npy.write_bytes(bytes(data))
    store = FeatureStore.open(root)  # sizes still agree: found when shard 1 is first used
    np.testing.assert_array_equal(store.slice(0, 6).shape, (6, 4))  # shard 0 is sound
    for use in (lambda: list(store.iter_blocks(4)), lambda: store.rows([7]), lambda: store.keys_at([7]),
                lambda: store.keys, lambda: store.verify()):
        with pytest.raises(UserError) as raised:
            use()
        _damage_message(raised, root, "shard-1.npy", "does not match its checksum")


def test_a_truncated_shard_is_refused_on_open(tmp_path: Path) -> None:
    root = _two_shard_store(tmp_path / "s")
    npy = root / "shard-0.npy"
    npy.write_bytes(npy.read_bytes()[:-10])
    with pytest.raises(UserError) as raised:
        FeatureStore.open(root)
    _damage_message(raised, root, "shard-0.npy", "is truncated")


@pytest.mark.parametrize("file", ["shard-1.npy", "shard-1.json"])
def test_a_missing_shard_or_row_file_is_refused_on_open(tmp_path: Path, file: str) -> None:
    root = _two_shard_store(tmp_path / "s")
    (root / file).unlink()
    with pytest.raises(UserError) as raised:
        FeatureStore.open(root)
    _damage_message(raised, root, file, "is missing")


def test_a_foreign_shard_is_refused(tmp_path: Path) -> None:
    """Another store's shard of the same name: same shape and size, other rows (and another shape)."""
    root, other = _two_shard_store(tmp_path / "s"), tmp_path / "other"
    writer = StoreWriter(other, RECORD, (4,), compare=DIFFERENCES)
    writer.write_shard("0", np.ones((6, 4)), [f"a{i}" for i in range(6)], start=0)
    writer.write_shard("1", np.ones((3, 4)), ["x", "y", "z"], start=6)
    writer.finalize()
    (root / "shard-0.npy").write_bytes((other / "shard-0.npy").read_bytes())
    with pytest.raises(UserError) as raised:
        FeatureStore.open(root).slice(0, 1)
    _damage_message(raised, root, "shard-0.npy", "does not match its checksum")
    (root / "shard-1.npy").write_bytes((other / "shard-1.npy").read_bytes())
    with pytest.raises(UserError) as raised:
        FeatureStore.open(root)
    _damage_message(raised, root, "shard-1.npy", "the manifest says float16 (5, 4)")
    (root / "shard-1.json").write_bytes((other / "shard-1.json").read_bytes())  # its row file with it
    with pytest.raises(UserError) as raised:
        FeatureStore.open(root)
    _damage_message(raised, root, "shard-1.npy", "the manifest says float16 (5, 4)")


def test_swapped_keys_are_refused(tmp_path: Path) -> None:
    """Two keys swapped in a shard's row file would attribute rows to the wrong images."""
    root = _two_shard_store(tmp_path / "s")
    meta_path = root / "shard-0.json"
    meta = json.loads(meta_path.read_text())
    meta["keys"][0], meta["keys"][1] = meta["keys"][1], meta["keys"][0]
    meta_path.write_text(json.dumps(meta))
    store = FeatureStore.open(root)
    with pytest.raises(UserError) as raised:
        store.keys_at([0])
    _damage_message(raised, root, "shard-0.json", "does not match its checksum")
    with pytest.raises(UserError):
        store.slice(0, 1)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe garbage", b"[1, 2]", b'{"format": "lit-feature-store"}'])
def test_a_garbage_manifest_is_refused(tmp_path: Path, content: bytes) -> None:
    root = _two_shard_store(tmp_path / "s")
    (root / MANIFEST).write_bytes(content)
    with pytest.raises(UserError) as raised:
        FeatureStore.open(root)
    _damage_message(raised, root, "manifest.json", "")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_rows_are_refused(tmp_path: Path, value: float) -> None:
    """A shard whose checksums agree but which holds a non-finite row (the writer refuses them; a store
    written by other means, or by an older writer, may not)."""
    root = _two_shard_store(tmp_path / "s")
    npy, meta_path = root / "shard-1.npy", root / "shard-1.json"
    array = np.load(npy)
    array[3, 2] = value
    np.save(npy, array)
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(npy.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    (root / MANIFEST).unlink()
    StoreWriter(root, RECORD, (4,), compare=DIFFERENCES).finalize()  # a manifest that agrees with the files
    store = FeatureStore.open(root)
    with pytest.raises(UserError) as raised:
        store.slice(0, 11)
    _damage_message(raised, root, "shard-1.npy", "row 3 ('b3') holds NaN or inf")


# ----------------------------------------------------------------------------- issue 14: skipped entries


def test_entries_skipped_before_any_shard_are_counted_with_their_reasons(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", RECORD, (4,), compare=DIFFERENCES)
    writer.write_shard("000000", np.ones((1, 4)), ["c.png"], skipped=["bad.png"], start=0)
    manifest = writer.finalize(skipped_entries=[("a.png", "dangling symlink"), ("b.jpg", "a directory")])
    assert manifest["num_skipped"] == 3
    assert manifest["skipped_entries"] == [{"name": "a.png", "reason": "dangling symlink"},
                                           {"name": "b.jpg", "reason": "a directory"}]
    store = FeatureStore.open(tmp_path / "s")
    assert store.skipped == ["a.png", "b.jpg", "bad.png"]
    assert store.skipped_reasons == {"a.png": "dangling symlink", "b.jpg": "a directory",
                                     "bad.png": "could not be read as an image"}
