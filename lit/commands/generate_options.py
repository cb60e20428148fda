"""The options of ``lit generate`` (light: ``lit generate --help`` answers without importing torch).

:func:`main` parses the command line, then imports :mod:`lit.commands.generate` (torch, diffusers, Lightning) by name to do the work.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from lit.errors import UserArgumentParser

#: The module that generates (imported by name: it loads torch, diffusers and Lightning).
GENERATE_MODULE = "lit.commands.generate"
SCHEDULERS = ("folder", "ddim", "dpm")
PRECISIONS = ("auto", "32", "bf16", "16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")

DESCRIPTION = (
    "Generate images from a local text-to-image pipeline folder (Stable Diffusion 1.x / 2.x layout, or the suite's "
    "own pixel-space models) for a set of prompts, each image with its own recorded seed, and the memorization "
    "score of Wen et al. (mean and first-step ||eps(x_t, prompt) - eps(x_t, empty)||, from the guidance batch). "
    "Writes OUT/images/*.png, OUT/generations.csv, OUT/prompts.csv and OUT/generate_manifest.json; a rerun with "
    "the same arguments completes a killed run. Scan the result with: lit scan --generations OUT ..."
)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("null", "none") else int(text)


def build_parser() -> argparse.ArgumentParser:
    """``lit generate --pipeline DIR (--prompts SOURCE | --ablate PROMPT) --out OUT [options]``."""
    parser = UserArgumentParser(prog="lit generate", description=DESCRIPTION, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline", required=True, metavar="DIR",
                        help="local diffusers pipeline folder (model_index.json, unet, text_encoder, tokenizer, "
                             "scheduler, and vae for latent models); nothing is downloaded")
    parser.add_argument("--prompts", default=None, metavar="SOURCE",
                        help=".txt (one prompt a line), .csv/.tsv/.jsonl (caption column, optional key column), a "
                             "feature store with captions, or webdataset .tar shards")
    parser.add_argument("--ablate", default=None, metavar="PROMPT",
                        help="instead of --prompts: this prompt and its variants with one word dropped and cut word "
                             "by word from the end (paper Fig. 10), all with the same seeds")
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder (new, empty, or an earlier "
                        "lit generate run to complete with the same arguments)")
    parser.add_argument("--n", type=int, default=None, help="draw N prompts with --seed (default: every prompt once)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draw and every image's seed")
    parser.add_argument("--replacement", action="store_true", help="draw the N prompts with replacement")
    parser.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt, each with its own seed")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance scale (<= 1: none; the score then adds an unconditional pass)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="folder",
                        help="the pipeline folder's scheduler, DDIM, or DPM-Solver multistep (same noise schedule)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    parser.add_argument("--negative_prompt", default=None,
                        help="unconditional prompt of the guidance (the score still compares with the empty prompt)")
    parser.add_argument("--batch_size", type=int, default=4,
                        help="images per pipeline call (keep it to resume: batches are the unit of resumption)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: float32 on CPU, bfloat16 (else float16) on GPU")
    parser.add_argument("--score_only", action="store_true",
                        help="screening: compute the memorization score over the first --score_steps steps only, "
                             "without finishing or decoding the images (no images written)")
    parser.add_argument("--score_steps", type=_optional_int, default=None, metavar="K",
                        help="steps scored with --score_only (default: all --steps)")
    parser.add_argument("--embedding_noise", type=float, default=0.0, metavar="LAMBDA",
                        help="mitigation: add Gaussian noise of std LAMBDA to each image's prompt embeddings "
                             "(seeded by the image's seed; the unconditional ones unchanged)")
    parser.add_argument("--random_words", type=int, default=0, metavar="COUNT",
                        help="mitigation: insert COUNT random words of the tokenizer's vocabulary into each prompt at "
                             "random places (seeded by the image's seed; generations.csv: generated_prompt)")
    parser.add_argument("--caption_column", default=None, help="caption column of a table source (default: found)")
    parser.add_argument("--key_column", default=None, help="key column of a table source (default: found)")
    parser.add_argument("--devices", type=int, default=1, help="processes (GPUs); more than 1 runs DDP")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="auto: a GPU when there is one")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``lit generate``: parse (``--help`` stops here), then :func:`lit.commands.generate.run` (which
    checks every value before any work: the datamodule, the module and the writer each check theirs)."""
    args = build_parser().parse_args(argv)
    importlib.import_module(GENERATE_MODULE).run(args)
