"""lit.files: atomic writes (content, file mode under the umask, no leftovers on failure), checksums, claimed folders."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lit.errors import UserError
from lit.files import (
    StaleLockWarning,
    atomic_path,
    claim_folder,
    file_sha256,
    folder_lock,
    write_json,
    write_text_atomic,
)
from lit.plots import new_figure, save_figure
from lit.seeding import derive_seed


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


# ----------------------------------------------------------------------------- checksums, claimed folders


def test_file_sha256_cached_and_fresh(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    expected = hashlib.sha256(b"abc").hexdigest()
    assert file_sha256(path) == file_sha256(path, cached=False) == expected
    stat_before = path.stat()
    path.write_bytes(b"abd")  # same size; a rewrite with the old times restored fools the cache only
    os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert file_sha256(path, cached=False) == hashlib.sha256(b"abd").hexdigest()


def test_claim_folder_new_empty_ours_and_foreign(tmp_path: Path) -> None:
    new = tmp_path / "new" / "deep"
    assert claim_folder(new, ".mine", label="--out new", note="made by a test\n") is False
    assert (new / ".mine").read_text() == "made by a test\n"
    assert claim_folder(new, ".mine", label="--out new") is True  # ours now, even with files in it
    (new / "result.csv").write_text("x")
    assert claim_folder(new, ".mine", label="--out new") is True

    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_folder(empty, ".mine", label="--out empty") is False and not (empty / ".mine").exists()

    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"jpeg")
    (user / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"^--out photos is not empty and was not made by lit \(no \.mine file\).*"
                                        r"\(holiday\.jpg, \.\.\.\)$"):
        claim_folder(user, ".mine", label="--out photos")
    with pytest.raises(UserError, match=r"^they hold notes\.txt, so no$"):
        claim_folder(user, ".mine", label="x", refusal="they hold {found}, so no",
                     ignorable=lambda name: name.endswith(".jpg"))
    assert sorted(p.name for p in user.iterdir()) == ["holiday.jpg", "notes.txt"]  # untouched
    assert claim_folder(user, ".mine", label="x", ignorable=lambda name: True) is False
    assert not (user / ".mine").exists()  # note=None: the caller writes its marker itself

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=r"^--out file is a file, not a folder"):
        claim_folder(a_file, ".mine", label="--out file")


def test_derive_seed_is_stable_ordered_and_typed() -> None:
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed("1", 2) != derive_seed(1, 2)
    assert all(0 <= derive_seed(i, "x") < 2**63 for i in range(100))
    # the values every procedural scene and training seed depends on: blake2b of the parts' repr
    expected = int.from_bytes(hashlib.blake2b(b"(3, 'copy', 7)", digest_size=8).digest(), "little") >> 1
    assert derive_seed(3, "copy", 7) == expected


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_folder_lock_holds_the_pid_and_is_removed(tmp_path: Path) -> None:
    with folder_lock(tmp_path, label="--out x", name=".lock") as lock:
        assert lock == tmp_path / ".lock"
        assert lock.read_text().strip() == str(os.getpid())
        with (
            pytest.raises(UserError, match=r"^--out x is being written by another lit process"),
            folder_lock(tmp_path, label="--out x", name=".lock"),  # a second writer, even in-process
        ):
            pass
        assert lock.read_text().strip() == str(os.getpid())  # the refusal left the holder's lock alone
    assert not (tmp_path / ".lock").exists()


def test_folder_lock_refuses_a_live_holder_in_another_process(tmp_path: Path) -> None:
    code = ("import sys, time\n"
            "from lit.files import folder_lock\n"
            "with folder_lock(sys.argv[1], label='x', name='.lock'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(UserError, match=rf"another lit process \(process {holder.pid}\)"),
            folder_lock(tmp_path, label="--out x", name=".lock"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with (
        pytest.warns(StaleLockWarning, match=rf"process {holder.pid}, which is no longer running"),
        folder_lock(tmp_path, label="--out x", name=".lock") as lock,  # killed: its lock is stale
    ):
        assert lock.read_text().strip() == str(os.getpid())


def test_folder_lock_takes_over_a_dead_pid_and_never_a_live_one(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    dead = _dead_pid()
    lock.write_text(f"{dead}\n")
    with (
        pytest.warns(StaleLockWarning, match=rf"taking over the lock .* of process {dead}"),
        folder_lock(tmp_path, label="--out x", name=".lock"),
    ):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a lock file naming a running process (written without flock): never taken over
        lock.write_text(f"{sleeper.pid}\n")
        with (
            pytest.raises(UserError, match=rf"^--out x is being written by process {sleeper.pid} "),
            folder_lock(tmp_path, label="--out x", name=".lock"),
        ):
            pass
        assert lock.read_text().strip() == str(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
