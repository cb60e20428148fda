"""A TextDiffusionModule's exported pipeline through lit generate: the images are the module's own
samples for the recorded seeds (issue 16: the exported pipeline loads in lit generate)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from lit.commands.generate_options import main as generate
from models.text_diffusion import TextDiffusionModule
from tests.text_standins import TINY_TEXT, caption_of


def test_lit_generate_on_an_exported_module_equals_the_module_samples(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = TextDiffusionModule(**TINY_TEXT)
    captions = [caption_of(row) for row in range(3)]
    module.prepare_text_encoder(" ".join(captions).split())
    with torch.no_grad():  # move the EMA weights off their initial values, so a wrong copy would show
        for parameter in module.ema_unet.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    folder = module.export_pipeline(tmp_path / "pipeline")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    out = tmp_path / "gen"
    generate(["--pipeline", str(folder), "--prompts", str(prompts), "--out", str(out), "--steps", "3",
              "--guidance", "3.0", "--batch_size", "2", "--no_progress", "--accelerator", "cpu"])
    with open(out / "generations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["prompt"] for row in rows] == captions
    expected = module.sample([row["prompt"] for row in rows], [int(row["seed"]) for row in rows], steps=3,
                             guidance_scale=3.0, batch_size=1)
    for row, image in zip(rows, expected):
        written = np.asarray(Image.open(out / row["file"]), dtype=np.float64) / 255.0
        reference = image.permute(1, 2, 0).double().numpy()
        assert np.abs(written - reference).max() <= 1.5 / 255, row["file"]  # PNG rounding, batch 2 vs 1
        assert float(row["memorization_score"]) > 0
