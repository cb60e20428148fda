"""Shared harness of the training-step benchmarks (``bench_ddpm_step.py``, ``bench_mocov3_step.py``).

Each benchmark times one model under ``pl.Trainer`` and as a plain PyTorch loop.
Every variant runs in its own subprocess (so its peak RSS is its own), the
variants alternate for several rounds (machine load drifts hit both), the first
``warmup`` steps of each run are not timed, and the Lightning clock, like the
plain loop's, runs from batch end to batch end (fetching the batch included).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def load_config(path: Path) -> tuple[dict, dict]:
    """(model init_args, data init_args) of a training config."""
    config = yaml.safe_load(path.read_text())
    return config["model"]["init_args"], config["data"]["init_args"]


def lightning_step_times(model: Any, datamodule: Any, steps: int, prefix: str) -> list[float]:
    """Per-step seconds of ``model`` under pl.Trainer on the CPU (no checkpoint or progress bar;
    a TensorBoard logger writing every 10 steps, as the demos do)."""
    import pytorch_lightning as pl

    times: list[float] = []

    class Clock(pl.Callback):
        """Time between consecutive batch ends (every Lightning hook between steps included)."""

        def on_train_start(self, *args: object) -> None:
            self.last = time.perf_counter()

        def on_train_batch_end(self, *args: object) -> None:
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=10,
                             logger=pl.loggers.TensorBoardLogger(folder), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()])
        trainer.fit(model, datamodule=datamodule)
    return times


def print_child_result(variant: str, run: Callable[[], list[float]], warmup: int) -> None:
    """Run one variant and print its timing and peak RSS as one JSON line (in the child process)."""
    started = time.perf_counter()
    times = run()
    timed = times[warmup:]
    print(json.dumps({
        "variant": variant, "mean": statistics.fmean(timed), "median": statistics.median(timed),
        "wall": time.perf_counter() - started, "steps": len(times),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def compare_in_subprocesses(script: str, child_args: Sequence[str], rounds: int, title: str) -> None:
    """Alternate ``plain`` and ``lightning`` children of ``script`` for ``rounds`` rounds; print
    per-round figures, then the median ms/step, peak RSS and the lightning / plain ratio."""
    results: dict[str, list[dict[str, float]]] = {"plain": [], "lightning": []}
    for round_ in range(rounds):
        for variant in ("plain", "lightning") if round_ % 2 == 0 else ("lightning", "plain"):
            command = [sys.executable, script, "--child", variant, *child_args]
            out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results[variant].append(result)
            print(f"round {round_ + 1} {variant:>9}: {1000 * result['median']:.1f} ms/step median, "
                  f"{1000 * result['mean']:.1f} mean, peak RSS {result['max_rss_mb']:.0f} MB", flush=True)
    plain = statistics.median(r["median"] for r in results["plain"])
    light = statistics.median(r["median"] for r in results["lightning"])
    ratios = [lr["median"] / pr["median"] for lr, pr in zip(results["lightning"], results["plain"])]
    print(f"\n{title}")
    print(f"{'variant':>10} {'ms/step (median)':>17} {'peak RSS MB':>12}")
    for name, value in (("plain", plain), ("lightning", light)):
        rss = max(r["max_rss_mb"] for r in results[name])
        print(f"{name:>10} {1000 * value:>17.1f} {rss:>12.0f}")
    print(f"ratio lightning / plain: {light / plain:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
          "target <= 1.05)")
