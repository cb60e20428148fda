"""Pieces that make ``lit fit --ckpt_path`` continue exactly where the checkpoint left off.

- every random draw of training is seeded with :func:`lit.seeding.derive_seed` of where it
  happens (run seed, epoch, item, rank, batch...) rather than by a process-global
  generator that a kill loses.
- :func:`run_seed`: the run's seed as Lightning's own ``DistributedSampler`` takes it
  (``seed_everything``'s ``PL_GLOBAL_SEED``, 0 when unset), the same on every rank.
- :func:`close_finished_epoch`: repairs the loop progress of a checkpoint written in
  ``on_train_epoch_end`` (``ModelCheckpoint(every_n_epochs=...)``) before Lightning reads
  it. Lightning 2.6 resumes such a checkpoint under ``max_steps`` without a validation
  loop by running one extra batch "in" the finished epoch (a second ``epoch=E-step=S+1``
  checkpoint, a monitor check one step late, every later step shifted by one) and counts
  that epoch twice (the next epoch's sampler epoch skips one).
"""

from __future__ import annotations

import os
from typing import Any


def run_seed() -> int:
    """The run's global seed (``seed_everything``), 0 when none was set; identical on every DDP rank."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def close_finished_epoch(checkpoint: dict[str, Any]) -> bool:
    """Mark an epoch that ended before the checkpoint was written as completed, with no batch
    of the next epoch started yet, in ``checkpoint["loops"]["fit_loop"]`` (in place).

    A checkpoint written in ``on_train_epoch_end`` has the epoch ``processed`` but not yet
    ``completed``; a checkpoint that Lightning resumes as "the next epoch, from its first
    batch" has both equal and the batch counters of the epoch at zero. Returns whether the
    checkpoint was changed (mid-epoch and already-closed checkpoints are left as they are).
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or "epoch_progress" not in fit:
        return False
    epochs = fit["epoch_progress"]
    current, total = epochs["current"], epochs["total"]
    ended = all(p["ready"] == p["started"] == p["processed"] == p["completed"] + 1 for p in (current, total))
    if not ended:
        return False
    current["completed"] = current["processed"]
    total["completed"] = total["processed"]
    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress"):
        if key in fit:
            fit[key]["current"] = dict.fromkeys(fit[key]["current"], 0)
            if "is_last_batch" in fit[key]:
                fit[key]["is_last_batch"] = False
    optim = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
    for part in optim.values():
        part["current"] = dict.fromkeys(part["current"], 0)
    return True
