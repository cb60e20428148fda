"""Plain-file reports: metrics as JSON and Markdown tables.

Files are written atomically (temporary file, then rename) so a killed run
never leaves a half-written report behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def format_value(value: float) -> str:
    """Format a metric in [0, 1] as a percentage with two decimals (the paper's style)."""
    return f"{100.0 * value:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table with the first column left-aligned."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError("every row must have as many cells as the header")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metrics_markdown(metrics: Mapping[str, float], title: str) -> str:
    """One-row Markdown table of retrieval metrics (percentages), titled by the run."""
    names = list(metrics)
    return markdown_table(["run", *names], [[title, *(format_value(metrics[n]) for n in names)]])
