"""What a scan of a ``lit generate`` folder adds to ``summary.json`` and ``report.html``.

- :func:`generated_summary`: summary.json's ``generated`` section (the folder's account, the
  memorization score against top-1 similarity, caption sources, prompt ablations), from the
  analyses of :mod:`lit.commands.scan.analysis`;
- :func:`write_generated_plots`: ``memorization_score.png`` (score against top-1 similarity),
  ``caption_sources.png`` (Fig. 11 centre), ``source_duplicates.png`` (Fig. 11 right);
- :func:`generated_sections`, :func:`generation_meta`: the report's sections and each shown
  generation's prompt, seed and scores (every text escaped);
- :func:`generated_console_lines`: what ``lit scan`` prints about them.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit.commands.scan.analysis import (
    ablation_groups,
    score_correlation,
    score_roc,
    source_duplicates,
    source_statistics,
)
from lit.commands.scan.generated import GeneratedScan, Generation
from lit.commands.scan.types import ScanOptions, ScanResult
from lit.plots import (
    BASELINE_COLOUR,
    GENERATION_COLOUR,
    duplicates_histogram,
    new_figure,
    save_figure,
)

#: The plots of a generate folder's scan: key -> file name.
GENERATED_PLOTS = {"generated_plot_memorization": "memorization_score.png",
                   "generated_plot_sources": "caption_sources.png",
                   "generated_plot_source_duplicates": "source_duplicates.png"}
#: The false-positive rate of the reported true-positive rate (Wen et al.: TPR@1%FPR).
MAX_FPR = 0.01
SOURCE_COLOUR = "tab:green"


def _joined(generated: GeneratedScan) -> tuple[Tensor, list[Generation]]:
    """The generation rows that have a row of generations.csv, and those rows."""
    rows = [(g, record) for g, record in enumerate(generated.generations) if record is not None]
    return torch.tensor([g for g, _ in rows], dtype=torch.int64), [record for _, record in rows]


def generated_summary(result: ScanResult, generated: GeneratedScan, options: ScanOptions) -> dict[str, Any]:
    """summary.json's ``generated`` section."""
    top1 = result.top.scores[:, 0].double()
    section = generated.record()
    rows, records = _joined(generated)
    if records:
        best = top1[rows]
        scores = torch.tensor([r.memorization_score for r in records], dtype=torch.float64)
        first = torch.tensor([r.memorization_score_first for r in records], dtype=torch.float64)
        section["memorization"] = {
            "count": len(records), "label": "top-1 similarity above the threshold",
            "correlation": score_correlation(scores, best), "correlation_first": score_correlation(first, best),
            "roc": score_roc(scores, best, options.thresholds, MAX_FPR),
            "roc_first": score_roc(first, best, options.thresholds, MAX_FPR)}
    else:
        section["memorization"] = None
    sources = result.sources
    section["caption_sources"] = None if sources is None else source_statistics(
        result.top.indices, top1, sources.rows, sources.similarity, options.thresholds)
    section["source_duplicates"] = None if sources is None else source_duplicates(
        sources.duplicates, result.match_duplicates, top1, options.thresholds, options.duplicate_threshold)
    ablated = [(g, r) for g, r in zip(rows.tolist(), records) if r.variant]
    section["ablations"] = ablation_groups(
        [r.prompt_index for _, r in ablated], [r.variant for _, r in ablated], [r.prompt for _, r in ablated],
        [float(top1[g]) for g, _ in ablated], [r.memorization_score for _, r in ablated],
        options.thresholds[0]) if ablated else []
    return section


# ----------------------------------------------------------------------------- plots


def memorization_figure(scores: Tensor, top1: Tensor, thresholds: tuple[float, ...], correlation: dict[str, Any]) -> Any:
    """The memorization score (x) of each generation against its top-1 similarity (y), thresholds dashed."""
    figure = new_figure(6.0, 4.0)
    ax = figure.add_subplot(1, 1, 1)
    ax.scatter(scores.double().numpy(), top1.double().numpy(), s=12, color=GENERATION_COLOUR, alpha=0.7,
               label=f"generations (n={scores.numel()}; Pearson {_text(correlation['pearson'])}, "
                     f"Spearman {_text(correlation['spearman'])})")
    for t in thresholds:
        ax.axhline(t, color="0.3", linestyle="--", linewidth=0.8)
    ax.set_xlabel("memorization score (mean ||eps(x_t, c) - eps(x_t, empty)|| over steps)")
    ax.set_ylabel("top-1 similarity to the training set")
    ax.set_title("memorization score against top-1 similarity")
    ax.legend(fontsize="small")
    return figure


