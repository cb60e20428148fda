"""``lit scan``: search generated images against a training set and report what was copied.

The options of ``lit scan`` (light: ``lit scan --help`` answers without importing torch,
Lightning or timm). :func:`main` parses and checks the command line, then imports
:mod:`lit.commands.scan.command` (the scan itself) by name to do the work. The descriptor's
options are :class:`models.descriptor_options.DescriptorOptions`'s fields, checked against the
registry by :class:`models.descriptor_config.DescriptorConfig` when the scan starts.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from lit.choices import DEFAULT_THRESHOLDS, DTYPES, DUPLICATE_THRESHOLD, MATCH_MIRRORS
from lit.errors import UserError
from models.descriptor_options import DESCRIPTOR_NAMES, DescriptorOptions

#: The module that runs the scan (imported by name: it loads torch and Lightning).
SCAN_MODULE = "lit.commands.scan.command"


def build_parser() -> ArgumentParser:
    """The options of ``lit scan`` (also readable from a YAML file with ``--config``)."""
    parser = ArgumentParser(prog="lit scan", description=__doc__.splitlines()[0], exit_on_error=False,
                            allow_abbrev=False, epilog=f"descriptors (--descriptor.name): {', '.join(DESCRIPTOR_NAMES)}")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument("--generations", type=str, required=True, help="image folder or feature store of the generations")
    parser.add_argument("--training", type=str, required=True, help="image folder or feature store of the training set")
    parser.add_argument("--out", type=str, required=True, help="output folder (new, empty, or made by lit scan)")
    parser.add_argument("--descriptor", type=DescriptorOptions, default=DescriptorOptions(),
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
    """Parsed options, every one checked that can be without the registry (``descriptor`` is a
    :class:`DescriptorOptions` with a known name); mistakes become one-line :class:`UserError`s."""
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
    try:  # the descriptor's messages name the field as "descriptor.<field>"
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


def main(argv: Sequence[str] | None = None) -> None:
    """``lit scan``: parse and check (``--help`` stops here), then scan with :func:`lit.commands.scan.command.run`."""
    args = parse_args([] if argv is None else argv)
    importlib.import_module(SCAN_MODULE).run(args)
