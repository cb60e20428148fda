"""Cost of the ReplicationMonitor at the demo's cadence (target <= 10% of the run's wall time).

Runs ``configs/demo.yaml`` (the main job) and reads the monitor's own clock,
split into reference embedding + baseline, sampling, embedding, search (with
the DDP gather) and logging (scalars, histograms, figures, CSV files). With
``--compare`` it then runs the same config without the monitor, side by side,
and reports the wall-time difference as a second estimate.

    .venv/bin/python benchmarks/bench_monitor_overhead.py                # the demo, ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_monitor_overhead.py --max-steps 400 --compare
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from callbacks.replication import ReplicationMonitor  # noqa: E402
from lit.commands.lightning_cli import LitCLI  # noqa: E402

MONITOR = "callbacks.replication.ReplicationMonitor"


def run(config: Path, save_dir: str, max_steps: int | None) -> tuple[float, ReplicationMonitor | None, int]:
    """Fit ``config``; returns (wall seconds of the fit, the monitor if any, steps done)."""
    args = ["-c", str(config), f"--trainer.logger.init_args.save_dir={save_dir}",
            "--trainer.enable_progress_bar=false"]
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    cli = LitCLI(args=args, run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - start
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, ReplicationMonitor)]
    return wall, (monitors[0] if monitors else None), cli.trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--max-steps", type=int, default=None, help="shorten the run (default: the config's)")
    parser.add_argument("--compare", action="store_true", help="also run without the monitor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wall, monitor, steps = run(args.config, tmp, args.max_steps)
        assert monitor is not None, f"{args.config} has no {MONITOR}"
        spent = sum(monitor.timings.values())
        print(f"\n{args.config.name}: {steps} steps, {len(monitor.history)} checks "
              f"({len(monitor.seeds)} generations each), fit wall {wall:.1f} s")
        print(f"{'phase':>10} {'seconds':>8} {'% of wall':>9}")
        for phase, seconds in monitor.timings.items():
            print(f"{phase:>10} {seconds:>8.1f} {100 * seconds / wall:>8.1f}%")
        print(f"{'monitor':>10} {spent:>8.1f} {100 * spent / wall:>8.1f}%   (target <= 10%)")
        if args.compare:
            plain = yaml.safe_load(args.config.read_text())
            plain["trainer"]["callbacks"] = [c for c in plain["trainer"]["callbacks"] if c["class_path"] != MONITOR]
            without = Path(tmp) / "without_monitor.yaml"
            without.write_text(yaml.safe_dump(plain))
            wall_without, _, _ = run(without, tmp, args.max_steps)
            extra = wall - wall_without
            print(f"without monitor: fit wall {wall_without:.1f} s -> monitor adds {extra:.1f} s "
                  f"({100 * extra / wall:.1f}% of the monitored run)")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
