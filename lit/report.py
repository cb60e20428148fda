"""Plain-text reports: metrics as Markdown tables (files are written with :mod:`lit.files`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


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
