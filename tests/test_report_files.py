"""Atomic report writes: content, file mode under the umask, no leftovers on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lit.plots import new_figure, save_figure
from lit.report import atomic_path, write_json, write_text_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_text_and_json_get_the_umask_mode(tmp_path: Path, umask_027: int) -> None:
    text = write_text_atomic(tmp_path / "sub" / "a.md", "héllo\n")
    assert text.read_text(encoding="utf-8") == "héllo\n"
    assert _mode(text) == umask_027  # mkstemp alone would give 0600
    payload = write_json(tmp_path / "m.json", {"map": 0.5})
    assert _mode(payload) == umask_027
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(plain) == _mode(payload)


def test_figure_gets_the_umask_mode(tmp_path: Path, umask_027: int) -> None:
    figure = new_figure(1, 1)
    path = save_figure(figure, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _mode(path) == umask_027


def test_failure_leaves_neither_target_nor_temporary(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
