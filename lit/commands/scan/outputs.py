"""What a scan writes: its claimed and locked output folder, ``matches.csv``, ``summary.json`` and,
through :mod:`lit.commands.scan.report`, the plots and ``report.html``.

The files are written into a staging folder inside ``--out`` and moved into place together at
the end (:func:`write_outputs`), so a failed or killed scan leaves the previous scan's set (or
none), never a new ``matches.csv`` beside an old ``report.html``.
"""


from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lit.commands.scan.generated import MATCH_COLUMNS, GeneratedScan
from lit.commands.scan.generated_report import (
    GENERATED_PLOTS,
    generated_console_lines,
    generated_summary,
    write_generated_plots,
)
from lit.commands.scan.report import generation_order, write_plots, write_report
from lit.commands.scan.sources import FeatureSource, missing_images
from lit.commands.scan.types import ScanOptions, ScanResult
from lit.files import claim_folder, folder_lock, write_json, write_text_atomic
from lit.replication import duplicate_comparison, score_summary

#: File that marks an output folder as made by ``lit scan`` (only such folders are written into again).
MARKER = ".lit-scan"
#: Lock file of the scan writing into an output folder (its process id; see :func:`lit.files.folder_lock`).
LOCK = ".lit-scan.lock"
#: Every plot a scan may write (one it did not write this time is removed with the rest of the old set).
PLOTS = frozenset({"similarity_histogram.png", "duplicates.png", "classes.png", *GENERATED_PLOTS.values()})
#: Prefix of the staging folders the outputs are written into before they are moved into place.
STAGING = ".lit-scan-staging-"


def prepare_out(out: Path) -> None:
    """Create ``out`` (marked as the scan's own) or accept one a scan made; refuse any other non-empty folder."""
    claim_folder(out, MARKER, label=f"--out {out}", note="made by lit scan\n",
                 refusal=f"--out {out} is not empty and was not made by lit scan: choose a new or empty folder")


@contextmanager
def locked_out(out: Path) -> Iterator[Path]:
    """Claim ``out`` (:func:`prepare_out`) and hold its lock for the block: a second scan into the same
    folder is refused with one line; a lock left by a killed scan is taken over (with a warning), and
    the staging folders a killed scan left are removed (they are the scan's own)."""
    prepare_out(out)
    with folder_lock(out, label=f"--out {out}", name=LOCK):
        for stale in out.glob(STAGING + "*"):
            if stale.is_dir():
                shutil.rmtree(stale)
        yield out


#: The descriptor the replication thresholds were calibrated for (the paper's 0.5 is SSCD's).
CALIBRATED_FOR = "sscd_resnet50"


def threshold_note(descriptor: dict[str, Any], thresholds: tuple[float, ...]) -> str | None:
    """What to tell a reader whose descriptor is not the one the thresholds were calibrated for
    (``None`` for :data:`CALIBRATED_FOR` with its real weights): read rates against the baseline."""
    if descriptor.get("name") == CALIBRATED_FOR and not descriptor.get("random_init"):
        return None
    name = descriptor.get("display_name", descriptor.get("name"))
    listed = ", ".join(f"{t:g}" for t in thresholds)
    return (f"note: the thresholds ({listed}) are on SSCD's scale: 0.5 is SSCD's replication threshold, "
            f"calibrated for {CALIBRATED_FOR}; with {name} read each rate against the training baseline's "
            "column, not as a replication rate of its own")


