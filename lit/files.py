"""Files the suite writes: atomic writes, checksums, and folders claimed with a marker.

- :func:`atomic_path` / :func:`write_bytes_atomic` / :func:`write_text_atomic` /
  :func:`write_json`: a file appears whole or not at all (temporary file beside it, then
  ``os.replace``), so a killed run never leaves a half-written file behind;
- :func:`file_sha256`: the SHA-256 of a file's bytes (weights, checkpoints, shards);
- :func:`claim_folder`: an output folder is the suite's own (its marker file is there) or
  new / empty, else it is refused with one line: a user's files are never replaced;
- :func:`folder_lock`: one writer at a time in a folder (a lock file holding the writer's
  process id; a stale one, left by a process that is gone, is taken over with a warning).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from lit.errors import UserError


def _file_mode() -> int:
    """Mode a plain ``open()`` would give a new file under this process's umask.

    Read from ``/proc/self/status`` where Linux offers it: setting the umask to read it
    back would briefly change it for every thread of the process (TensorBoard writers)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temporary file gets the umask's mode (``mkstemp`` alone would leave 0600,
    unreadable to the other users of a shared results folder); on failure it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (atomically)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path, *, cached: bool = True) -> str:
    """SHA-256 of a file's bytes; ``cached``: remembered per resolved path, size and modification
    time (weights are hashed once a process); ``cached=False`` always reads the file again."""
    resolved = Path(path).expanduser().resolve()
    if not cached:
        return _sha256_of(resolved)
    stat = resolved.stat()
    return _sha256_cached(str(resolved), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """:func:`_sha256_of` remembered per path; ``size`` and ``mtime_ns`` are part of the key only."""
    return _sha256_of(Path(path))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def claim_folder(folder: str | Path, marker: str, *, label: str, refusal: str | None = None,
                 note: str | None = None, is_ours: Callable[[Path], bool] | None = None,
                 ignorable: Callable[[str], object] | None = None) -> bool:
    """Make ``folder`` one the suite may write (and delete its own files) in, or refuse.

    Returns True when the folder is the suite's already (``is_ours(folder)``; default: the
    ``marker`` file exists), False when it was new or empty and is now claimed: created, with
    ``marker`` written holding ``note`` (``note=None``: the caller writes the marker itself).
    Refused with a one-line :class:`UserError` (nothing is touched): a file at ``folder``
    (``"<label> is a file, not a folder ..."``), or a folder holding names other than
    ``ignorable`` ones without being ours (``refusal``, in which ``{found}`` stands for the
    first foreign names; appended in brackets when absent).
    """
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise UserError(f"{label} is a file, not a folder; choose an empty or new folder")
    if is_ours(root) if is_ours is not None else (root / marker).is_file():
        return True
    if root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if not (ignorable and ignorable(p.name)))
        if foreign:
            found = foreign[0] + (", ..." if len(foreign) > 1 else "")
            message = refusal or (f"{label} is not empty and was not made by lit (no {marker} file): "
                                  "its files are left alone; choose an empty or new folder")
            raise UserError(message.replace("{found}", found) if "{found}" in message else f"{message} ({found})")
    root.mkdir(parents=True, exist_ok=True)
    if note is not None:
        write_text_atomic(root / marker, note)
    return False


class StaleLockWarning(UserWarning):
    """A lock file left by a process that is gone was taken over."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(handle: int) -> int | None:
    os.lseek(handle, 0, os.SEEK_SET)
    text = os.read(handle, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


@contextmanager
def folder_lock(folder: str | Path, *, label: str, name: str = ".lit.lock") -> Iterator[Path]:
    """Hold ``folder/name`` for the block: one writer at a time in ``folder`` (which must exist).

    The lock file holds this process's id and an exclusive ``flock`` while the block runs; it is
    removed at the end. A second writer (the ``flock`` is held, or the file names another live
    process: a lock is never taken from a running process) is refused with one line that names
    ``label``, the process and the file. A lock file whose process is gone (killed) is taken over
    with a :class:`StaleLockWarning`. Yields the lock file.
    """
    path = Path(folder) / name
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                break  # a file system without flock: the process id alone decides (below)
            os.close(handle)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            owner = _pid_in(path)
            raise UserError(f"{label} is being written by another lit process{owner} (lock file {path}); "
                            "wait for it to finish") from None
        try:
            if os.fstat(handle).st_ino != path.stat().st_ino:  # removed by its last holder meanwhile
                raise FileNotFoundError(path)
        except FileNotFoundError:
            os.close(handle)
            continue
        break
    try:
        previous = _read_pid(handle)
        if previous is not None and previous != os.getpid() and pid_alive(previous):
            raise UserError(f"{label} is being written by process {previous} (lock file {path}); wait for it "
                            f"to finish, or delete {path} if no lit process {previous} is running")
        if previous is not None:  # our own id too (reused after a restart): no lock of ours holds the flock
            warnings.warn(f"{label}: taking over the lock {path} of process {previous}, which is no longer "
                          "running (a killed run)", StaleLockWarning, stacklevel=3)
        os.ftruncate(handle, 0)
        os.lseek(handle, 0, os.SEEK_SET)
        os.write(handle, f"{os.getpid()}\n".encode("ascii"))
        os.fsync(handle)
    except BaseException:
        os.close(handle)
        raise
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # still holding the flock: no one can take a removed file
        os.close(handle)


def _pid_in(path: Path) -> str:
    """`` <pid>`` as written in a lock file, or nothing when it cannot be read."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {text})" if text.isdigit() else ""
