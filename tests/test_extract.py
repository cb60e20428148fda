"""Extraction into feature stores with lit predict: inputs, bad images, DDP, kill -9 and rerun, tars."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from callbacks.store_writer import StoreWriterCallback, default_shard_size
from datamodules.extraction_inputs import (
    ExtractionDataModule,
    ImageSource,
    expand_tar_pattern,
    input_listing,
    listing_fingerprint,
)
from lit.commands.extract import extract_to_store
from lit.errors import UserError
from lit.io import load_image
from lit.store import MARKER, FeatureStore
from models.descriptor_config import DescriptorConfig
from models.extract import DescriptorExtractor

REPO = Path(__file__).resolve().parents[1]


def _png(rng: np.random.Generator, size: tuple[int, int] = (20, 26)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _folder(root: Path, good: int = 10) -> Path:
    """``good`` random images (some in a sub-folder, mixed sizes and formats) + a corrupt and an empty file."""
    rng = np.random.default_rng(0)
    for i in range(good):
        folder = root / ("cats" if i % 3 == 0 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        _png(rng, (18 + i, 30 - i)).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    (root / "dogs" / "img05_bad.png").write_bytes(b"\x89PNG not really")
    (root / "cats" / "img99_empty.jpg").write_bytes(b"")
    return root


def _extract(source: Path | str, out: Path, shard_size: int = 3, batch_size: int = 2, precision: str = "32-true",
             descriptor: DescriptorExtractor | None = None, **data: object) -> FeatureStore:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, precision=precision,
                         callbacks=[StoreWriterCallback(str(out), shard_size=shard_size)])
    trainer.predict(descriptor or DescriptorExtractor(DescriptorConfig("pixel")),
                    datamodule=ExtractionDataModule(str(source), batch_size=batch_size, **data))  # type: ignore[arg-type]
    return FeatureStore.open(out)


def _store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store but the marker (its creation time differs between runs)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != MARKER}


def test_folder_rows_are_the_descriptor_features_and_bad_images_are_counted(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images")
    # two loader workers (their skip warnings are printed by the workers, the counts come back in the store)
    store = _extract(root, tmp_path / "store", labels_from_folders=True, num_workers=2)
    listed = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*"))
    bad = ["cats/img99_empty.jpg", "dogs/img05_bad.png"]
    assert store.keys == [k for k in listed if k not in bad]
    assert sorted(store.skipped) == bad and store.manifest["num_skipped"] == 2
    assert store.labels == [k.split("/")[0] for k in store.keys]
    assert store.captions is None
    # 12 inputs in shards of 3 rows of the input: 4 shards; each lists its own skips
    assert [s["rows"] + len(s["skipped"]) for s in store.manifest["shards"]] == [3, 3, 3, 3]
    descriptor = DescriptorConfig("pixel").build()
    with torch.no_grad():
        expected = descriptor([load_image(root / key) for key in store.keys]).numpy()  # type: ignore[list-item]
    assert store.dtype == np.float16 and store.feature_shape == (3072,)
    np.testing.assert_allclose(store.slice(0, len(store), np.float32), expected, atol=2e-3, rtol=1e-2)
    assert store.descriptor == DescriptorConfig("pixel").record()
    assert store.manifest["extra"]["shard_size"] == 3 and store.manifest["extra"]["precision"] == "32-true"


def test_token_features_make_a_token_store(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", good=3)
    torch.manual_seed(0)
    module = DescriptorExtractor(DescriptorConfig("dino_vit_b16", random_init=True, input_size=32))
    with pytest.warns(UserWarning):
        store = _extract(root, tmp_path / "store", descriptor=module, shard_size=2)
    assert store.feature_shape == (5, 768) and len(store) == 3  # CLS + 2 x 2 patches
    assert store.descriptor["similarity"] == "split_product"
    with torch.no_grad():
        expected = module.descriptor([load_image(root / k) for k in store.keys]).numpy()  # type: ignore[list-item]
    assert expected.shape == (3, 5, 768)
    np.testing.assert_allclose(store.rows([2, 0, 1], np.float32), expected[[2, 0, 1]], atol=1e-2, rtol=1e-2)


def test_rerun_writes_nothing_and_other_descriptors_are_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", good=4)
    with pytest.warns(UserWarning):
        _extract(root, tmp_path / "store")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("shard-*")}
    _extract(root, tmp_path / "store")  # all shards done: nothing decoded, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("shard-*")} == before
    with pytest.raises(UserError, match="input_size 32 vs 16"):
        _extract(root, tmp_path / "store", descriptor=DescriptorExtractor(DescriptorConfig("pixel", input_size=16)))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"did not create \(notes.txt\)"):
        _extract(root, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_a_second_input_is_appended_after_the_first_with_a_prefix(tmp_path: Path) -> None:
    first, second = _folder(tmp_path / "a", good=4), _folder(tmp_path / "b", good=2)
    with pytest.warns(UserWarning):
        _extract(first, tmp_path / "store")
    with pytest.raises(UserError, match=r"already holds shard 000000 of input .*/a; to add .*/b to it, set "
                                        r"--data.init_args.shard_prefix"):
        _extract(second, tmp_path / "store")
    with pytest.warns(UserWarning):
        store = _extract(second, tmp_path / "store", shard_prefix="b-")
    bad = ("cats/img99_empty.jpg", "dogs/img05_bad.png")
    keys = [[i.key for i in ImageSource.resolve(str(f)).items if i.key not in bad] for f in (first, second)]
    assert store.keys == keys[0] + keys[1] and len(keys[1]) == 2
    assert [(s["name"], s["start"]) for s in store.manifest["shards"]] == [
        ("000000", 0), ("000001", 3), ("b-000000", 6), ("b-000001", 9)]
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("shard-*")}
    _extract(first, tmp_path / "store")  # reruns of either input: nothing new
    _extract(second, tmp_path / "store", shard_prefix="b-")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("shard-*")} == files
    assert FeatureStore.open(tmp_path / "store").keys == store.keys


def test_bf16_mixed_stores_float32_cast_features(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", good=4)
    with pytest.warns(UserWarning):
        full = _extract(root, tmp_path / "f32")
    with pytest.warns(UserWarning):
        half = _extract(root, tmp_path / "bf16", precision="bf16-mixed")
    assert half.keys == full.keys and half.dtype == np.float16
    assert half.manifest["extra"]["precision"] == "bf16-mixed"
    np.testing.assert_allclose(half.slice(0, len(half), np.float32), full.slice(0, len(full), np.float32), atol=2e-2)


def test_tsv_file_list_with_captions_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "im").mkdir()
    for i in range(3):
        _png(rng).save(tmp_path / "im" / f"{i}.png")
    (tmp_path / "list.tsv").write_text("path\tcaption\tlabel\nim/2.png\ta red fox\tfox\nim/0.png\t\tcat\n"
                                       "im/missing.png\tgone\tx\nim/1.png\tno label\tdog\n")
    with pytest.warns(UserWarning, match="missing.png: file not found"):  # through the Python entry point
        store = extract_to_store(str(tmp_path / "list.tsv"), str(tmp_path / "store"), DescriptorConfig("pixel"),
                                 batch_size=2, shard_size=10,
                                 trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})
    assert store.keys == ["im/2.png", "im/0.png", "im/1.png"]  # the list's order
    assert store.captions == ["a red fox", "", "no label"] and store.labels == ["fox", "cat", "dog"]
    assert store.skipped == ["im/missing.png"]
    (tmp_path / "plain.txt").write_text(f"{tmp_path / 'im' / '1.png'}\n\n# comment\nim/0.png\n")
    assert [i.key for i in ImageSource.resolve(str(tmp_path / "plain.txt")).items] == [
        str(tmp_path / "im" / "1.png"), "im/0.png"]


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar shard of ``(key, {suffix: bytes})`` samples (the webdataset layout)."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for suffix, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_webdataset_tars_round_trip_keys_and_captions(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = [_png(rng) for _ in range(6)]
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "00000.tar", [
        ("000000000", {"jpg": _encoded(images[0], "JPEG"), "txt": b"a cat", "json": b'{"url": "u0"}'}),
        ("000000001", {"png": _encoded(images[1], "PNG"), "txt": "caf\u00e9 au lait".encode()}),
        ("000000002", {"jpg": b"broken jpeg bytes", "txt": b"broken"}),
        ("000000003", {"txt": b"no image at all", "json": b"{}"}),
        ("000000004", {"webp": _encoded(images[2], "WEBP"), "txt": b"webp"}),
    ])
    write_tar(tmp_path / "shards" / "00001.tar", [
        ("000010000", {"png": _encoded(images[3], "PNG"), "txt": b"second tar"}),
    ])
    full = write_tar(tmp_path / "00002_full.tar", [(f"00002{i:04d}", {"png": _encoded(images[4 + i % 2], "PNG")})
                                               for i in range(4)])
    (tmp_path / "shards" / "00002.tar").write_bytes(full.read_bytes()[:3000])  # truncated download
    with pytest.warns(UserWarning, match="skipping image"):
        store = _extract(tmp_path / "shards", tmp_path / "store", shard_size=2)
    assert store.keys[:4] == ["000000000", "000000001", "000000004", "000010000"]
    assert store.captions[:4] == ["a cat", "caf\u00e9 au lait", "webp", "second tar"]  # type: ignore[index]
    shards = store.manifest["shards"]
    assert [s["name"] for s in shards][:4] == ["000000-000000", "000000-000001", "000000-000002", "000001-000000"]
    assert shards[1]["skipped"] == ["000000002", "000000003"] and shards[0]["source"].endswith("00000.tar")
    assert [s["info"].get("final") for s in shards[:4]] == [None, None, True, True]
    assert {s["info"]["input"] for s in shards} == {str(tmp_path / "shards")}
    truncated = [s for s in shards if s["name"].startswith("000002-")]
    assert any("truncated (3000 bytes is not a whole number" in k for s in truncated for k in s["skipped"])
    assert truncated[-1]["info"]["final"] is True
    with torch.no_grad():  # the PNG sample, decoded independently of the suite's loader
        expected = DescriptorConfig("pixel").build()(torch.from_numpy(np.array(images[1])).permute(2, 0, 1)[None] / 255.0)
    np.testing.assert_allclose(store.rows([1], np.float32), expected.numpy(), atol=2e-3)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("shard-*")}
    _extract(tmp_path / "shards", tmp_path / "store", shard_size=2)  # finished tars are not read again
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("shard-*")} == before
    complete = _store_files(tmp_path / "store")
    for name in ("shard-000000-000002.json", "shard-000000-000002.npy", "manifest.json"):  # killed in tar 0
        (tmp_path / "store" / name).unlink()
    _extract(tmp_path / "shards", tmp_path / "store", shard_size=2)  # only tar 0's last chunk is decoded again
    assert _store_files(tmp_path / "store") == complete
    assert (tmp_path / "store" / "shard-000000-000001.npy").stat().st_mtime_ns == before["shard-000000-000001.npy"]
    assert expand_tar_pattern(str(tmp_path / "shards" / "{00000..00001}.tar")) == [
        str(tmp_path / "shards" / "00000.tar"), str(tmp_path / "shards" / "00001.tar")]


def test_default_shard_size_targets_64_mib() -> None:
    assert default_shard_size((512,), "float16") == 65536
    assert default_shard_size((197, 768), "float16") == 221
    assert default_shard_size((10**9,), "float32") == 1


# --------------------------------------------------------------------------- processes


def _cli(source: Path, out: Path, extra: list[str] = (), prelude: str = "") -> list[str]:
    args = ["predict", "-c", str(REPO / "configs" / "extract.yaml"), f"--data.init_args.source={source}",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", f"--trainer.callbacks.init_args.output_dir={out}",
            "--trainer.callbacks.init_args.shard_size=3", f"--trainer.logger.init_args.save_dir={out.parent / 'runs'}",
            *extra]
    if not prelude:  # Lightning's DDP launcher reruns sys.argv in the other processes: no "-c" there
        return [sys.executable, "-m", "lit.commands.cli", *args]
    return [sys.executable, "-c", f"{prelude}\nfrom lit.commands.cli import main\nmain({args!r})"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_two_ddp_processes_write_the_same_store_as_one(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", good=9)  # 11 inputs: not divisible by 2 nor by the shard size
    with pytest.warns(UserWarning):
        single = _extract(root, tmp_path / "single")
    done = subprocess.run(_cli(root, tmp_path / "ddp", ["--trainer.devices=2", "--trainer.strategy=ddp"]),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "11 images in" in done.stderr + done.stdout
    assert _store_files(tmp_path / "ddp") == _store_files(tmp_path / "single")
    assert len(single) == 9 and len(set(single.keys)) == 9


def test_kill_during_extraction_then_rerun_gives_the_same_store(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", good=9)
    with pytest.warns(UserWarning):
        _extract(root, tmp_path / "reference")
    out = tmp_path / "killed"
    slow = ("import time, datamodules.extraction_inputs as s\n_load = s.load_image\n"
            "def load(*a, **k):\n    time.sleep(0.4)\n    return _load(*a, **k)\ns.load_image = load")
    process = subprocess.Popen(_cli(root, out, prelude=slow), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.json")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the slowed extraction ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert 0 < len(first) < 8
    with pytest.warns(UserWarning):
        _extract(root, out)
    assert {n: (out / n).stat().st_mtime_ns for n in first} == first  # finished shards were skipped
    assert _store_files(out) == _store_files(tmp_path / "reference")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- issue 14: stores know their input
# (skipped entries counted with their reasons; the input recorded as an absolute path and a fingerprint of its
# listing; a rerun against a changed input refused with one line, never a duplicated or dropped row)


def _refused_changes(root: Path, out: Path) -> str:
    with pytest.raises(UserError) as caught:
        _extract(root, out)
    message = str(caught.value)
    assert "\n" not in message and f"feature store {out} was extracted from {root}, which changed since" in message
    return message


def test_dangling_symlinks_and_image_named_folders_are_counted_with_reasons(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", good=3)
    (root / "a.png").symlink_to(root / "missing.png")
    (root / "b.jpg").mkdir()
    with pytest.warns(UserWarning):
        store = _extract(root, tmp_path / "store")
    entries = store.manifest["skipped_entries"]
    assert entries == [{"name": "a.png", "reason": "dangling symlink"},
                       {"name": "b.jpg", "reason": "a directory, not an image file"}]
    assert store.manifest["num_skipped"] == 4  # the two entries and the corrupt and empty files
    assert store.skipped[:2] == ["a.png", "b.jpg"] and len(store.skipped) == 4
    assert store.skipped_reasons["a.png"] == "dangling symlink"
    assert len(store) == 3


def test_the_manifest_records_the_input_as_an_absolute_path_and_a_fingerprint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path / "images", good=3)
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning):
        store = _extract(Path("images"), Path("store"))
    extra = store.manifest["extra"]
    assert extra["input"] == str(root) and Path(extra["input"]).is_absolute()
    expected = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(root.rglob("*.*"))]
    assert input_listing(ImageSource.resolve(str(root))) == expected
    assert extra["input_fingerprint"] == listing_fingerprint(expected) and extra["input_files"] == 5


def test_a_finished_store_refuses_added_removed_and_modified_images(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", good=4)
    out = tmp_path / "store"
    with pytest.warns(UserWarning):
        _extract(root, out)
    files = _store_files(out)
    rng = np.random.default_rng(5)
    _png(rng).save(root / "dogs" / "zz_new1.png")
    _png(rng).save(root / "aa_new0.png")
    message = _refused_changes(root, out)
    assert "2 added (aa_new0.png, dogs/zz_new1.png), 0 removed, 0 modified" in message
    assert _store_files(out) == files
    (root / "aa_new0.png").unlink()
    (root / "dogs" / "zz_new1.png").unlink()
    (root / "cats" / "img00.jpg").unlink()
    assert "0 added, 1 removed (cats/img00.jpg), 0 modified" in _refused_changes(root, out)
    _png(rng).save(root / "cats" / "img00.jpg")
    assert "0 added, 0 removed, 1 modified (cats/img00.jpg)" in _refused_changes(root, out)
    assert _store_files(out) == files


def test_a_half_finished_store_refuses_an_added_image_instead_of_duplicating_rows(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", good=6)  # 8 inputs: shards of 3, 3, 2
    out = tmp_path / "store"
    with pytest.warns(UserWarning):
        _extract(root, out)
    for path in [out / "manifest.json", *out.glob("shard-000002.*")]:  # as if killed before the last shard
        path.unlink()
    _png(np.random.default_rng(1)).save(root / "cats" / "img00b.png")  # sorts into the first shard
    assert "1 added (cats/img00b.png)" in _refused_changes(root, out)
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-000002.*"))
    (root / "cats" / "img00b.png").unlink()
    with pytest.warns(UserWarning):
        store = _extract(root, out)  # the input as it was: the store is completed
    assert len(store.keys) == len(set(store.keys)) == 6