def sources_figure(source: Tensor, top1: Tensor, thresholds: tuple[float, ...]) -> Any:
    """Fig. 11 centre: similarity to the caption-source image beside the top-1 similarity, as
    overlaid histograms (left) and one point per generation (right, the diagonal: equal)."""
    figure = new_figure(10.0, 4.0)
    left, right = figure.subplots(1, 2)
    x, y = source.double().numpy(), top1.double().numpy()
    values = np.concatenate([x, y])
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    edges = np.linspace(low, high, 31)
    left.hist(x, bins=edges, alpha=0.5, color=SOURCE_COLOUR, label=f"to its caption-source image (n={x.size})")
    left.hist(y, bins=edges, alpha=0.5, color=GENERATION_COLOUR, label=f"to its top-1 match (n={y.size})")
    for t in thresholds:
        if low <= t <= high:
            left.axvline(t, color="0.3", linestyle="--", linewidth=0.8)
    left.set_xlabel("similarity of a generation")
    left.set_ylabel("generations")
    left.set_title("caption source vs top-1 match")
    left.legend(fontsize="small")
    right.scatter(x, y, s=12, color=SOURCE_COLOUR, alpha=0.7)
    right.plot([low, high], [low, high], color="0.3", linewidth=0.8)
    right.set_xlabel("similarity to the caption-source image")
    right.set_ylabel("top-1 similarity")
    right.set_title("per generation (on the diagonal: the source is the top-1)")
    return figure


def source_duplicates_figure(source_counts: Tensor, match_counts: Tensor, above_counts: Tensor, threshold: float,
                             above: float) -> Any:
    """Fig. 11 right: duplicates of caption-source images, of top matches and of matches above ``above``."""
    return duplicates_histogram([(source_counts, SOURCE_COLOUR, "caption-source images"),
                                 (match_counts, BASELINE_COLOUR, "top-1 matches"),
                                 (above_counts, GENERATION_COLOUR, f"top-1 matches above {above:g}")],
                                threshold, "duplicates of caption sources and of matches")


def write_generated_plots(out: Path, result: ScanResult, generated: GeneratedScan, options: ScanOptions,
                          section: dict[str, Any]) -> dict[str, Path]:
    """The generate folder's plots in ``out`` (those its data allow); keys of :data:`GENERATED_PLOTS`."""
    names = GENERATED_PLOTS
    paths: dict[str, Path] = {}
    top1 = result.top.scores[:, 0]
    rows, records = _joined(generated)
    if records:
        scores = torch.tensor([r.memorization_score for r in records], dtype=torch.float64)
        figure = memorization_figure(scores, top1[rows], options.thresholds, section["memorization"]["correlation"])
        key = "generated_plot_memorization"
        paths[key] = save_figure(figure, out / names[key])
    sources = result.sources
    if sources is not None and bool(sources.known.any()):
        known = sources.known
        key = "generated_plot_sources"
        paths[key] = save_figure(sources_figure(sources.similarity[known], top1[known], options.thresholds),
                                 out / names[key])
        above = options.thresholds[0]
        key = "generated_plot_source_duplicates"
        paths[key] = save_figure(source_duplicates_figure(
            sources.duplicates[known], result.match_duplicates, result.match_duplicates[top1.double() > above],
            options.duplicate_threshold, above), out / names[key])
    return paths


# ----------------------------------------------------------------------------- the page


