"""Synthetic-set builds never touch a user's files, and their workers die with them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from datamodules.synthetic.build import build_synthetic
from datamodules.synthetic.builder import RenderedItem, StageTimer, SyntheticBuilder
from datamodules.synthetic.manifest import OWNER_MARK, read_manifest
from datamodules.synthetic.sources import SourceRef
from lit.errors import UserError

REPO = Path(__file__).resolve().parents[1]


class SolidBuilder(SyntheticBuilder):
    """``count`` queries, each one 8x8 image of grey ``value``; with ``pid_dir`` each render
    writes its process id there and then sleeps ``delay`` seconds (a slow worker)."""

    kind = "solid"

    def __init__(self, count: int = 3, value: float = 0.5, pid_dir: str | None = None, delay: float = 0.0) -> None:
        super().__init__(seed=0)
        self.count, self.value, self.pid_dir, self.delay = count, value, pid_dir, delay

    def parameters(self) -> dict[str, Any]:
        return {"count": self.count, "value": self.value}

    def queries(self) -> list[SourceRef]:
        return [SourceRef(f"q{i}", Path(f"q{i}.png")) for i in range(self.count)]

    def render_query(self, row: int, timer: StageTimer) -> list[RenderedItem]:
        if self.pid_dir is not None:
            (Path(self.pid_dir) / str(os.getpid())).touch()
            time.sleep(self.delay)
        return [RenderedItem(torch.full((3, 8, 8), self.value), {})]


def _user_folder(root: Path) -> dict[str, bytes]:
    """A user's own folder that happens to look like a set: images/*.png and a manifest.json."""
    (root / "images").mkdir(parents=True)
    files = {"images/holiday.png": b"\x89PNG user photo", "images/000000_00.png": b"\x89PNG user file",
             "manifest.json": json.dumps({"photos": ["holiday.png"]}).encode(), "notes.txt": b"mine"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def _contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_users_folder_is_refused_and_left_untouched(tmp_path: Path) -> None:
    root = tmp_path / "project"
    before = _user_folder(root)
    with pytest.raises(UserError, match=rf"output_dir {root} is not empty and was not created by lit.*empty or new"):
        build_synthetic(SolidBuilder(), root, progress=False)
    assert _contents(root) == before  # every png and the manifest survive, byte for byte
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        build_synthetic(SolidBuilder(), tmp_path / "file", progress=False)


def test_new_and_empty_folders_are_claimed_and_rebuilds_delete_only_own_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (tmp_path / "new" / "set", empty):
        report = build_synthetic(SolidBuilder(), root, progress=False)
        assert report.num_items == 3 and (root / OWNER_MARK).is_file()
    root = tmp_path / "new" / "set"
    (root / "images" / "keep_me.png").write_bytes(b"a user's file inside the set")
    (root / "images" / "keep_me.png.tmp").write_bytes(b"another")
    rebuilt = build_synthetic(SolidBuilder(count=2, value=0.25), root, progress=False)  # other header: rebuild
    assert not rebuilt.reused and rebuilt.num_items == 2
    names = sorted(p.name for p in (root / "images").iterdir())
    assert names == ["000000_00.png", "000001_00.png", "keep_me.png", "keep_me.png.tmp"]
    assert (root / "images" / "keep_me.png").read_bytes() == b"a user's file inside the set"


def test_sets_built_before_the_mark_are_still_ours(tmp_path: Path) -> None:
    root = tmp_path / "old"
    build_synthetic(SolidBuilder(), root, progress=False)
    (root / OWNER_MARK).unlink()  # as a set written by an earlier version of the suite
    assert build_synthetic(SolidBuilder(), root, progress=False).reused
    rebuilt = build_synthetic(SolidBuilder(count=1), root, progress=False)
    assert rebuilt.num_items == 1 and (root / OWNER_MARK).is_file()
    assert read_manifest(root)["parameters"]["count"] == 1
    (root / OWNER_MARK).unlink()
    (root / "my_notes.txt").write_text("a user's file beside an old set")
    with pytest.raises(UserError, match="not created by lit"):
        build_synthetic(SolidBuilder(count=2), root, progress=False)
    assert len(read_manifest(root)["items"]) == 1


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_build_workers_die_with_their_parent_on_kill_9(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_synthetic_safety import SolidBuilder
        from datamodules.synthetic.build import build_synthetic
        build_synthetic(SolidBuilder(count=8, pid_dir={str(pids)!r}, delay=120), {str(tmp_path / 'set')!r},
                        progress=False, num_workers=2)
    """)
    build = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline and build.poll() is None:
            time.sleep(0.2)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and build.poll() is None, "the build did not start two rendering workers"
        assert all(_alive(pid) for pid in workers)
        os.kill(build.pid, signal.SIGKILL)
        build.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = [pid for pid in workers if _alive(pid)]
        assert not orphans, f"build workers {orphans} outlived their killed parent"
    finally:
        if build.poll() is None:
            build.kill()
        for pid in (int(p.name) for p in pids.iterdir()):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # only the workers this test started
