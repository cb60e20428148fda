"""The options of ``lit export`` (light: ``lit export --help`` answers without importing torch).

:func:`main` parses the command line, then imports :mod:`lit.commands.export` (torch, Lightning)
by name to do the work.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

#: The file ``lit export`` writes, and the registry name it loads as.
SUFFIX = ".safetensors"
DESCRIPTOR_NAME = "mocov3"
#: The module that does the export (imported by name: it loads torch and Lightning).
EXPORT_MODULE = "lit.commands.export"


def build_parser() -> argparse.ArgumentParser:
    """``lit export --ckpt_path CKPT --out FILE|FOLDER [--overwrite] [--class_path CLASS]``."""
    parser = argparse.ArgumentParser(
        prog="lit export", allow_abbrev=False,
        description="Write a checkpoint's trained backbone (e.g. MoCo v3's query encoder) as a descriptor file: "
                    f"safetensors + metadata, loaded as --model.init_args.descriptor.name {DESCRIPTOR_NAME} "
                    "--model.init_args.descriptor.weights FILE. A text-to-image checkpoint "
                    "(models.text_diffusion.TextDiffusionModule) becomes a pipeline folder --out FOLDER "
                    "(EMA weights) that lit generate --pipeline FOLDER loads.",
    )
    parser.add_argument("--ckpt_path", required=True, metavar="CKPT",
                        help="Lightning checkpoint of a module with a descriptor")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help=f"descriptor file to write ({SUFFIX}); for a text-to-image checkpoint, a new or empty folder")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE (or FOLDER) if an earlier lit export wrote it")
    parser.add_argument("--class_path", default=None,
                        help="module class (package.module.Class) when the checkpoint does not record it")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``lit export``: parse (``--help`` stops here), then export with :func:`lit.commands.export.run`."""
    args = build_parser().parse_args(argv)
    importlib.import_module(EXPORT_MODULE).run(args)