def matches_rows(result: ScanResult, generations: FeatureSource, training: FeatureSource,
                 options: ScanOptions, generated: GeneratedScan | None = None) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of matches.csv: one row per (generation, rank), generations by top-1 score,
    highest first, ties by generation key (:func:`generation_order`: the report's order; the normalised
    score with a background), ranks in order within a generation (``mirrored``: 1 where the match was
    the flipped training image, only with ``--match_mirrors``). A ``lit generate`` folder
    (``generated``) adds each generation's :data:`lit.commands.scan.generated.MATCH_COLUMNS` (empty
    for an image without a row), ``generated_prompt`` when ``lit generate --random_words`` changed a
    prompt, and, when caption sources were found, ``source_similarity``."""
    header = ["generation", "rank", "training", "score"]
    normalized = result.normalized is not None
    if normalized:
        header.append("score_normalized")
    mirrors = options.match_mirrors
    if mirrors:
        header.append("mirrored")
    scores, indices = result.top.scores, result.top.indices
    gen_rows = list(range(scores.shape[0]))
    train_rows = sorted({int(t) for t in indices.flatten().tolist() if t >= 0})
    position = {t: i for i, t in enumerate(train_rows)}
    columns = {  # name -> (values, generation side?); only what the inputs know
        "generation_caption": (generations.captions_of(gen_rows), True),
        "generation_label": (generations.labels_of(gen_rows), True),
        "training_caption": (training.captions_of(train_rows), False),
        "training_label": (training.labels_of(train_rows), False),
    }
    extras = [(name, values, gen_side) for name, (values, gen_side) in columns.items()
              if values is not None and any(v is not None for v in values)]
    if generated is not None:
        extras += [(name, values, True) for name, values in _generated_columns(result, generated).items()]
    header += [name for name, _, _ in extras]
    gen_keys, train_keys = generations.keys_of(gen_rows), training.keys_of(train_rows)
    rows: list[list[Any]] = []
    for g in generation_order(result.ranking_scores, gen_keys):
        for rank in range(scores.shape[1]):
            t = int(indices[g, rank])
            if t < 0:
                continue
            row: list[Any] = [gen_keys[g], rank + 1, train_keys[position[t]], f"{float(scores[g, rank]):.6f}"]
            if normalized:
                row.append(f"{float(result.normalized[g, rank]):.6f}")  # type: ignore[index]
            if mirrors:
                row.append(int(result.top.mirrored[g, rank]))
            for _, values, gen_side in extras:
                value = values[g] if gen_side else values[position[t]]
                row.append("" if value is None else value)
            rows.append(row)
    return header, rows


def _generated_columns(result: ScanResult, generated: GeneratedScan) -> dict[str, list[Any]]:
    """matches.csv's columns of a generate folder, one value per generation row (None: no value)."""
    columns: dict[str, list[Any]] = {name: [] for name in MATCH_COLUMNS}
    for record in generated.generations:
        for name in MATCH_COLUMNS:
            value = None if record is None else getattr(record, name)
            columns[name].append(value if not isinstance(value, float) else repr(value))
    if any(record is not None and record.generated_prompt != record.prompt for record in generated.generations):
        columns["generated_prompt"] = [None if record is None else record.generated_prompt
                                       for record in generated.generations]
    if result.sources is not None:
        columns["source_similarity"] = [None if not known else f"{float(s):.6f}" for known, s in
                                        zip(result.sources.known.tolist(), result.sources.similarity)]
    return columns


