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
from jsonargparse import ActionConfigFile, ArgumentParser

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
from lit.commands.scan.outputs import console_lines, locked_out, write_outputs
from lit.commands.scan.sources import (
    FeatureSource,
    StoreSource,
    check_descriptor,
    extract_input,
)
from lit.commands.scan.types import ScanOptions
from lit.errors import UserError
from lit.replication import DEFAULT_THRESHOLDS, DUPLICATE_THRESHOLD, MATCH_MIRRORS
from lit.store import DTYPES, FeatureStore, is_store
from models.descriptor_config import DescriptorConfig
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


def build_parser() -> ArgumentParser:
    """The options of ``lit scan`` (also readable from a YAML file with ``--config``)."""
    parser = ArgumentParser(prog="lit scan", description=__doc__.splitlines()[0], exit_on_error=False,
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument("--generations", type=str, required=True, help="image folder or feature store of the generations")
    parser.add_argument("--training", type=str, required=True, help="image folder or feature store of the training set")
    parser.add_argument("--out", type=str, required=True, help="output folder (new, empty, or made by lit scan)")
    parser.add_argument("--descriptor", type=DescriptorConfig, default=DescriptorConfig(),
                        help="the descriptor (models.descriptor_config.DescriptorConfig)")
    parser.add_argument("--background", type=str | None, default=None,
                        help="image folder / store for SSCD score normalisation (off when not given)")
    parser.add_argument("--norm_k", type=int, default=10, help="background neighbours averaged for normalisation")
    parser.add_argument("--norm_beta", type=float, default=1.0, help="weight of the background mean")
    parser.add_argument("--k", type=int, default=5, help="training matches per generation")
    parser.add_argument("--thresholds", type=list[float], default=list(DEFAULT_THRESHOLDS), help="replication thresholds")
    parser.add_argument("--baseline_sample", type=int | None, default=None,
                        help="training rows for the self-similarity baseline, a seeded sample (labelled so in every "
                             "output; null: all of them, exact)")
    parser.add_argument("--match_mirrors", type=bool, default=MATCH_MIRRORS,
                        help="a training image also matches through its horizontal mirror (as the monitor's "
                             "match_mirrors; embeds the mirrored training images too)")
    parser.add_argument("--random_sample", type=int, default=1000, help="random training rows for the duplicate comparison")
    parser.add_argument("--class_sample", type=int, default=1000, help="training rows per class for within-class similarity")
    parser.add_argument("--duplicate_threshold", type=float, default=DUPLICATE_THRESHOLD, help="duplicate similarity")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample")
    parser.add_argument("--block_rows", type=int, default=65536, help="training rows searched at a time")
    parser.add_argument("--index", type=str | None, default=None,
                        help="faiss factory string of an approximate index over the training store for the "
                             "generation search, e.g. IVF4096,Flat or IVF4096,PQ64np (null: exact search; "
                             "global features only; built once, saved beside the store, reused)")
    parser.add_argument("--nprobe", type=int | None, default=None,
                        help="IVF lists visited per generation (null: 16, the index's default)")
    parser.add_argument("--rerank_factor", type=int, default=10,
                        help="shortlist of k x this many rows from the index, re-ranked exactly from the store")
    parser.add_argument("--index_train_size", type=int | None, default=None,
                        help="training rows sampled (--seed) to train the index (null: max(50000, 40 x lists))")
    parser.add_argument("--report_rows", type=int, default=20, help="generations shown in report.html")
    parser.add_argument("--thumb", type=int, default=96, help="thumbnail side in report.html (pixels)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--batch_size", type=int, default=64, help="images per embedding batch")
    parser.add_argument("--num_workers", type=int, default=0, help="image loading workers")
    parser.add_argument("--store_dir", type=str | None, default=None, help="where folders are extracted (default OUT/stores)")
    parser.add_argument("--dtype", type=str, default="float16", help="dtype of extracted stores: float16 or float32")
    parser.add_argument("--progress", type=bool, default=True, help="progress bars")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parsed options; mistakes become one-line :class:`UserError`s."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except argparse.ArgumentError as error:
        if 'key "descriptor": Unable to load config' in str(error):  # the flat spelling of before
            raise UserError("lit scan: --descriptor takes a YAML file of the descriptor's options; name the "
                            "descriptor with --descriptor.name NAME (and --descriptor.weights FILE)") from None
        raise UserError(f"lit scan: {error}".replace("\n", " ")) from None
    for name in ("k", "norm_k", "batch_size", "block_rows", "random_sample", "class_sample", "thumb",
                 "rerank_factor"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.report_rows < 0:
        raise UserError(f"--report_rows must be >= 0, got {args.report_rows}")
    if args.baseline_sample is not None and args.baseline_sample < 1:
        raise UserError(f"--baseline_sample must be >= 1 or null, got {args.baseline_sample}")
    for name in ("nprobe", "index_train_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1 or null, got {getattr(args, name)}")
    if args.index is not None and not args.index.strip():
        raise UserError("--index must be a faiss factory string such as IVF1024,Flat, or null for exact search")
    if args.index is not None and args.match_mirrors:
        raise UserError("--index searches the training store only, not its mirror: use exact search "
                        "(--index null) with --match_mirrors")
    check_thresholds(args.thresholds, args.duplicate_threshold)
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    try:  # DescriptorConfig checks itself; its messages name the field as "descriptor.<field>"
        args.descriptor = parser.instantiate(args).descriptor
    except UserError as error:
        raise UserError(f"--{error}") from None
    return args


def check_thresholds(thresholds: Sequence[float], duplicate_threshold: float) -> None:
    """Similarities lie in [-1, 1]: every threshold must too, and a scan needs at least one (each once)."""
    if not thresholds:
        raise UserError("--thresholds needs at least one threshold in [-1, 1], e.g. [0.5]")
    for value in thresholds:
        if not -1.0 <= value <= 1.0:  # NaN fails here too
            raise UserError(f"--thresholds: {value} is not a similarity; every threshold must lie in [-1, 1]")
    if len(set(thresholds)) != len(thresholds):
        raise UserError(f"--thresholds: each threshold once, got {list(thresholds)}")
    if not -1.0 <= duplicate_threshold <= 1.0:
        raise UserError(f"--duplicate_threshold: {duplicate_threshold} is not a similarity; it must lie in [-1, 1]")


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
    """``lit scan``: parse, embed or open the inputs, scan, write the outputs, print where they are."""
    start = time.perf_counter()
    args = parse_args([] if argv is None else argv)
    out = Path(args.out).expanduser()
    config: DescriptorConfig = args.descriptor
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

