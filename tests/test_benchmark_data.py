"""The benchmark scripts take any image folder and never write over committed results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import replication_vs_size, table1_bsds
from benchmarks.data_layout import detect_layout, output_dir
from photo_fixtures import PhotoSet

REPO = Path(__file__).resolve().parents[1]


def _images(folder: Path, count: int, size: int = 24) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"im{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_layouts_flat_images_and_masks_and_bsds(tmp_path: Path, photos: PhotoSet) -> None:
    _images(tmp_path / "flat" / "sub", 3)
    flat = detect_layout(tmp_path / "flat")
    assert (flat.kind, flat.queries, flat.pool, flat.segmix_root) == ("flat", tmp_path / "flat", None, None)
    _images(tmp_path / "masked" / "images", 3)
    (tmp_path / "masked" / "masks").mkdir()
    masked = detect_layout(tmp_path / "masked", pool=tmp_path / "flat")
    assert masked.kind == "images+masks" and masked.queries == tmp_path / "masked" / "images"
    assert masked.segmix_root == tmp_path / "masked" and masked.mask_format == "folder"
    assert masked.pool == tmp_path / "flat" and masked.train_images == tmp_path / "masked" / "images"
    root = photos.root  # a BSDS300-like root
    bsds = detect_layout(root)
    assert bsds.kind == "bsds" and bsds.queries == root / "val" / "images" and bsds.pool == root / "train" / "images"
    assert bsds.segmix_root == root / "val" and bsds.mask_format == "voc"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images under"):
        detect_layout(tmp_path / "empty")


def test_output_folder_is_new_by_default_and_committed_results_are_refused(
        tmp_path: Path, procedural_photos: PhotoSet) -> None:
    first, second = output_dir(None, tmp_path / "base"), output_dir(None, tmp_path / "base")
    assert first != second and first.parent == second.parent == tmp_path / "base"
    committed = REPO / "benchmarks" / "results" / "table1"
    before = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()}
    with pytest.raises(SystemExit, match="already holds files"):
        table1_bsds.prepare(table1_bsds.parse_args(["--data", str(procedural_photos.root), "--out", str(committed),
                                                    "--work", str(tmp_path / "w")]))
    assert {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} == before
    assert output_dir(committed, tmp_path, overwrite=True) == committed  # only when asked


def test_table1_on_a_flat_folder_runs_cutmix_with_a_seeded_pool(tmp_path: Path, monkeypatch) -> None:
    _images(tmp_path / "photos", 6)
    monkeypatch.setattr(table1_bsds, "DEFAULT_OUT_BASE", tmp_path / "results")
    args = table1_bsds.parse_args(["--data", str(tmp_path / "photos"), "--work", str(tmp_path / "work")])
    settings, out = table1_bsds.prepare(args)
    assert args.datasets == ["cutmix", "dif_patch"]  # no masks: no Segmix
    assert out.parent == tmp_path / "results" and not any(out.iterdir())
    cutmix = table1_bsds.data_args("cutmix", settings, tmp_path / "unet")
    assert f"--data.init_args.root={tmp_path / 'photos'}" in cutmix and "--data.init_args.pool=null" in cutmix
    # the datamodule the runs instantiate builds from it: queries and pool a seeded split of the 6
    from lit.commands.lightning_cli import LitCLI

    cli = LitCLI(args=table1_bsds.cli_args("cutmix", "pixel", settings, tmp_path / "unet")
                 + ["--data.init_args.output_size=16"], run=False)
    cli.datamodule.setup("test")
    assert len(cli.datamodule.retrieval_set.queries) == 3


def test_table1_fresh_never_deletes_a_users_work_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match="did not write"):
        table1_bsds.claim_work(tmp_path / "mine", fresh=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    table1_bsds.claim_work(tmp_path / "scratch", fresh=False)
    (tmp_path / "scratch" / "runs").mkdir()
    table1_bsds.claim_work(tmp_path / "scratch", fresh=True)  # its own folder: emptied
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == [table1_bsds.WORK_MARK]


def test_replication_vs_size_on_any_folder_writes_a_new_result_folder(tmp_path: Path, monkeypatch) -> None:
    _images(tmp_path / "photos" / "images", 6)
    monkeypatch.setattr(replication_vs_size, "DEFAULT_OUT_BASE", tmp_path / "results")
    replication_vs_size.main(["--data", str(tmp_path / "photos"), "--sizes", "3", "--steps", "2", "--checks", "1",
                              "--samples", "2", "--resolution", "16"])
    (out,) = list((tmp_path / "results").iterdir())
    assert (out / "replication_vs_size.png").is_file()
    with pytest.raises(SystemExit, match="already holds files"):
        replication_vs_size.main(["--data", str(tmp_path / "photos"), "--out", str(out)])


def test_mocov3_cutmix_benchmark_refuses_a_users_work_folder_before_deleting_anything(
        tmp_path: Path, procedural_photos: PhotoSet) -> None:
    """Its log clean-ups (``runs/``, ``train/<form>/``) run only inside a work folder it claimed:
    a user's folder with files in those places is refused and left as it was."""
    from benchmarks import mocov3_cutmix_bsds

    user = tmp_path / "mine"
    for name in ("runs/keep.txt", "train/none_s0/e5/notes.txt", "data.csv"):
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text("user data")
    for fresh in ([], ["--fresh"]):
        with pytest.raises(SystemExit, match="holds files this script did not write"):
            mocov3_cutmix_bsds.main(["--data", str(procedural_photos.root), "--work", str(user),
                                     "--out", str(tmp_path / "out"), *fresh])
    assert sorted(str(p.relative_to(user)) for p in user.rglob("*") if p.is_file()) == [
        "data.csv", "runs/keep.txt", "train/none_s0/e5/notes.txt"]
    assert all(p.read_text() == "user data" for p in user.rglob("*") if p.is_file())
    assert not (tmp_path / "out").exists()