def write_matches(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    """matches.csv, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def build_summary(result: ScanResult, generations: FeatureSource, training: FeatureSource,
                  options: ScanOptions, descriptor: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
    """summary.json's content."""
    top1 = result.top.scores[:, 0]
    summary: dict[str, Any] = {
        "generations": _counts(generations),
        "training": _counts(training),
        "k": int(result.top.scores.shape[1]),
        "search": result.search,
        "thresholds": list(options.thresholds),
        "similarity": "cosine" if len(training.feature_shape) == 1 else "split_product",
        "token_normalization": options.token_normalization if len(training.feature_shape) == 2 else None,
        "match_mirrors": options.match_mirrors,
        "top1": score_summary(top1, options.thresholds),
        "baseline": {**score_summary(result.baseline, options.thresholds), **result.baseline_sample.record(),
                     "label": result.baseline_sample.label},
        "normalization": result.normalization or {"method": "none"},
        "duplicates": {**duplicate_comparison(result.match_duplicates, result.random_duplicates,
                                              options.duplicate_threshold),
                       "exhaustive": True, "random_sample": {**result.random_rows.record(),
                                                             "label": result.random_rows.label}},
        "classes": None if result.classes is None else {**result.classes.record(), "generation_classes": result.class_source,
                                                        "class_sample": options.class_sample},
        "descriptor": descriptor,
        "threshold_note": threshold_note(descriptor, options.thresholds),
        "stores": {"generations": generations.manifest, "training": training.manifest},
        "timings_s": {**result.timings, **({"wall": wall_s} if wall_s is not None else {})},
    }
    if result.normalized is not None:
        summary["top1_normalized"] = score_summary(result.normalized[:, 0].double(), options.thresholds)
    return summary


def images_not_found(result: ScanResult, generations: FeatureSource, training: FeatureSource) -> dict[str, int]:
    """How many generations, and how many distinct matched training images, have no image file where
    their store says (:func:`lit.commands.scan.sources.missing_images`)."""
    matched = sorted({int(t) for t in result.top.indices.flatten().tolist() if t >= 0})
    return {"generations": missing_images(generations, range(generations.num_rows)),
            "training": missing_images(training, matched)}


def _counts(source: FeatureSource) -> dict[str, Any]:
    """summary.json's rows and skipped inputs of one set (every skip with its reason: unreadable
    images, and the dangling symlinks and folders named like images of an input folder)."""
    reasons = source.skipped_reasons
    return {"count": source.num_rows, "skipped": len(source.skipped), "skipped_files": source.skipped,
            "skipped_reasons": [{"name": name, "reason": reasons.get(name, "could not be read as an image")}
                                for name in source.skipped]}


def write_outputs(out: Path, result: ScanResult, generations: FeatureSource, training: FeatureSource,
                  options: ScanOptions, descriptor: dict[str, Any], report_rows: int = 20, thumb: int = 96,
                  wall_s: float | None = None, generated: GeneratedScan | None = None) -> dict[str, Path]:
    """matches.csv, summary.json, the plots and report.html in ``out``: written into a staging folder
    inside ``out`` and moved into place together once all of them are written (a failure before
    leaves ``out`` as it was and removes the staging folder). ``generated``: the generations are a
    ``lit generate`` folder (prompts, scores, caption sources: summary.json's ``generated``)."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
    try:
        header, rows = matches_rows(result, generations, training, options, generated)
        paths = {"matches": write_matches(staging / "matches.csv", header, rows)}
        summary = build_summary(result, generations, training, options, descriptor, wall_s)
        if generated is not None:
            summary["generated"] = generated_summary(result, generated, options)
        summary["images_not_found"] = not_found = images_not_found(result, generations, training)
        if any(not_found.values()):
            print(f"warning: {not_found['generations']} generation and {not_found['training']} matched training "
                  "images named in matches.csv cannot be found where their feature stores say (moved or "
                  "removed since extraction?); the report shows placeholders for them")
        paths["summary"] = write_json(staging / "summary.json", summary)
        paths.update(write_plots(staging, result, options))
        if generated is not None:
            paths.update(write_generated_plots(staging, result, generated, options, summary["generated"]))
        paths["report"] = write_report(staging, result, summary, generations, training, report_rows=report_rows,
                                       thumb=thumb, plots={k: v for k, v in paths.items() if k.startswith("plot_")},
                                       generated=generated,
                                       generated_plots={k: v for k, v in paths.items() if k in GENERATED_PLOTS})
        placed: dict[str, Path] = {}
        for key, path in sorted(paths.items(), key=lambda item: item[0] == "report"):  # report.html last
            os.replace(path, out / path.name)
            placed[key] = out / path.name
        for name in PLOTS - {path.name for path in placed.values()}:  # a plot of an earlier scan (ours)
            (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return placed




def console_lines(result: ScanResult, generations: FeatureSource, training: FeatureSource,
                  options: ScanOptions, descriptor: dict[str, Any] | None = None,
                  generated: dict[str, Any] | None = None) -> list[str]:
    """What ``lit scan`` prints: the rates, the baseline (and how it was taken) and the matching, and
    for a ``descriptor`` other than the thresholds' own, :func:`threshold_note`; for a ``lit generate``
    folder, its summary section's lines (``generated``: summary.json's ``generated``)."""
    stats = score_summary(result.top.scores[:, 0], options.thresholds)
    base = score_summary(result.baseline, options.thresholds)
    rates = ", ".join(f"rate@{t} {rate:.3f}" for t, rate in stats["rates"].items())
    base_rates = ", ".join(f"rate@{t} {rate:.3f}" for t, rate in base["rates"].items())
    mirrors = "mirror-aware matching" if options.match_mirrors else "no mirror matching"
    head = f"lit scan: {generations.num_rows} generations vs {training.num_rows} training images ({mirrors}); {rates}"
    lines = [head, f"baseline ({result.baseline_sample.label}): {base_rates}"]
    if generated is not None:
        lines += generated_console_lines(generated)
    note = None if descriptor is None else threshold_note(descriptor, options.thresholds)
    return lines if note is None else [*lines, note]
