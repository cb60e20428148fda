"""``lit scan``: search generated images against a training set and report what was copied.

    lit scan --generations G --training T --descriptor.name NAME [--descriptor.weights FILE] --out OUT

``G`` and ``T`` are image folders (recursive; ``root/<class>/<image>`` gives class
labels), ``.txt`` / ``.tsv`` file lists (with captions / labels), webdataset tar
shards (img2dataset / LAION layout) or feature stores; all but stores are extracted
to stores first (:mod:`lit.commands.scan.sources`) and reused by the next scan. The scan
(paper Sec. 6-7) finds every generation's top-k training images, the training set's
self-similarity baseline (exact, or on a seeded sample of ``--baseline_sample``
rows), how many training images duplicate each generation's top match against
random training images (Fig. 11 right), per class the best generation score
against the within-class self-similarity (Fig. 6), and optionally SSCD-style
normalised scores. It writes ``matches.csv``, ``summary.json``, PNG plots and one
self-contained ``report.html`` into ``OUT`` (a folder it creates, or one it
created before: it never writes into someone else's folder).

The search streams the training set in blocks of ``--block_rows`` rows, so memory
stays bounded by the block and the top-k lists, whatever the training set's size.
It is exact by default; ``--index FACTORY`` (e.g. ``IVF4096,Flat``, ``IVF4096,PQ64np``)
searches the generations through an approximate faiss index built once over the
training store and saved beside it (:mod:`lit.commands.scan.approx`), visiting ``--nprobe``
lists and re-ranking a shortlist of ``k x --rerank_factor`` rows exactly from the
store. The self-similarity baseline and the duplicate counts stay exact.

A ``--generations`` folder written by ``lit generate`` (``generations.csv`` and
``generate_manifest.json`` in it) brings each image's prompt, source key, seed,
memorization scores and ablation variant into ``matches.csv`` and the report, with the
memorization score against top-1 similarity (correlation, ROC AUC per threshold), the
generations against their caption-source images and the duplicates of those (Fig. 11),
and the prompt ablations (Fig. 10): :mod:`lit.commands.scan.generated`. Its sub-folder
(``images/``) is not a class label.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from datamodules.extraction_inputs import ImageSource
from lit.commands.scan.approx import IndexOptions
from lit.commands.scan.engine import run_scan
from lit.commands.scan.generated import (
    GENERATIONS_CSV,
    MANIFEST,
    GenerateFolder,
    generated_scan,
    is_generate_folder,
    read_generate_folder,
)
from lit.commands.scan.mirror import mirrored_training
from lit.commands.scan.options import parse_args
from lit.commands.scan.outputs import console_lines, locked_out, write_outputs
from lit.commands.scan.sources import (
    FeatureSource,
    StoreSource,
    check_descriptor,
    extract_input,
)
from lit.commands.scan.types import ScanOptions
from lit.errors import UserError
from lit.store import FeatureStore, is_store
from models.descriptor_config import DescriptorConfig
from models.descriptor_options import DescriptorOptions
from models.weights import WeightsError


def open_source(role: str, spec: str, record: dict[str, Any], config: DescriptorConfig, *, store_dir: Path,
                device: torch.device, batch_size: int, num_workers: int, dtype: str,
                progress: bool = True, labels: bool = True) -> FeatureSource:
    """The features of one input: a feature store as it is, or an image folder, file list or
    webdataset tars extracted to a store under ``store_dir`` (reused when the input and the
    descriptor are unchanged). ``labels=False``: the store's class labels are not used."""
    path = Path(spec).expanduser()
    if is_store(path):
        store = FeatureStore.open(path)
        check_descriptor(store, record)
        print(f"{role}: feature store {path} ({store.num_rows} rows)")
        return StoreSource(role, store, labels=labels)
    try:
        store, reused = extract_input(role, spec, store_dir, config, record,
                                      accelerator="gpu" if device.type == "cuda" else "cpu",
                                      device_index=device.index if device.type == "cuda" else None,
                                      batch_size=batch_size, num_workers=num_workers, dtype=dtype, progress=progress)
    except UserError as error:
        raise UserError(f"--{role} {spec}: {error}") from None
    print(f"{role}: {'reused' if reused else 'extracted'} feature store {store.root} ({store.num_rows} rows, "
          f"{len(store.skipped)} unreadable images skipped)")
    return StoreSource(role, store, labels=labels)


def check_outputs_outside_inputs(outputs: dict[str, Path], inputs: dict[str, str | None]) -> None:
    """Refuse an output folder (``--out``, ``--store_dir``) inside an input folder that is walked for
    images: the next scan would count its plots as generations or training images (and the input's
    listing would change with every run). Refused rather than left out of the walk, so that a folder
    means the same images to ``lit scan``, ``lit predict`` and every other reader."""
    for role, spec in inputs.items():
        if spec is None:
            continue
        folder = Path(spec).expanduser()
        if not folder.is_dir() or is_store(folder):
            continue  # file lists, tar shards and stores are not walked
        root = folder.resolve()
        for option, path in outputs.items():
            target = path.resolve()
            if target == root or root in target.parents:
                raise UserError(f"--{option} {path} lies inside --{role} {spec}: its files would become "
                                f"{role} images of the next scan; choose a folder outside the inputs")


