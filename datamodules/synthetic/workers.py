"""Build workers that die with the build: a ``kill -9`` of the build leaves no orphan
renderers holding memory (``PR_SET_PDEATHSIG`` on Linux, a parent-pid watchdog elsewhere)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import torch


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """``worker_init_fn`` of build workers: end this worker when ``parent_pid`` dies (a
    ``kill -9`` of the build must not leave renderers holding memory for minutes).

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``);
    elsewhere, or if that call fails, a daemon thread checks the parent id every second.
    Either way a parent that died before this ran is caught by the ``getppid`` check."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="die-with-parent").start()


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


def worker_context(num_workers: int) -> str | None:
    """``fork`` for build workers on Linux, whatever the process default: inside a spawned
    process (``ddp_spawn``, a spawned benchmark) the default becomes ``spawn``, and every
    worker re-imports torch (a 6 s Segmix build took 25 s). Not once CUDA is initialised,
    where a forked child cannot use it."""
    if num_workers == 0 or sys.platform != "linux" or torch.cuda.is_initialized():
        return None
    return "fork"


__all__ = ["die_with_parent", "worker_context"]
