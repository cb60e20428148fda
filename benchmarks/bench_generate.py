"""Generation speed: ``lit generate``'s predict path vs a plain loop of pipeline calls, and the score's cost.

Three paths over the same jobs (prompts, seeds, batches), interleaved round by round in one process:

- ours: ``Trainer.predict`` with ``TextToImageGenerator`` + ``GenerationDataModule`` + ``GenerationWriter``
  (the memorization score, PNG files written atomically with their SHA-256, per-batch row files,
  the CSVs and manifest; the pipeline loaded once, as the module is built outside the clock);
- plain: a loop of ``pipeline(prompts, generator=[torch.Generator("cpu").manual_seed(s) ...], ...)``
  calls with the same arguments and batches, each image saved as PNG (no score);
- the score's own cost: each batch generated with and without the score's UNet hook
  (:class:`models.generation.MemorizationScorer`), back to back.

CPU (default): the tiny random SD pipeline of :mod:`models.tiny_text2image` (32 px). ``--gpu``: an SD
1.x-sized random pipeline (UNet 320-640-1280-1280, cross-attention 768, the SD VAE, a 12-layer CLIP
text encoder; 512 px), in bfloat16 and float32, with images/s and peak GPU memory per path.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generate.py            # ~5 min on a busy 2-core CPU
    .venv/bin/python benchmarks/bench_generate.py --gpu --rounds 3     # 32 prompts, batch 8, 50 steps, bf16 and fp32
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from callbacks.generation_writer import GenerationWriter
from lit.commands.cli import quiet_known_logs, quiet_known_warnings
from datamodules.generation import GenerationDataModule
from models.generation import MemorizationScorer, TextToImageGenerator, quiet_libraries
from models.tiny_text2image import sd_scheduler, tiny_clip_text_encoder, train_clip_tokenizer, write_tiny_sd_pipeline

WORDS = "red green blue yellow circle square star ring castle painting photo of a on the".split()


def write_sd_sized_pipeline(folder: Path, seed: int = 0) -> Path:
    """A random pipeline with Stable Diffusion 1.x's UNet, VAE and text-encoder sizes (a tiny tokenizer
    with SD's 77-token context)."""
    tokenizer = train_clip_tokenizer(WORDS, max_length=77)
    text_encoder = tiny_clip_text_encoder(tokenizer, hidden_size=768, layers=12, seed=seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


def plain_loop(pipeline: Any, batches: list[list[dict[str, Any]]], args: argparse.Namespace, out: Path,
               scorer: MemorizationScorer | None = None) -> None:
    """The reference: the pipeline called batch by batch, every image saved as a PNG."""
    out.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        options = {"prompt": [job["prompt"] for job in batch], "num_inference_steps": args.steps,
                   "guidance_scale": args.guidance,
                   "generator": [torch.Generator("cpu").manual_seed(job["seed"]) for job in batch]}
        if scorer is None:
            images = pipeline(**options).images
        else:
            with scorer.recording(len(batch)):
                images = pipeline(**options).images
        for job, image in zip(batch, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            (out / Path(job["file"]).name).write_bytes(buffer.getvalue())


class TimedScorer(MemorizationScorer):
    """The score's hook with a clock inside: the seconds the hook itself takes (the score's whole
    cost in the guidance-batch mode, measured without the noise of a busy machine's other jobs)."""

    seconds = 0.0

    def _hook(self, *args: Any) -> None:
        started = time.perf_counter()
        try:
            super()._hook(*args)
        finally:
            TimedScorer.seconds += time.perf_counter() - started


def paired_hook_cost(pipeline: Any, batches: list[list[dict[str, Any]]], args: argparse.Namespace,
                     scorer: MemorizationScorer, device: torch.device) -> tuple[float, float, list[float], float]:
    """Seconds of pipeline calls without and with the score's hook, each batch run both ways back to
    back (the order alternating): the finest interleaving, so a busy machine slows both alike.
    Returns (without, with, per-batch ratios, seconds inside the hook)."""
    without = with_hook = 0.0
    each = []
    TimedScorer.seconds = 0.0
    for number, batch in enumerate(batches * 2):
        options = {"prompt": [job["prompt"] for job in batch], "num_inference_steps": args.steps,
                   "guidance_scale": args.guidance, "output_type": "latent"}
        seconds = {}
        for hooked in ((False, True) if number % 2 == 0 else (True, False)):
            options["generator"] = [torch.Generator("cpu").manual_seed(job["seed"]) for job in batch]
            sync(device)
            started = time.perf_counter()
            if hooked:
                with scorer.recording(len(batch)):
                    pipeline(**options)
            else:
                pipeline(**options)
            sync(device)
            seconds[hooked] = time.perf_counter() - started
        without, with_hook = without + seconds[False], with_hook + seconds[True]
        each.append(seconds[True] / seconds[False])
    return without, with_hook, each, TimedScorer.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(folder: Path, prompts_file: Path, args: argparse.Namespace, precision: str, work: Path) -> dict[str, Any]:
    accelerator = "cuda" if args.gpu else "cpu"
    device = torch.device("cuda" if args.gpu else "cpu")
    module = TextToImageGenerator(str(folder), steps=args.steps, guidance=args.guidance, precision=precision)
    data = GenerationDataModule(prompts=str(prompts_file), batch_size=args.batch_size)
    batches = [[{"file": job.file, "prompt": job.prompt, "seed": job.seed} for job in b.jobs] for b in data.batches]
    images = sum(len(b) for b in batches)
    pipeline = module.pipeline
    with quiet_libraries():
        pipeline.to(device=device, dtype=module.dtype_on(device))
    scorer = TimedScorer(pipeline.unet, module.empty_embedding, module.score_mode)
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    peaks: dict[str, int] = {}

    def ours(round_: int) -> None:
        trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=False,
                             callbacks=[GenerationWriter(str(work / f"ours_{precision}_{round_}"))])
        trainer.predict(module, datamodule=GenerationDataModule(prompts=str(prompts_file), batch_size=args.batch_size),
                        return_predictions=False)

    paths = {"ours": ours,
             "plain": lambda r: plain_loop(pipeline, batches, args, work / f"plain_{precision}_{r}", None)}
    with quiet_libraries(), torch.inference_mode():
        plain_loop(pipeline, batches[:1], args, work / "warmup", scorer)  # kernels, allocator
    for round_ in range(args.rounds):
        order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
        for name in order:
            pipeline.to(device)  # Lightning's teardown moves a module back to the CPU
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            with quiet_libraries(), torch.inference_mode():
                paths[name](round_)
            sync(device)
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
    written = sorted((work / f"ours_{precision}_0" / "images").glob("*.png"))
    reference = sorted((work / f"plain_{precision}_0").glob("*.png"))
    assert [p.name for p in written] == [p.name for p in reference] and len(written) == images
    difference = max(np.abs(np.asarray(_png(a), dtype=int) - np.asarray(_png(b), dtype=int)).max()
                     for a, b in zip(written, reference))
    medians = {name: statistics.median(values) for name, values in times.items()}
    pipeline.to(device)
    with quiet_libraries(), torch.inference_mode():
        hook = paired_hook_cost(pipeline, batches, args, scorer, device)
    return {"images": images, "medians": medians, "times": times, "cpu": cpu, "peaks": peaks,
            "max_pixel_difference": int(difference), "hook": hook}


def ratios(numerator: list[float], denominator: list[float]) -> str:
    """The median of the per-round ratios, then each round's (rounds are interleaved: a busy moment
    of the machine slows both paths of a round)."""
    each = [a / b for a, b in zip(numerator, denominator)]
    return f"{statistics.median(each):.3f} (rounds: {', '.join(f'{r:.3f}' for r in each)})"


def _png(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="SD 1.x-sized random pipeline at 512 px on CUDA")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (CPU: 64, GPU: 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per call (CPU: 4, GPU: 8)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (CPU: 20, GPU: 50)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    args = parser.parse_args()
    args.prompts = args.prompts or (32 if args.gpu else 64)
    args.batch_size = args.batch_size or (8 if args.gpu else 4)
    args.steps = args.steps or (50 if args.gpu else 20)
    quiet_known_warnings()
    quiet_known_logs()
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as scratch:  # removed with what the run wrote
        work = Path(scratch)
        with quiet_libraries():
            folder = (write_sd_sized_pipeline(work / "pipeline") if args.gpu
                      else write_tiny_sd_pipeline(work / "pipeline", image_size=32, words=WORDS))
        prompts_file = work / "prompts.txt"
        rng = np.random.default_rng(0)
        prompts_file.write_text("".join(" ".join(rng.choice(WORDS, size=6)) + "\n" for _ in range(args.prompts)))
        machine = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} torch threads"
        print(f"{machine}; {args.prompts} prompts, batch {args.batch_size}, {args.steps} steps, guidance "
              f"{args.guidance:g}, {args.rounds} interleaved rounds (medians)")
        for precision in (("bf16", "32") if args.gpu else ("32",)):
            found = measure(folder, prompts_file, args, precision, work)
            medians, images = found["medians"], found["images"]
            print(f"precision {precision}: {images} images, ours vs plain: max pixel difference "
                  f"{found['max_pixel_difference']}")
            for name, seconds in medians.items():
                peak = found["peaks"].get(name)
                print(f"  {name:14s} {seconds:8.2f} s  {images / seconds:8.2f} img/s"
                      + (f"  peak {peak / 2**30:.2f} GiB" if peak is not None else ""))
            print(f"  ours / plain, wall: {ratios(found['times']['ours'], found['times']['plain'])}")
            print(f"  ours / plain, CPU time: {ratios(found['cpu']['ours'], found['cpu']['plain'])}")
            without, with_hook, each, inside = found["hook"]
            print(f"  the score's hook, each batch with and without it back to back ({len(each)} pairs, latents "
                  f"only): {100 * (with_hook / without - 1):+.2f}% of the pipeline's time (median pair "
                  f"{100 * (statistics.median(each) - 1):+.2f}%); inside the hook: {inside:.3f} s = "
                  f"{100 * inside / (with_hook - inside):.2f}% of the hooked pipeline's time")
        print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
