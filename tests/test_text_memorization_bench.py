"""benchmarks/text_memorization.py touches only folders it marked as its own: a user's folder is
refused untouched, and in its own folder only the leftovers of its own earlier run go."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.text_memorization import MARKER, prepare_run_folder, row_config
from lit.errors import UserError


def test_a_users_folder_is_refused_and_kept(tmp_path: Path) -> None:
    folder = tmp_path / "dup_same_seed0"
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="not empty and was not made by lit"):
        prepare_run_folder(folder, ("run",))
    assert (folder / "run" / "mine.txt").read_text() == "a user's file"
    assert not (folder / MARKER).exists()


def test_only_its_own_leftovers_go(tmp_path: Path) -> None:
    folder = tmp_path / "generate_plain_seed0"
    prepare_run_folder(folder, ("gen", "scan", "captions.csv"))  # new: claimed, marker written
    assert (folder / MARKER).is_file()
    (folder / "gen").mkdir()
    (folder / "gen" / "p000000_i0.png").write_bytes(b"an earlier run's image")
    (folder / "captions.csv").write_text("caption,key\n")
    (folder / "notes.txt").write_text("a user's note beside the runs")
    prepare_run_folder(folder, ("gen", "scan", "captions.csv"))
    assert not (folder / "gen").exists() and not (folder / "captions.csv").exists()
    assert (folder / "notes.txt").read_text() == "a user's note beside the runs"


def test_rows_differ_only_where_they_say() -> None:
    base = row_config("dup_same", 0, 100, 64, 0.0625, 25.0, Path("/tmp/x"))
    noise = row_config("embedding_noise", 0, 100, 64, 0.0625, 25.0, Path("/tmp/x"))
    assert base["model"]["init_args"]["export_on_fit_end"] == "pipeline"
    assert noise["model"]["init_args"]["embedding_noise"] == 0.1
    assert noise["data"]["init_args"] == base["data"]["init_args"]
    assert row_config("none", 0, 100, 64, 0.0625, 25.0, Path("/tmp/x"))["data"]["init_args"]["dup_fraction"] == 0.0
    with pytest.raises(ValueError, match="unknown row"):
        row_config("nothing", 0, 100, 64, 0.0625, 25.0, Path("/tmp/x"))
