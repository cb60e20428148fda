"""Steps/s and peak memory of fine-tuning a Stable Diffusion 1.x-sized UNet with ``TextDiffusionModule``,
with and without cached latents (issue 16, point 8).

The parent writes a random-weight pipeline folder of SD 1.5's sizes (UNet 320-640-1280-1280 with
cross-attention 768, the 4-level VAE, a 12-layer 768-wide CLIP text encoder with the suite's offline
tokenizer, 77 tokens), then runs each variant in its own subprocess (so peak memory is its own):
``lit fit``'s module and trainer, ``precision`` bf16-mixed by default, on procedural captioned scenes
(``datamodules.captioned``) at ``--size`` px, batch ``--batch``. The first ``--warmup`` steps are not
timed; with ``cache_latents`` they should also fill the cache (``--images`` few enough that every image
is drawn during warm-up: the script reports how many were cached). Time is wall clock per optimizer
step with the device synchronised at each batch end; memory is ``torch.cuda.max_memory_allocated``
(GPU) or the process's peak RSS (CPU).

    python benchmarks/bench_text_finetune.py                     # GPU: SD 1.x sizes, 256 px, batch 16
    python benchmarks/bench_text_finetune.py --tiny              # CPU, tiny SD folder, seconds: a smoke run
    python benchmarks/bench_text_finetune.py --gradient_checkpointing --batch 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_sd15_sized_folder(folder: Path, seed: int = 0) -> Path:
    """A random pipeline folder with Stable Diffusion 1.5's component sizes (fp32 safetensors)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.tiny_text2image import BASE_WORDS, sd_scheduler, train_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    tokenizer = train_clip_tokenizer(BASE_WORDS, max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def child(folder: Path, cache: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune ``--warmup + --steps`` steps in this process; per-step times and peak memory."""
    import pytorch_lightning as pl
    import torch

    from datamodules.captioned import CaptionedImageDataModule
    from models.text_diffusion import TextDiffusionModule

    cuda = torch.cuda.is_available() and not args.tiny
    times: list[float] = []

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.start = 0.0

        def on_train_batch_start(self, *unused: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *unused: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    pl.seed_everything(0, verbose=False)
    module = TextDiffusionModule(pretrained=str(folder), cache_latents=cache, warmup_steps=0, learning_rate=1e-5,
                                 gradient_checkpointing=args.gradient_checkpointing, image_size=args.size)
    total = args.warmup + args.steps
    data = CaptionedImageDataModule(procedural=args.images, resolution=args.size, batch_size=args.batch,
                                    repeats=max(1, -(-total * args.batch // args.images)))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=args.precision, max_steps=total,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Clock()], default_root_dir=tempfile.mkdtemp())
    trainer.fit(module, datamodule=data)
    timed = sorted(times[args.warmup:])
    median = timed[len(timed) // 2]
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"cache_latents": cache, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "precision": args.precision, "size": args.size, "batch": args.batch, "timed_steps": len(timed),
            "median_step_s": median, "steps_per_s": 1 / median, "images_per_s": args.batch / median,
            "peak_memory_gib": peak / 2**30, "peak_kind": "cuda max_memory_allocated" if cuda else "peak RSS",
            "cached_images": len(module._latent_cache), "unet_parameters_m": sum(p.numel() for p in module.unet.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random SD folder (seconds)")
    parser.add_argument("--size", type=int, default=256, help="training image side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (they fill the latent cache)")
    parser.add_argument("--images", type=int, default=32, help="procedural training scenes")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--folder", type=Path, default=None, help="reuse a pipeline folder (default: write one)")
    parser.add_argument("--child", choices=["plain", "cached"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.size, args.batch, args.steps, args.warmup, args.images = 32, 2, 3, 2, 4
    if args.child:
        print("RESULT " + json.dumps(child(args.folder, args.child == "cached", args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder
        if folder is None:
            from models.tiny_text2image import write_tiny_sd_pipeline

            start = time.perf_counter()
            folder = (write_tiny_sd_pipeline(Path(scratch) / "sd", image_size=32) if args.tiny
                      else write_sd15_sized_folder(Path(scratch) / "sd"))
            print(f"wrote {folder} in {time.perf_counter() - start:.1f} s", flush=True)
        forwarded = ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--images", str(args.images), "--precision", args.precision,
                     *(["--tiny"] if args.tiny else []),
                     *(["--gradient_checkpointing"] if args.gradient_checkpointing else [])]
        rows = []
        for variant in ("plain", "cached"):
            done = subprocess.run([sys.executable, __file__, *forwarded, "--folder", str(folder), "--child", variant],
                                  capture_output=True, text=True, cwd=REPO)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {variant} failed (exit {done.returncode})")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| cache_latents | device | precision | px | batch | steps/s | images/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['cache_latents']} | {row['device']} | {row['precision']} | {row['size']} | {row['batch']} | "
              f"{row['steps_per_s']:.2f} | {row['images_per_s']:.1f} | {row['peak_memory_gib']:.2f} ({row['peak_kind']}) |")


if __name__ == "__main__":
    main()