def check_builds(config: DescriptorConfig) -> None:
    """Build the descriptor once and let it go: a weights file that cannot be read or does not fit
    the architecture is refused naming ``--descriptor.weights``, before any work or folder."""
    try:
        config.build()
    except WeightsError as error:
        raise UserError(f"--descriptor.weights: {error}") from None
    except UserError as error:
        raise UserError(f"--{error}" if str(error).startswith("descriptor") else f"--descriptor: {error}") from None


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as error:
        raise UserError(f"--device {choice!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {choice}: CUDA is not available here (use --device cpu)")
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """``lit scan``: parse (:func:`lit.commands.scan.options.parse_args`), then :func:`run`."""
    return run(parse_args([] if argv is None else argv))


def descriptor_config(options: DescriptorOptions) -> DescriptorConfig:
    """The parsed ``--descriptor.*`` options checked against the registry; a mistake names the option."""
    try:  # DescriptorConfig checks itself; its messages name the field as "descriptor.<field>"
        return DescriptorConfig.of(options)
    except UserError as error:
        raise UserError(f"--{error}") from None


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Embed or open the inputs, scan, write the outputs, print where they are (``args``: parsed options)."""
    start = time.perf_counter()
    config = descriptor_config(args.descriptor)
    out = Path(args.out).expanduser()
    device = _device(args.device)
    try:
        record = config.record()  # reads the weights file (SHA-256; a lit export file's metadata)
    except (ValueError, OSError) as error:
        raise UserError(f"--descriptor.weights {config.weights}: {error}") from None
    inputs = {"generations": args.generations, "training": args.training, "background": args.background}
    for role, spec in inputs.items():  # every input readable before anything is extracted
        if spec is not None and not is_store(Path(spec).expanduser()):
            try:
                ImageSource.resolve(spec)
            except UserError as error:
                raise UserError(f"--{role} {spec}: {error}") from None
    store_dir = Path(args.store_dir).expanduser() if args.store_dir else out / "stores"
    check_outputs_outside_inputs({"out": out, "store_dir": store_dir}, inputs)
    generate_folder = read_generations_folder(args.generations)
    embeds = args.match_mirrors or any(spec is not None and not is_store(Path(spec).expanduser())
                                       for spec in inputs.values())
    if embeds:  # the weights load and fit before any folder is made (extraction builds it again)
        check_builds(config)
    with locked_out(out):
        return _scan(args, out, config, record, device, store_dir, start, generate_folder)


def read_generations_folder(spec: str) -> GenerateFolder | None:
    """The ``lit generate`` folder that ``--generations`` names (checked, read), or None for any
    other input; one that holds scores but no images (``--score_only``) is refused in one line."""
    path = Path(spec).expanduser()
    if not is_generate_folder(path):
        if path.is_dir() and (path / GENERATIONS_CSV).is_file():
            print(f"generations: {path / GENERATIONS_CSV} without {MANIFEST}: scanned as a plain image folder")
        return None
    try:
        folder = read_generate_folder(path)
    except UserError as error:
        raise UserError(f"--generations {spec}: {error}") from None
    if folder.score_only:
        raise UserError(f"--generations {spec} was written by lit generate --score_only: it holds memorization "
                        "scores but no images to scan (run lit generate without --score_only)")
    return folder


def _scan(args: argparse.Namespace, out: Path, config: DescriptorConfig, record: dict[str, Any],
          device: torch.device, store_dir: Path, start: float,
          generate_folder: GenerateFolder | None = None) -> dict[str, Path]:
    """The work of :func:`main` once every argument is checked and ``out`` is claimed and locked."""
    common = {"store_dir": store_dir, "device": device, "batch_size": args.batch_size,
              "num_workers": args.num_workers, "dtype": args.dtype, "progress": args.progress}
    generations = open_source("generations", args.generations, record, config, labels=generate_folder is None,
                              **common)
    training = open_source("training", args.training, record, config, **common)
    generated = None if generate_folder is None else generated_scan(generate_folder, generations, training)
    if generated is not None:
        print(f"generations: lit generate folder, {sum(g is not None for g in generated.generations)} of "
              f"{generations.num_rows} images joined to {GENERATIONS_CSV}")
        for line in generated.warnings():
            print(line)
    background = None if args.background is None else open_source("background", args.background, record,
                                                                   config, **common)
    options = ScanOptions(k=args.k, thresholds=tuple(args.thresholds), match_mirrors=args.match_mirrors,
                          token_normalization=config.token_normalization, baseline_sample=args.baseline_sample,
                          random_sample=args.random_sample, class_sample=args.class_sample,
                          duplicate_threshold=args.duplicate_threshold, seed=args.seed, block_rows=args.block_rows,
                          device=str(device),
                          norm_k=args.norm_k, norm_beta=args.norm_beta, progress=args.progress,
                          index=None if args.index is None else IndexOptions(
                              args.index.strip(), nprobe=args.nprobe, rerank_factor=args.rerank_factor,
                              train_size=args.index_train_size, seed=args.seed))
    mirrored = None if not args.match_mirrors else mirrored_training(
        training, config, device=device, batch_size=args.batch_size, num_workers=args.num_workers,
        progress=args.progress)
    result = run_scan(generations, training, options, background, mirrored,
                      source_rows=None if generated is None else generated.source_rows)
    paths = write_outputs(out, result, generations, training, options, record, report_rows=args.report_rows,
                          thumb=args.thumb, wall_s=time.perf_counter() - start, generated=generated)
    section = None if generated is None else json.loads(paths["summary"].read_text())["generated"]
    print("\n".join(console_lines(result, generations, training, options, record, section)))
    print(f"report: {paths['report']} (matches.csv, summary.json and plots beside it)")
    return paths

