"""``lit generate``: prompts -> images, seeds and memorization scores, over Lightning predict.

Assembles :class:`datamodules.generation.GenerationDataModule` (the prompts, read and drawn first:
a bad source is refused before the pipeline loads), :class:`models.generation.TextToImageGenerator`
(the pipeline folder, the scheduler, the options) and :class:`callbacks.generation_writer.GenerationWriter`
(the output folder: claimed, locked, compared with an earlier run) around one ``pl.Trainer``
(DDP when ``--devices`` > 1), then prints what was done. Options: :mod:`lit.commands.generate_options`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from callbacks.generation_writer import GENERATIONS, MANIFEST, PROMPTS, GenerationWriter
from datamodules.generation import GenerationDataModule
from datamodules.prompts import prompt_source_summary
from lit.errors import UserError
from models.generation import TextToImageGenerator


def build(args: argparse.Namespace) -> tuple[GenerationDataModule, TextToImageGenerator, GenerationWriter, dict[str, Any]]:
    """The datamodule, module, writer and trainer options of a run; every value is checked here,
    before any folder is touched (the writer checks ``--out`` when the trainer starts)."""
    if args.devices < 1:
        raise UserError(f"--devices must be >= 1, got {args.devices}")
    data = GenerationDataModule(prompts=args.prompts, ablate=args.ablate, n=args.n, seed=args.seed,
                                replacement=args.replacement, images_per_prompt=args.images_per_prompt,
                                batch_size=args.batch_size, caption_column=args.caption_column,
                                key_column=args.key_column)
    data.prompts  # noqa: B018 - read and drawn now: a bad source or --n ends here, before the pipeline loads
    try:
        module = TextToImageGenerator(args.pipeline, scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                                      height=args.height, width=args.width, negative_prompt=args.negative_prompt,
                                      score_only=args.score_only, score_steps=args.score_steps,
                                      precision=args.precision, embedding_noise=args.embedding_noise,
                                      random_words=args.random_words)
    except UserError as error:
        message = str(error)
        raise UserError(message if message.startswith("--") else f"--pipeline {args.pipeline}: {message}") from None
    accelerator = "cuda" if args.accelerator == "gpu" else args.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    module.dtype_on("cuda" if accelerator == "cuda" else "cpu")  # --precision 16 on a CPU ends here
    if out_inside(Path(args.out), Path(args.pipeline)):
        raise UserError(f"--out {args.out} lies inside --pipeline {args.pipeline}: choose a folder outside it")
    trainer_options = {
        "accelerator": accelerator, "devices": args.devices, "strategy": "ddp" if args.devices > 1 else "auto",
        "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
        "enable_progress_bar": not args.no_progress,
    }
    return data, module, GenerationWriter(args.out), trainer_options


def out_inside(out: Path, folder: Path) -> bool:
    """Whether ``out`` is ``folder`` or lies inside it (the pipeline's files would change under the run)."""
    target, root = out.expanduser().resolve(), folder.expanduser().resolve()
    return target == root or root in target.parents


def mitigation_text(module: TextToImageGenerator) -> str:
    """``; mitigations: ...`` for the start line (empty when none is on)."""
    parts = ([f"embedding noise {module.embedding_noise:g}"] if module.embedding_noise else []) + (
        [f"{module.random_words} random words added to each prompt"] if module.random_words else [])
    return f"; mitigations: {', '.join(parts)}" if parts else ""


@rank_zero_only
def say(line: str) -> None:
    print(line, flush=True)


def summary_lines(summary: dict[str, Any], out: Path) -> list[str]:
    """The console summary: what was written, how fast, the mean score, truncated prompts, where."""
    seconds, written = summary["seconds"], summary["images_written"]
    if summary["score_only"]:
        made = f"{summary['rows']} scores of {summary['prompts']} prompts (--score_only: no images)"
    else:
        made = f"{written} images written"
    made += f" in {seconds:.1f} s" + (f" ({written / seconds:.2f} img/s)" if written and seconds > 0 else "")
    if summary["batches_done_before"]:
        made += f"; {summary['batches_done_before']} of {summary['batches']} batches were done already"
    lines = [made,
             f"memorization score (mean over {summary['rows']} generations): {summary['mean_memorization_score']:.4g} "
             f"(first step: {summary['mean_memorization_score_first']:.4g})"]
    if summary["truncated_prompts"]:
        lines.append(f"{summary['truncated_prompts']} prompts were longer than the tokenizer's limit and truncated "
                     f"(listed in {MANIFEST})")
    lines.append(f"wrote {out / GENERATIONS}, {out / PROMPTS} and {out / MANIFEST}"
                 + ("" if summary["score_only"] else f"; images in {out / 'images'}"))
    return lines


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """``lit generate``: build, predict, print the summary; returns the writer's summary (rank 0)."""
    data, module, writer, options = build(args)
    rows = data.rows
    if rows is not None:
        say(prompt_source_summary(rows))
    say(f"{len(data.prompts)} prompts x {args.images_per_prompt} images = {len(data.jobs)} generations in "
        f"{len(data.batches)} batches of {args.batch_size}; pipeline {module.folder} ({type(module.pipeline).__name__}, "
        f"{type(module.pipeline.scheduler).__name__}, {args.steps} steps, guidance {args.guidance:g}, "
        f"{module.width}x{module.height}); score: {module.score_mode}{mitigation_text(module)}")
    trainer = pl.Trainer(callbacks=[writer], **options)
    trainer.predict(module, datamodule=data, return_predictions=False)
    if writer.summary is not None:
        for line in summary_lines(writer.summary, Path(args.out).expanduser()):
            say(line)
    return writer.summary
