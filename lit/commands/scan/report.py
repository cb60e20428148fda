"""The plots and the one-page HTML report of ``lit scan``.

``report.html`` is self-contained: every image (thumbnails of the most similar
generations and their training matches, downscaled to ``thumb`` pixels, and the
plots) is embedded as a base64 ``data:`` URI, so the page opens offline and can
be mailed as one file; it links to ``matches.csv`` and ``summary.json`` beside it.
Plots (paper figures): ``similarity_histogram.png`` (Fig. 5 / 11 left),
``duplicates.png`` (Fig. 11 right), ``classes.png`` (Fig. 6, when labels exist).
For a ``lit generate`` folder, every shown generation carries its prompt, memorization
score and seed (and its caption-source image beside its matches, green frame), and the
page adds the sections of :mod:`lit.commands.scan.generated_report`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit.commands.scan.generated import GeneratedScan
from lit.commands.scan.generated_report import generated_sections, generation_meta
from lit.commands.scan.sources import FeatureSource
from lit.commands.scan.types import ScanOptions, ScanResult
from lit.files import write_text_atomic
from lit.grids import thumbnail
from lit.io import to_uint8
from lit.plots import (
    BASELINE_COLOUR,
    GENERATION_COLOUR,
    duplicates_histogram,
    new_figure,
    save_figure,
    similarity_histogram,
)
from lit.replication_report import baseline_legend

# ----------------------------------------------------------------------------- plots


def duplicates_figure(match_counts: Tensor, random_counts: Tensor, threshold: float) -> Any:
    """Fig. 11 right: how many training images duplicate each generation's top match vs a random training image."""
    return duplicates_histogram([(random_counts, BASELINE_COLOUR, "random training images"),
                                 (match_counts, GENERATION_COLOUR, "top-1 matches of generations")], threshold)


def classes_figure(mean_within: Tensor, max_generation: Tensor, slope: float, intercept: float,
                   pearson: float) -> Any:
    """Fig. 6: per class, the best generation score against the mean within-class self-similarity, with the fit."""
    figure = new_figure(6.0, 4.0)
    ax = figure.add_subplot(1, 1, 1)
    x, y = mean_within.double().numpy(), max_generation.double().numpy()
    ax.scatter(x, y, s=12, color=GENERATION_COLOUR, label=f"classes (n={x.size})")
    if math.isfinite(slope) and x.size:
        line = np.linspace(x.min(), x.max(), 2)
        ax.plot(line, slope * line + intercept, color="0.2", linewidth=1.0,
                label=f"fit: slope {slope:.3f}, Pearson r {pearson:.3f}" if math.isfinite(pearson) else
                f"fit: slope {slope:.3f}")
    ax.set_xlabel("mean within-class self-similarity of training images")
    ax.set_ylabel("max generation-to-training similarity")
    ax.set_title("replication per class")
    ax.legend(fontsize="small")
    return figure


def write_plots(out: Path, result: ScanResult, options: ScanOptions) -> dict[str, Path]:
    """The scan's PNG plots in ``out``; keys ``plot_<name>``."""
    mirrors = ", mirror-aware" if options.match_mirrors else ""
    paths = {"plot_histogram": save_figure(similarity_histogram(
        result.top.scores[:, 0], result.baseline, options.thresholds,
        title=f"top-1 similarity: generations vs training self-similarity{mirrors}",
        baseline_label=baseline_legend(result.baseline_sample)), out / "similarity_histogram.png")}
    paths["plot_duplicates"] = save_figure(duplicates_figure(result.match_duplicates, result.random_duplicates,
                                                             options.duplicate_threshold), out / "duplicates.png")
    if result.classes is not None and result.classes.classes:
        fit = result.classes.fit
        paths["plot_classes"] = save_figure(classes_figure(result.classes.mean_within, result.classes.max_generation,
                                                           fit.slope, fit.intercept, fit.pearson), out / "classes.png")
    return paths


# ----------------------------------------------------------------------------- images


def png_data_uri(image: Tensor) -> str:
    """A (3, H, W) image in [0, 1] as a ``data:image/png;base64,...`` URI."""
    array = to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def file_data_uri(path: Path) -> str:
    """A PNG file's bytes as a data URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def placeholder(size: int) -> Tensor:
    """A grey square with a darker cross: shown where an image file cannot be read any more."""
    image = torch.full((3, size, size), 0.85)
    diagonal = torch.arange(size)
    image[:, diagonal, diagonal] = 0.5
    image[:, diagonal, size - 1 - diagonal] = 0.5
    return image


def thumbnail_uri(source: FeatureSource, row: int, size: int) -> tuple[str, bool]:
    """Thumbnail of row ``row``'s image (read back from the input) and whether it could be read."""
    try:
        image = source.image(row)
    except Exception:  # noqa: BLE001 - a report never fails on one image: it shows a placeholder
        image = None
    if image is None:
        return png_data_uri(placeholder(size)), False
    return png_data_uri(thumbnail(image, size)), True


