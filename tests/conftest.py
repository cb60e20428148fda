"""Test-wide settings: one intra-op thread.

The tests use tiny tensors, for which two contending threads on a 2-core
machine are 10-40x slower than one (measured on test_procedural).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
