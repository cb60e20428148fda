"""Collect the ``metrics.json`` of several ``lit test`` runs into the paper's Table 1.

Rows are descriptors, columns datasets; cells are mAP (percent), the best value
of each column is marked in bold, and the last column is the average rank of
the descriptor over the datasets it was run on (1 = best; ties share the mean
of their ranks, as ``scipy.stats.rankdata(method="average")``). Recall@k and
MRR tables are written alongside, as Markdown and CSV, and a last table says what
each run measured (descriptor, weights file and SHA-256, random init, input
size, similarity, normalisation, from the ``descriptor_config`` that ``lit test``
records). A row is named by the run's ``run_name``, else the descriptor's
display name: a random-init run shows as ``<name> (random init)``, never under
the real descriptor's name.

Use: ``lit report RUNS_DIR [RUNS_DIR ...] --out reports/table1``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit.errors import UserArgumentParser, UserError
from lit.files import write_text_atomic
from lit.report import format_value, markdown_table


@dataclass(frozen=True)
class RunResult:
    """One evaluated (descriptor, dataset) pair read from a metrics.json."""

    descriptor: str
    dataset: str
    metrics: dict[str, float]
    path: Path
    record: dict[str, Any] | None = None  # DescriptorConfig.record() of the run (None in old files)


def row_name(payload: dict[str, Any]) -> str:
    """The Table 1 row of a metrics.json: ``run_name``, else the descriptor's display name
    (``<name> (random init)`` for random weights), else the descriptor name (old files)."""
    record = payload.get("descriptor_config") or {}
    if payload.get("run_name"):
        return str(payload["run_name"])
    if record.get("display_name"):
        return str(record["display_name"])
    return str(payload["descriptor"]) + (" (random init)" if record.get("random_init") else "")


def load_runs(roots: Sequence[str | Path]) -> list[RunResult]:
    """Every metrics.json under the given folders; the newest wins for a repeated pair."""
    found: dict[tuple[str, str], RunResult] = {}
    files: list[Path] = []
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"no such runs folder: {root}")
        files += [root] if root.is_file() else sorted(root.rglob("metrics.json"))
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{path} is not a lit test metrics.json: invalid JSON ({error})") from error
        missing = {"metrics", "descriptor"} - payload.keys() if isinstance(payload, dict) else {"metrics", "descriptor"}
        if missing:
            raise UserError(f"{path} is not a lit test metrics.json: missing {sorted(missing)}")
        name = row_name(payload)
        dataset = payload.get("dataset") or path.parent.parent.name
        if (name, dataset) in found:
            warnings.warn(f"{path} replaces {found[(name, dataset)].path} for ({name}, {dataset}): "
                          "the newest metrics.json of a (descriptor, dataset) pair wins", stacklevel=2)
        found[(name, dataset)] = RunResult(name, dataset, payload["metrics"], path, payload.get("descriptor_config"))
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


MEASURED_COLUMNS = ["run", "dataset", "descriptor", "weights", "sha256", "random init", "input size",
                    "similarity", "normalisation"]


def measured(runs: Sequence[RunResult]) -> tuple[str, str]:
    """(Markdown, CSV) of what each run measured; warns when one row mixes descriptor setups."""
    rows = []
    for run in sorted(runs, key=lambda r: (r.descriptor, r.dataset)):
        record = run.record or {}

        def cell(key: str) -> str:
            value = record.get(key)
            return "–" if value is None else str(value)

        weights = Path(record["weights"]).name if record.get("weights") else "–"
        sha = str(record["weights_sha256"])[:12] if record.get("weights_sha256") else "–"
        rows.append([run.descriptor, run.dataset, cell("name"), weights, sha, cell("random_init"),
                     cell("input_size"), cell("similarity"), cell("token_normalization")])
    by_row: dict[str, set[tuple[str, ...]]] = {}
    for row in rows:
        by_row.setdefault(row[0], set()).add(tuple(row[2:]))
    for name, setups in by_row.items():
        if len(setups) > 1:
            warnings.warn(f"row {name!r} of the report mixes {len(setups)} descriptor setups (weights, input size "
                          "or similarity differ between datasets): give the runs distinct run_name", stacklevel=2)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(MEASURED_COLUMNS)
    writer.writerows(rows)
    return markdown_table(MEASURED_COLUMNS, rows), buffer.getvalue()


def build_report(runs: Sequence[RunResult], out: Path, extra_metrics: Sequence[str]) -> Path:
    """Write table1.md/.csv (mAP + avg. rank), one table per extra metric and what each run
    measured (runs.csv); return the .md."""
    sections = []
    for metric in ["mAP", *extra_metrics]:
        table = pivot(runs, metric)
        if not table:
            continue
        markdown, csv_text = render(table, with_rank=metric == "mAP")
        stem = "table1" if metric == "mAP" else f"table_{metric.replace('@', '_at_')}"
        write_text_atomic(out / f"{stem}.csv", csv_text)
        sections.append(f"## {metric} (%)\n\n{markdown}")
    markdown, csv_text = measured(runs)
    write_text_atomic(out / "runs.csv", csv_text)
    sections.append(f"## What was measured\n\n{markdown}")
    report = out / "table1.md"
    write_text_atomic(report, "\n".join(sections))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``lit report``: the Table 1 layout from the metrics.json files of ``lit test`` runs."""
    parser = UserArgumentParser(prog="lit report", description=__doc__.splitlines()[0])
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