def _text(value: float | None, digits: int = 3) -> str:
    """A number for the page, ``n/a`` for ``None`` (a statistic without both classes) or NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def generation_meta(record: Generation | None, source_similarity: float | None = None) -> str:
    """The prompt (and the prompt it was generated from, when words were added), memorization
    scores, seed and variant of one shown generation (escaped HTML)."""
    if record is None:
        return '<div class="meta"><i>no row in generations.csv</i></div>'
    parts = [f'<span class="prompt">“{html.escape(record.prompt)}”</span>',
             (f'memorization score <b class="mscore">{record.memorization_score:.4g}</b> '
             f'(first step {record.memorization_score_first:.4g})'),
             f"seed {record.seed}"]
    if record.generated_prompt and record.generated_prompt != record.prompt:
        parts.insert(1, f'generated from <span class="prompt">“{html.escape(record.generated_prompt)}”</span>')
    if record.variant:
        parts.append(f"variant: {html.escape(record.variant)}")
    if record.source_key:
        similarity = "" if source_similarity is None or math.isnan(source_similarity) else \
            f", similarity {source_similarity:.3f}"
        parts.append(f"caption source {html.escape(record.source_key)}{similarity}")
    return '<div class="meta">' + "<br>".join(parts) + "</div>"


def _table(head: list[str], rows: list[list[str]], css: str = "stats") -> str:
    """A stats table; cells are already-escaped HTML."""
    lines = [f"<table class='{css}'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows]
    return "\n".join(lines + ["</table>"])


def _image(path: Path | None, uri: str | None) -> str:
    return "" if path is None or uri is None else f'<img src="{uri}" alt="{html.escape(path.name)}">'


def generated_sections(section: dict[str, Any], plots: dict[str, tuple[Path, str]]) -> str:
    """The report's sections of a generate folder: the folder's account, the memorization score,
    caption sources, prompt ablations. ``plots``: key -> (file, data URI) of the plots written."""
    def plot(key: str, css: str = "plots") -> str:
        path, uri = plots.get(key, (None, None))
        return f'<div class="{css}">{_image(path, uri)}</div>' if path else ""

    parts = ["<h2>Generations of lit generate</h2>",
             (f"<p>Folder {html.escape(section['folder'])}: {section['rows']} rows in generations.csv, "
             f"{section['joined']} joined to a scanned image.</p>")]
    problems = [(section["bad_rows"], "rows could not be read"),
                (section["rows_without_image"], "rows name images that were not scanned (missing or unreadable)"),
                (section["images_without_row"], "scanned images have no row (no prompt or score)")]
    keys = section.get("source_keys") or {}
    if keys.get("generations_with_source_not_found"):
        problems.append((keys["generations_with_source_not_found"],
                         (f"generations name a source key found in no training image ({keys['keys_not_found']} keys "
                         f"not found, {keys['keys_ambiguous']} ambiguous)")))
    parts += [f"<p><i>{count} {html.escape(text)} (listed in summary.json).</i></p>" for count, text in problems if count]
    memorization = section.get("memorization")
    if memorization:
        c, c1 = memorization["correlation"], memorization["correlation_first"]
        parts.append("<h3>Memorization score against top-1 similarity</h3>")
        parts.append(f"<p>The memorization score (Wen et al.: the mean over the denoising steps of the distance "
                     f"between the text-conditional and the unconditional noise prediction) of "
                     f"{memorization['count']} generations against their top-1 similarity: Pearson "
                     f"{_text(c['pearson'])}, Spearman {_text(c['spearman'])} (first-step score: "
                     f"{_text(c1['pearson'])}, {_text(c1['spearman'])}). How well the score finds the "
                     f"generations whose top-1 similarity is above each threshold:</p>")
        rows = []
        for mean, first in zip(memorization["roc"], memorization["roc_first"]):
            rows.append([f"{mean['threshold']:g}", str(mean["positives"]), str(mean["negatives"]),
                         _text(mean["auc"]), _text(mean["tpr_at_fpr"]), _text(first["auc"]),
                         _text(first["tpr_at_fpr"])])
        percent = f"{100 * MAX_FPR:g}%"
        parts.append(_table(["top-1 above", "above", "not above", "ROC AUC", f"TPR@{percent}FPR",
                             "ROC AUC (first step)", f"TPR@{percent}FPR (first step)"], rows))
        parts.append("<p>n/a: every generation is on one side of the threshold.</p>")
        parts.append(plot("generated_plot_memorization"))
    sources = section.get("caption_sources")
    if sources:
        n = sources["generations"]
        parts.append("<h3>Caption sources (Fig. 11 centre)</h3>")
        parts.append(f"<p>{n} generations have their caption-source image in the training set: "
                     f"{sources['top1_is_source']} ({100 * sources['top1_is_source_share']:.1f}%) have it as their "
                     f"top-1 match, {sources['source_in_top_k']} among their top matches. Mean similarity to the "
                     f"caption source {sources['source_similarity']['mean']:.3f}, to the top-1 match "
                     f"{sources['top1_similarity']['mean']:.3f}.</p>")
        rows = [[t, str(sources["source_above"][t]), str(sources["top1_above"][t])] for t in sources["source_above"]]
        parts.append(_table(["threshold", "similarity to caption source above", "top-1 similarity above"], rows))
        parts.append(plot("generated_plot_sources", "plots wide"))
    duplicates = section.get("source_duplicates")
    if duplicates:
        parts.append("<h3>Duplicates of caption sources and of matches (Fig. 11 right)</h3>")
        rows = [["caption-source images", *_count_cells(duplicates["caption_sources"])],
                ["top-1 matches", *_count_cells(duplicates["top_matches"])]]
        rows += [[f"top-1 matches above {html.escape(t)}", *_count_cells(d)] for t, d in duplicates["matches_above"].items()]
        parts.append(f"<p>Training images with similarity &gt; {duplicates['threshold']:g} to each image, counted over "
                     "the whole training set, one count per generation (the paper, on LAION: 11.6 for caption "
                     "sources, 3.1 for top matches, 34.1 for matches above 0.5).</p>")
        parts.append(_table(["images", "generations", "mean duplicates", "median", "max", "with duplicates"], rows))
        parts.append(plot("generated_plot_source_duplicates"))
    if section.get("ablations"):
        parts.append("<h3>Prompt ablations (Fig. 10)</h3>")
        parts.append("<p>Each full prompt with its variants (words left out): which words bring the copy back.</p>")
        for group in section["ablations"]:
            title = "(no full prompt)" if group["prompt"] is None else f"“{html.escape(group['prompt'])}”"
            parts.append(f"<h4 class='ablation'>{title}</h4>")
            rows = [[html.escape(v["variant"]), html.escape(v["prompt"]), str(v["images"]), f"{v['top1_mean']:.3f}",
                     f"{v['top1_max']:.3f}", str(v["above"]), f"{v['memorization_score_mean']:.4g}"]
                    for v in group["variants"]]
            threshold = group["variants"][0]["threshold"]
            parts.append(_table(["variant", "prompt", "images", "mean top-1", "max top-1", f"top-1 above {threshold:g}",
                                 "mean memorization score"], rows, "stats ablation"))
    return "\n".join(part for part in parts if part)


def _count_cells(counts: dict[str, Any] | None) -> list[str]:
    if counts is None:
        return ["0", "n/a", "n/a", "n/a", "n/a"]
    return [str(counts["count"]), f"{counts['mean']:.2f}", f"{counts['median']:g}", str(counts["max"]),
            f"{100 * counts['share_with_duplicates']:.1f}%"]


def generated_console_lines(section: dict[str, Any]) -> list[str]:
    """What ``lit scan`` prints about a generate folder: the score's AUC at the first threshold and
    its correlation, the caption sources and their duplicates."""
    lines = []
    memorization = section.get("memorization")
    if memorization:
        roc, c = memorization["roc"][0], memorization["correlation"]
        lines.append(f"memorization score: ROC AUC {_text(roc['auc'])}, TPR@{100 * MAX_FPR:g}%FPR "
                     f"{_text(roc['tpr_at_fpr'])} for top-1 above {roc['threshold']:g} ({roc['positives']} above, "
                     f"{roc['negatives']} not); Spearman {_text(c['spearman'])} with top-1 similarity")
    sources = section.get("caption_sources")
    if sources:
        first = next(iter(sources["source_above"]))
        lines.append(f"caption sources: {sources['top1_is_source']} of {sources['generations']} generations have their "
                     f"caption-source image as top-1 match; {sources['source_above'][first]} are above {first} "
                     "against it")
    duplicates = section.get("source_duplicates")
    if duplicates:
        above = next(iter(duplicates["matches_above"].items()))
        lines.append(f"duplicates (> {duplicates['threshold']:g}): caption sources "
                     f"{duplicates['caption_sources']['mean']:.2f}, top matches {duplicates['top_matches']['mean']:.2f}, "
                     f"matches above {above[0]} {'n/a' if above[1] is None else format(above[1]['mean'], '.2f')} "
                     "on average")
    return lines
