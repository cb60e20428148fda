"""The replication monitor's presentation as pure functions (no Trainer needed).

- :func:`scores_csv`: one check's per-generation top-k scores and training matches;
- :func:`history_csv`: one row per check, the baseline as the last row;
- :func:`summary_table`: the table ``lit fit`` prints at the end (README's demo table);
- :func:`summary_figure`: rates over time, the latest histogram overlay, the latest top copies;
- :func:`settings_text`: what was measured, in words (TensorBoard text, ``descriptor.json``);
- :func:`baseline_legend`, :func:`baseline_prefix`, :func:`mirrors_label`: the labels every
  output carries, so a sampled baseline or mirror-aware matching is never mistaken for the
  default (exact baseline, images matched as they are).

The statistics themselves come from :mod:`lit.replication`; these functions only lay them out.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import Tensor

from lit.plots import replication_summary
from lit.replication import (
    Matches,
    ReplicationStats,
    RowSample,
    format_threshold,
    stat_names,
)

#: Where the history's columns begin: the check's step, epoch and number of generations.
HISTORY_KEYS = ("step", "epoch", "num_samples")
#: Per-check duplicate scalars (beside the rates): duplicates of the generations' top-1 matches.
MATCH_DUPLICATE_KEYS = ("top_match_duplicates_mean", "top_match_duplicates_share")


def mirrors_label(match_mirrors: bool) -> str:
    """``"mirror-aware matching"`` or ``"no mirror matching"``."""
    return "mirror-aware matching" if match_mirrors else "no mirror matching"


def baseline_legend(sample: RowSample) -> str:
    """The baseline's name in figures: ``training vs training``, with the sample when sampled."""
    if sample.exact:
        return "training vs training"
    return f"training vs training, sampled {int(sample.rows.numel())} of {sample.population}"


def baseline_prefix(sample: RowSample) -> str:
    """TensorBoard / ``callback_metrics`` prefix of the baseline's scalars: ``replication_baseline``
    (exact) or ``replication_baseline_sampled``."""
    return "replication_baseline" if sample.exact else "replication_baseline_sampled"


