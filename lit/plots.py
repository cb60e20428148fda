"""Figures of the replication reports (matplotlib, no display needed).

- :func:`similarity_histogram`: top-1 similarity of generations overlaid on the
  self-similarity baseline of the training set (the paper's Fig. 5);
- :func:`top_copies_grid`: the most-copied generations beside their top-k
  training matches with scores (Fig. 3 / 4);
- :func:`rate_over_time`: replication rates along training;
- :func:`replication_summary`: the three in one figure (the demo's PNG);
- :func:`duplicates_histogram`: duplicate counts of sets of training images (Fig. 11 right).

Figures are plain ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot
state), so they work headless, in threads and under DDP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from torch import Tensor

from lit.files import atomic_path

GENERATION_COLOUR = "tab:red"
BASELINE_COLOUR = "tab:blue"


def new_figure(width: float, height: float) -> Figure:
    """A figure bound to an Agg canvas (renders without a display)."""
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG through a temporary file (a killed run leaves no half PNG)."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def draw_similarity_histogram(ax: Axes, generation: Tensor, baseline: Tensor,
                              thresholds: Sequence[float] = (), bins: int = 40,
                              title: str = "top-1 similarity",
                              baseline_label: str = "training vs training") -> None:
    """Overlay density histograms of generation top-1 scores and the training self-similarity
    (``baseline_label`` names the latter in the legend, e.g. when it was sampled)."""
    gen = generation.detach().double().cpu().numpy()
    base = baseline.detach().double().cpu().numpy()
    values = np.concatenate([gen, base])
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    edges = np.linspace(low, high, bins + 1)
    ax.hist(base, bins=edges, density=True, alpha=0.5, color=BASELINE_COLOUR,
            label=f"{baseline_label} (n={base.size})")
    ax.hist(gen, bins=edges, density=True, alpha=0.5, color=GENERATION_COLOUR,
            label=f"generations vs training (n={gen.size})")
    for t in thresholds:
        if low <= t <= high:
            ax.axvline(t, color="0.3", linestyle="--", linewidth=0.8)
    ax.set_xlabel("similarity to nearest training image")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize="small")


def similarity_histogram(generation: Tensor, baseline: Tensor, thresholds: Sequence[float] = (),
                         bins: int = 40, title: str = "top-1 similarity",
                         baseline_label: str = "training vs training") -> Figure:
    """The paper's Fig. 5: generation top-1 similarity over the self-similarity baseline."""
    figure = new_figure(6.0, 4.0)
    draw_similarity_histogram(figure.add_subplot(1, 1, 1), generation, baseline, thresholds, bins, title,
                              baseline_label)
    return figure


def duplicates_histogram(series: Sequence[tuple[Tensor, str, str]], threshold: float,
                         title: str = "duplicates in the training set") -> Figure:
    """Fig. 11 right: for each ``(counts, colour, name)``, the share of its images with each number
    of duplicates (training images with similarity > ``threshold``), overlaid; empty series left out."""
    figure = new_figure(6.0, 4.0)
    ax = figure.add_subplot(1, 1, 1)
    top = max((int(counts.max()) for counts, _, _ in series if counts.numel()), default=0)
    edges = np.arange(-0.5, max(top, 1) + 1.5, 1.0)
    for counts, colour, name in series:
        if counts.numel():
            values = counts.double().numpy()
            ax.hist(values, bins=edges, density=True, alpha=0.5, color=colour,
                    label=f"{name} (n={values.size}, mean {values.mean():.2f})")
    ax.set_xlabel(f"training images with similarity > {threshold:g} (duplicates)")
    ax.set_ylabel("share")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return figure