# ----------------------------------------------------------------------------- the page


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.stats{border-collapse:collapse;margin:0.5em 0}
table.stats td,table.stats th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.stats th:first-child,table.stats td:first-child{text-align:left}
.row{display:flex;gap:10px;align-items:flex-start;margin:10px 0;padding-bottom:10px;border-bottom:1px solid #eee}
figure{margin:0;width:var(--thumb);font-size:11px;overflow-wrap:anywhere}
figure.gen img{outline:3px solid #888}
figure.copy img{outline:3px solid #c22}
figure.source img{outline:3px solid #2a2}
.meta{width:240px;flex:none;font-size:12px;overflow-wrap:anywhere}
.meta .prompt{font-style:italic;font-size:13px}
figcaption .score{font-weight:bold;font-size:12px}
.plots img{max-width:32%;margin-right:1%}
.plots.wide img{max-width:65%}
table.ablation td:nth-child(2),table.ablation th:nth-child(2){text-align:left}
"""


def generation_order(ranking: Tensor, keys: list[str]) -> list[int]:
    """Generation rows by top-1 score (column 0 of ``ranking``), highest first, ties by key: the order
    of matches.csv and of the report's rows (deterministic whatever order the input was read in)."""
    top1 = ranking[:, 0].tolist()
    return sorted(range(len(top1)), key=lambda row: (-top1[row], keys[row]))


def _caption(source: FeatureSource, row: int) -> str:
    parts = []
    labels, captions = source.labels_of([row]), source.captions_of([row])
    if labels is not None and labels[0] is not None:
        parts.append(f"class {labels[0]}")
    if captions is not None and captions[0] is not None:
        parts.append(f"“{captions[0]}”")
    return " · ".join(html.escape(str(p)) for p in parts)


def _figure(uri: str, title: str, key: str, caption: str, css: str) -> str:
    short = html.escape(Path(key).name if "/" in key else key)
    return (f'<figure class="{css}"><img src="{uri}" alt="{html.escape(key)}" title="{html.escape(key)}">'
            f'<figcaption>{title}<br>{short}<br>{caption}</figcaption></figure>')


def _stats_table(summary: dict[str, Any]) -> str:
    top1, base = summary["top1"], summary["baseline"]
    norm = summary.get("top1_normalized")
    head = ["", "generations (top-1)", "training baseline"] + (["generations (normalised)"] if norm else [])
    lines = ["<table class='stats'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    names = [(f"rate@{t}", lambda s, t=t: s["rates"][t]) for t in top1["rates"]]
    names += [(stat, lambda s, stat=stat: s[stat]) for stat in ("mean", "median", "p95", "max", "count")]
    for name, get in names:
        cells = [get(top1), get(base)] + ([get(norm)] if norm else [])
        text = [f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells]
        lines.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{t}</td>" for t in text) + "</tr>")
    lines.append("</table>")
    sample = ("exact (every training image)" if base["exact"] else
              f"on a seeded sample of {base['sample_size']} of {base['population']} training images (seed {base['seed']})")
    lines.append(f"<p>Baseline: each training image's similarity to its nearest other training image, {sample}.</p>")
    lines.append("<p>Mirror-aware matching: " + (
        "on (a training image also matches through its horizontal mirror)." if summary.get("match_mirrors")
        else "off (training images match as they are).") + "</p>")
    dup = summary["duplicates"]
    lines.append(
        f"<p>Duplicates (similarity &gt; {dup['threshold']:g}, counted over the whole training set): a "
        f"generation's top match has {dup['top_matches']['mean']:.2f} on average; a random training image "
        f"{dup['random_training']['mean']:.2f} (n={dup['random_training']['count']}).</p>")
    classes = summary.get("classes")
    if classes:
        r = "n/a" if classes["pearson"] is None else f"{classes['pearson']:.3f}"
        slope = "n/a" if classes["slope"] is None else f"{classes['slope']:.3f}"
        lines.append(f"<p>Per class ({classes['num_classes']} classes; generation classes from "
                     f"{html.escape(str(classes['generation_classes']))}): Pearson r {r}, slope {slope}.</p>")
    if summary.get("normalization", {}).get("method", "none") != "none":
        n = summary["normalization"]
        lines.append(f"<p>Scores normalised (SSCD): score − {n['beta']:g} × mean similarity to the {n['k']} nearest "
                     f"of {n['background_rows']} background images ({html.escape(str(n['background']))}).</p>")
    return "\n".join(lines)


def search_line(search: dict[str, Any]) -> str:
    """How the generations were searched, in words (the report's header line)."""
    if search.get("method") != "approximate":
        return "exact search"
    probe = "" if search.get("nprobe") is None else f", nprobe {search['nprobe']}"
    return (f"approximate search: faiss {search['factory']}{probe}, shortlist of k x {search['rerank_factor']} "
            f"re-ranked exactly (index {'reused' if search.get('reused') else 'built'}"
            f"{'' if search.get('index_path') is None else ': ' + Path(search['index_path']).name}); "
            "baseline and duplicates exact")


def render_report(result: ScanResult, summary: dict[str, Any], generations: FeatureSource,
                  training: FeatureSource, *, report_rows: int, thumb: int, plots: dict[str, Path],
                  generated: GeneratedScan | None = None, generated_plots: dict[str, Path] | None = None) -> str:
    """The HTML text of report.html (``generated``: the generations are a ``lit generate`` folder,
    whose summary is ``summary["generated"]`` and whose plots are ``generated_plots``)."""
    ranking = result.ranking_scores
    normalized = result.normalized is not None
    sources = result.sources
    rows_html = []
    unreadable = 0
    for g in generation_order(ranking, generations.keys)[:report_rows]:
        uri, ok = thumbnail_uri(generations, g, thumb)
        unreadable += not ok
        cells = [] if generated is None else [generation_meta(
            generated.generations[g], None if sources is None else float(sources.similarity[g]))]
        cells.append(_figure(uri, f"generation {g}", generations.keys_of([g])[0], _caption(generations, g), "gen"))
        for rank in range(result.top.scores.shape[1]):
            t = int(result.top.indices[g, rank])
            if t < 0:
                continue
            uri, ok = thumbnail_uri(training, t, thumb)
            unreadable += not ok
            score = float(result.top.scores[g, rank])
            title = f'<span class="score">{score:.3f}</span>'
            if normalized:
                title += f" (norm. {float(ranking[g, rank]):.3f})"
            css = "copy" if score > summary["thresholds"][0] else "match"
            cells.append(_figure(uri, f"#{rank + 1} {title}", training.keys_of([t])[0], _caption(training, t), css))
        if sources is not None and bool(sources.known[g]):
            t = int(sources.rows[g])
            uri, ok = thumbnail_uri(training, t, thumb)
            unreadable += not ok
            title = f'caption source <span class="score">{float(sources.similarity[g]):.3f}</span>'
            cells.append(_figure(uri, title, training.keys_of([t])[0], _caption(training, t), "source"))
        rows_html.append('<div class="row">' + "".join(cells) + "</div>")
    plot_html = "".join(f'<img src="{file_data_uri(path)}" alt="{html.escape(path.name)}">' for path in plots.values())
    generated_html = "" if generated is None else generated_sections(
        summary["generated"], {key: (path, file_data_uri(path)) for key, path in (generated_plots or {}).items()})
    descriptor = summary["descriptor"]
    skipped = summary["generations"]["skipped"] + summary["training"]["skipped"]
    notes = []
    if skipped:
        notes.append(f"{skipped} inputs were skipped: unreadable images, and entries named like images that are "
                     "not image files (listed with their reasons in summary.json).")
    if unreadable:
        notes.append(f"{unreadable} thumbnails could not be read from their files and show a placeholder.")
    if summary.get("threshold_note"):
        notes.append(summary["threshold_note"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lit scan report</title>
<style>{_STYLE} :root{{--thumb:{thumb + 8}px}}</style></head>
<body>
<h1>lit scan: {summary['generations']['count']} generations vs {summary['training']['count']} training images</h1>
<p>Descriptor <b>{html.escape(str(descriptor.get('display_name', descriptor.get('name'))))}</b>
({html.escape(str(summary['similarity']))}); top-{summary['k']} training matches per generation;
{html.escape(search_line(summary.get('search', {'method': 'exact'})))}.
Files: <a href="matches.csv">matches.csv</a> · <a href="summary.json">summary.json</a></p>
{''.join(f'<p><i>{html.escape(n)}</i></p>' for n in notes)}
<h2>Summary</h2>
{_stats_table(summary)}
<h2>Plots</h2>
<div class="plots">{plot_html}</div>
{generated_html}
<h2>Most similar generations</h2>
<p>Each row: {'its prompt, memorization score and seed, then ' if generated is not None else ''}a generation
(grey frame), then its nearest training images with their similarity
(red frame: above {summary['thresholds'][0]:g}){'; last, its caption-source image (green frame) with its similarity' if sources is not None else ''}.{' Ordered by normalised score.' if normalized else ''}</p>
{''.join(rows_html)}
</body></html>
"""


def write_report(out: Path, result: ScanResult, summary: dict[str, Any], generations: FeatureSource,
                 training: FeatureSource, *, report_rows: int, thumb: int, plots: dict[str, Path],
                 generated: GeneratedScan | None = None, generated_plots: dict[str, Path] | None = None) -> Path:
    """report.html in ``out``, atomically."""
    text = render_report(result, summary, generations, training, report_rows=report_rows, thumb=thumb, plots=plots,
                         generated=generated, generated_plots=generated_plots)
    return write_text_atomic(out / "report.html", text)
