"""Collect the ``metrics.json`` of several ``lit test`` runs into the paper's Table 1.

Rows are descriptors, columns datasets; cells are mAP (percent), the best value
of each column is marked in bold, and the last column is the average rank of
the descriptor over the datasets it was run on (1 = best; ties share the mean
of their ranks, as ``scipy.stats.rankdata(method="average")``). Recall@k and
MRR tables are written alongside, as Markdown and CSV.

Use: ``lit report RUNS_DIR [RUNS_DIR ...] --out reports/table1``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lit.report import format_value, markdown_table, write_text_atomic


@dataclass(frozen=True)
class RunResult:
    """One evaluated (descriptor, dataset) pair read from a metrics.json."""

    descriptor: str
    dataset: str
    metrics: dict[str, float]
    path: Path


def load_runs(roots: Sequence[str | Path]) -> list[RunResult]:
    """Every metrics.json under the given folders; the newest wins for a repeated pair."""
    found: dict[tuple[str, str], RunResult] = {}
    files: list[Path] = []
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"no such runs folder: {root}")
        files += [root] if root.is_file() else sorted(root.rglob("metrics.json"))
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        payload = json.loads(path.read_text())
        missing = {"metrics", "descriptor"} - payload.keys()
        if missing:
            raise ValueError(f"{path} is not a lit test metrics.json: missing {sorted(missing)}")
        name = payload.get("run_name") or payload["descriptor"]
        dataset = payload.get("dataset") or path.parent.parent.name
        if (name, dataset) in found:
            warnings.warn(f"{path} replaces {found[(name, dataset)].path} for ({name}, {dataset}): "
                          "the newest metrics.json of a (descriptor, dataset) pair wins", stacklevel=2)
        found[(name, dataset)] = RunResult(name, dataset, payload["metrics"], path)
    if not found:
        raise FileNotFoundError(f"no metrics.json under {', '.join(map(str, roots))}")
    return list(found.values())


def average_ranks(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean rank of each row over the columns it has (higher value = better = rank 1)."""
    columns = sorted({c for row in table.values() for c in row})
    ranks: dict[str, list[float]] = {row: [] for row in table}
    for column in columns:
        entries = sorted(
            ((values[column], row) for row, values in table.items() if column in values),
            key=lambda item: -item[0],
        )
        position = 0
        while position < len(entries):
            tied = [e for e in entries[position:] if e[0] == entries[position][0]]
            shared = position + (len(tied) + 1) / 2  # mean of ranks position+1 .. position+len
            for _, row in tied:
                ranks[row].append(shared)
            position += len(tied)
    return {row: (sum(r) / len(r) if r else math.nan) for row, r in ranks.items()}


def pivot(runs: Sequence[RunResult], metric: str) -> dict[str, dict[str, float]]:
    """descriptor -> dataset -> value of one metric."""
    table: dict[str, dict[str, float]] = {}
    for run in runs:
        if metric in run.metrics:
            table.setdefault(run.descriptor, {})[run.dataset] = float(run.metrics[metric])
    return table


def render(table: dict[str, dict[str, float]], with_rank: bool) -> tuple[str, str]:
    """(Markdown, CSV) of a pivot table in percent, best per column in bold."""
    datasets = sorted({c for row in table.values() for c in row})
    best = {c: max(row[c] for row in table.values() if c in row) for c in datasets}
    ranks = average_ranks(table) if with_rank else {}
    order = sorted(table, key=lambda r: (ranks.get(r, 0.0), r))
    header = ["descriptor", *datasets] + (["avg. rank"] if with_rank else [])
    rows, csv_buffer = [], io.StringIO()
    writer = csv.writer(csv_buffer)
    writer.writerow(header)
    for row in order:
        cells, raw = [row], [row]
        for column in datasets:
            value = table[row].get(column)
            if value is None:
                cells.append("–")
                raw.append("")
                continue
            text = format_value(value)
            cells.append(f"**{text}**" if value == best[column] else text)
            raw.append(text)
        if with_rank:
            cells.append(f"{ranks[row]:.2f}")
            raw.append(f"{ranks[row]:.2f}")
        rows.append(cells)
        writer.writerow(raw)
    return markdown_table(header, rows), csv_buffer.getvalue()


def build_report(runs: Sequence[RunResult], out: Path, extra_metrics: Sequence[str]) -> Path:
    """Write table1.md/.csv (mAP + avg. rank) and one table per extra metric; return the .md."""
    sections = []
    for metric in ["mAP", *extra_metrics]:
        table = pivot(runs, metric)
        if not table:
            continue
        markdown, csv_text = render(table, with_rank=metric == "mAP")
        stem = "table1" if metric == "mAP" else f"table_{metric.replace('@', '_at_')}"
        write_text_atomic(out / f"{stem}.csv", csv_text)
        sections.append(f"## {metric} (%)\n\n{markdown}")
    report = out / "table1.md"
    write_text_atomic(report, "\n".join(sections))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``lit report``: the Table 1 layout from the metrics.json files of ``lit test`` runs."""
    parser = argparse.ArgumentParser(prog="lit report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="folders searched for metrics.json (or the files)")
    parser.add_argument("--out", default="reports/table1", help="output folder")
    parser.add_argument(
        "--metrics", nargs="*", default=["recall@1", "recall@10", "MRR"],
        help="metrics tabulated beside mAP",
    )
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    report = build_report(runs, Path(args.out), args.metrics)
    print(report.read_text())
    print(f"Report: {report} (CSV beside it), from {len(runs)} runs")