def draw_top_copies(target: Figure | SubFigure, generations: Tensor, matches: Tensor, scores: Tensor,
                    labels: Sequence[str] | None = None,
                    match_labels: Sequence[Sequence[str]] | None = None) -> None:
    """One row per generation: the generation, then its k training matches titled with scores."""
    rows, k = int(scores.shape[0]), int(scores.shape[1]) if scores.ndim == 2 else 0
    if generations.shape[0] != rows or matches.shape[:2] != (rows, k):
        raise ValueError(
            f"shapes disagree: {generations.shape[0]} generations, matches {tuple(matches.shape[:2])}, scores {tuple(scores.shape)}"
        )
    if rows == 0:
        return
    axes = target.subplots(rows, k + 1, squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], generations[r], labels[r] if labels else f"generation {r}")
        for c in range(k):
            name = match_labels[r][c] if match_labels else f"train #{c + 1}"
            _show(axes[r, c + 1], matches[r, c], f"{name}\n{float(scores[r, c]):.3f}")


def top_copies_grid(generations: Tensor, matches: Tensor, scores: Tensor,
                    labels: Sequence[str] | None = None,
                    match_labels: Sequence[Sequence[str]] | None = None) -> Figure:
    """Fig. 3 / 4: generations (first column) beside their top-k training matches with scores.

    ``generations`` (Q, C, H, W), ``matches`` (Q, k, C, H, W) in [0, 1], ``scores`` (Q, k).
    """
    rows, k = int(scores.shape[0]), int(scores.shape[1]) if scores.ndim == 2 else 0
    figure = new_figure(1.4 * (k + 1), 1.55 * max(rows, 1))
    draw_top_copies(figure, generations, matches, scores, labels, match_labels)
    return figure


def draw_rate_over_time(ax: Axes, steps: Sequence[int], series: Mapping[str, Sequence[float]],
                        baseline: Mapping[str, float] | None = None, ylabel: str = "replication rate") -> None:
    """One line per series (e.g. rate@0.9) against the training step; baselines dashed."""
    for index, (name, values) in enumerate(series.items()):
        colour = f"C{index}"
        ax.plot(list(steps), list(values), marker="o", markersize=3, color=colour, label=name)
        if baseline and name in baseline:
            ax.axhline(baseline[name], color=colour, linestyle=":", linewidth=1.0)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title("replication over training (dotted: training-set baseline)" if baseline else "replication over training")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")


def rate_over_time(steps: Sequence[int], series: Mapping[str, Sequence[float]],
                   baseline: Mapping[str, float] | None = None, ylabel: str = "replication rate") -> Figure:
    """Replication rates along training."""
    figure = new_figure(6.0, 4.0)
    draw_rate_over_time(figure.add_subplot(1, 1, 1), steps, series, baseline, ylabel)
    return figure


def replication_summary(steps: Sequence[int], series: Mapping[str, Sequence[float]],
                        generation: Tensor, baseline: Tensor, generations: Tensor, matches: Tensor,
                        scores: Tensor, thresholds: Sequence[float] = (),
                        labels: Sequence[str] | None = None,
                        match_labels: Sequence[Sequence[str]] | None = None,
                        baseline_rates: Mapping[str, float] | None = None,
                        title: str = "", baseline_label: str = "training vs training") -> Figure:
    """Rates over time above the latest histogram overlay (left), the latest top copies (right)."""
    rows = max(int(scores.shape[0]), 1)
    k = int(scores.shape[1]) if scores.ndim == 2 else 0
    grid_width = 1.5 * (k + 1)
    figure = new_figure(6.5 + grid_width, max(8.0, 1.6 * rows + 0.6))
    figure.set_layout_engine("constrained")
    left, right = figure.subfigures(1, 2, width_ratios=[6.5, grid_width])
    over_time, histogram = left.subplots(2, 1)
    draw_rate_over_time(over_time, steps, series, baseline_rates)
    draw_similarity_histogram(histogram, generation, baseline, thresholds, title="top-1 similarity (latest check)",
                              baseline_label=baseline_label)
    draw_top_copies(right, generations, matches, scores, labels, match_labels)
    right.suptitle("most similar generations (left column)\nand their nearest training images", fontsize="medium")
    if title:
        figure.suptitle(title)
    return figure


def _show(ax: Axes, image: Tensor, title: str) -> None:
    array = image.detach().float().clamp(0, 1).cpu()
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    ax.imshow(array.numpy(), cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