def duplicate_scalars(duplicates: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """From :func:`lit.replication.duplicate_comparison`: the check's scalars (duplicates of the
    top-1 matches) and the baseline's (duplicates of the baseline's training images)."""
    top, training = duplicates["top_matches"], duplicates["random_training"]
    check = {MATCH_DUPLICATE_KEYS[0]: float(top["mean"]), MATCH_DUPLICATE_KEYS[1]: float(top["share_with_duplicates"])}
    base = {"duplicates_mean": float(training["mean"]), "duplicates_share": float(training["share_with_duplicates"])}
    return check, base


def settings_text(descriptor: str, match_mirrors: bool, sample: RowSample, duplicate_threshold: float,
                  num_generations: int) -> str:
    """What the monitor measures, in one paragraph (TensorBoard text ``replication/settings``)."""
    return (f"{num_generations} generations (fixed seeds) vs {sample.population} training images, "
            f"{descriptor} descriptor; {mirrors_label(match_mirrors)} (match_mirrors: "
            f"{str(match_mirrors).lower()}); self-similarity baseline {sample.label}; duplicates: other "
            f"training images with similarity > {duplicate_threshold:g}, counted over the whole training set.")


def scores_csv(seeds: Sequence[int], matches: Matches) -> str:
    """One check as CSV: per generation its seed, top-k scores, training rows and whether each
    match was the mirrored image (``mirrored_i``, always 0 without mirror-aware matching)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    k = matches.scores.shape[1]
    writer.writerow(["seed", *[f"score_{i + 1}" for i in range(k)], *[f"train_index_{i + 1}" for i in range(k)],
                     *[f"mirrored_{i + 1}" for i in range(k)]])
    rows = zip(matches.scores.tolist(), matches.indices.tolist(), matches.mirrored.tolist())
    for seed, (s, m, f) in zip(seeds, rows):
        writer.writerow([seed, *[f"{v:.6f}" for v in s], *m, *[int(x) for x in f]])
    return buffer.getvalue()


def history_csv(history: Sequence[Mapping[str, Any]], thresholds: Sequence[float], match_mirrors: bool,
                baseline: ReplicationStats | None = None, sample: RowSample | None = None) -> str:
    """The history as CSV text, one row per check, the baseline as the last row (its ``step`` says
    ``baseline``, or ``baseline (sampled: n of N training images, seed s)``); every row records
    ``match_mirrors`` (1: mirror-aware matching, 0: none), so every column but the baseline's
    ``step`` is numeric."""
    buffer = io.StringIO()
    columns = [*HISTORY_KEYS, *stat_names(thresholds), *MATCH_DUPLICATE_KEYS, "match_mirrors"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    flag = int(match_mirrors)
    for row in history:
        writer.writerow({**{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()},
                         "match_mirrors": flag})
    if baseline is not None:
        step = "baseline" if sample is None or sample.exact else f"baseline ({sample.label})"
        base = {k: f"{v:.6f}" for k, v in baseline.as_dict().items()}
        writer.writerow({"step": step, "epoch": "", "num_samples": baseline.count, **base, "match_mirrors": flag})
    return buffer.getvalue()


@dataclass(frozen=True)
class Where:
    """Where a run's files are, for the end of :func:`summary_table` (``None``: not written)."""

    tensorboard: str | None = None
    history: Path | None = None
    figure: Path | None = None


def summary_table(history: Sequence[Mapping[str, Any]], thresholds: Sequence[float], *, num_generations: int,
                  num_training: int, descriptor: str, match_mirrors: bool,
                  baseline: ReplicationStats | None = None, sample: RowSample | None = None,
                  duplicates: Mapping[str, Any] | None = None, timings: Mapping[str, float] | None = None,
                  where: Where = Where()) -> str:
    """The rate over time as a table, the baseline (and how it was taken), the duplicates, the
    time spent and where the files are: what ``lit fit`` prints at the end."""
    names = stat_names(thresholds)[: len(thresholds) + 2]
    header = f"{'step':>8} {'epoch':>6} " + " ".join(f"{n:>11}" for n in names)
    title = (f"Replication over training: {num_generations} generations (fixed seeds) vs {num_training} training "
             f"images, {descriptor} descriptor, {mirrors_label(match_mirrors)}; "
             f"rate@t = share of generations whose nearest training image scores > t")
    lines = [title, header]
    for row in history:
        lines.append(f"{int(row['step']):>8} {int(row['epoch']):>6} " + " ".join(f"{row[n]:>11.3f}" for n in names))
    if baseline is not None:
        base = baseline.as_dict()
        how = "" if sample is None or sample.exact else f"; {sample.label}"
        lines.append(f"{'baseline':>8} {'':>6} " + " ".join(f"{base[n]:>11.3f}" for n in names)
                     + f"   (training images vs each other{how})")
    if duplicates is not None:
        training, top = duplicates["random_training"], duplicates["top_matches"]
        lines.append(f"duplicates (other training images with similarity > {duplicates['threshold']:g}): "
                     f"{round(training['share_with_duplicates'] * training['count'])} of {training['count']} "
                     f"training images have one (mean {training['mean']:.2f}); the latest top-1 matches "
                     f"have {top['mean']:.2f} on average")
    if timings:
        total = sum(timings.values())
        lines.append("monitor time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
                     + f" (total {total:.1f}s)")
    if where.tensorboard is not None:
        lines.append(f"TensorBoard logs: {where.tensorboard}  (tensorboard --logdir {Path(where.tensorboard).parent})")
    if where.history is not None:
        lines.append(f"history CSV: {where.history}")
    if where.figure is not None:
        lines.append(f"summary PNG (rates over time, histogram overlay, top copies): {where.figure}")
    return "\n".join(lines)


def training_name(row: int, names: Sequence[str]) -> str:
    """A training row as the grids name it: ``train #row`` or ``#row <file name>`` (24 characters at most)."""
    if row < 0:
        return "-"
    name = Path(names[row]).name if row < len(names) else ""
    return f"train #{row}" if name in ("", str(row)) else f"#{row} {name}"[:24]


def copy_labels(seeds: Sequence[int], shown: Tensor, matches: Matches,
                names: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Titles of the top-copies grid: ``seed s`` per shown generation, the training names of its
    matches (``(mirror)`` where the match was the flipped image)."""
    labels = [f"seed {seeds[int(p)]}" for p in shown]
    match_labels = [[training_name(int(j), names) + (" (mirror)" if m else "") for j, m in zip(row, flips)]
                    for row, flips in zip(matches.indices[shown].tolist(), matches.mirrored[shown].tolist())]
    return labels, match_labels


def summary_figure(history: Sequence[Mapping[str, Any]], thresholds: Sequence[float], top1: Tensor,
                   baseline_scores: Tensor, baseline: ReplicationStats, sample: RowSample, generations: Tensor,
                   matches: Tensor, scores: Tensor, labels: Sequence[str], match_labels: Sequence[Sequence[str]],
                   *, num_generations: int, descriptor: str, match_mirrors: bool) -> Figure:
    """The PNG written at the end of fit: rates over time (the baseline's dotted), the latest
    histogram overlay, the latest top copies beside their training matches."""
    steps = [int(row["step"]) for row in history]
    names = [f"rate@{format_threshold(t)}" for t in thresholds]
    rates = {name: [row[name] for row in history] for name in names}
    base_rates = {k: v for k, v in baseline.as_dict().items() if k in rates}
    return replication_summary(
        steps, rates, top1, baseline_scores, generations, matches, scores, thresholds, labels, match_labels,
        base_rates, title=f"replication of {num_generations} generations ({descriptor} descriptor, "
                          f"{mirrors_label(match_mirrors)})",
        baseline_label=baseline_legend(sample),
    )
