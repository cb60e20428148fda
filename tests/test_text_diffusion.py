"""models.text_diffusion.TextDiffusionModule from scratch: training reduces the loss, caption dropout,
embedding noise and mixup do what they say (seen at the UNet's input), the EMA follows diffusers'
formula, the sampling pipeline shares the module's weights, and exported folders load and sample alike."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from datamodules.images import ProceduralTrainData
from lit.errors import UserError
from models.pipeline_folder import MARKER
from models.text_diffusion import TextDiffusionModule
from models.text_pipeline import PixelTextToImagePipeline, load_text_pipeline
from tests.text_standins import TINY_TEXT, caption_of, scenes

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")


def tiny(**overrides: Any) -> TextDiffusionModule:
    torch.manual_seed(0)
    module = TextDiffusionModule(**{**TINY_TEXT, **overrides})
    module.prepare_text_encoder([word for row in range(32) for word in caption_of(row).split()])
    return module


def batch_of(rows: list[int], size: int = 16) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(sum(rows) + 1)
    return {"image": torch.rand(len(rows), 3, size, size, generator=generator), "caption": [caption_of(r) for r in rows],
            "key": [f"scene{r:03d}" for r in rows], "index": torch.tensor(rows), "duplicated": torch.zeros(len(rows), dtype=torch.bool)}


class Inputs:
    """Records the ``encoder_hidden_states`` the UNet is called with."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen.append(kwargs["encoder_hidden_states"].detach().clone())


def fit(module: TextDiffusionModule, data: pl.LightningDataModule, tmp_path: Path, steps: int,
        callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=callbacks or [])
    trainer.fit(module, datamodule=data)
    return trainer


def test_training_reduces_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    """The loss at fixed draws (8 positions) on the 2 training images falls by more than a third in 60 steps."""
    module = tiny(caption_dropout=0.0)
    data = scenes(2, dup_fraction=0.0, repeats=2)
    data.setup("fit")
    dataset = data.train_dataset()
    batch = torch.utils.data.default_collate([dataset[(row, row, 0)] for row in (0, 1)])

    def fixed_loss() -> float:
        with torch.no_grad():
            return sum(float(module.diffusion_loss(batch, 10_000 + k)) for k in range(8)) / 8

    before = fixed_loss()
    fit(module, data, tmp_path, steps=60)
    after = fixed_loss()
    assert math.isfinite(before) and after < 0.66 * before, (before, after)
    assert module.ema.optimization_step == 60


def test_caption_dropout_rate_and_its_embedding() -> None:
    module = tiny(caption_dropout=0.25)
    n = 1200
    captions = [caption_of(i % 32) for i in range(n)]
    seeds = list(range(n))
    conditioning = module.training_conditioning(captions, seeds, position=0)
    empty = module.encode([""])[0]
    own = module.encode(captions)
    dropped = torch.tensor([torch.equal(row, empty) for row in conditioning])
    kept = torch.tensor([torch.equal(row, ref) for row, ref in zip(conditioning, own)])
    assert bool((dropped ^ kept).all())  # each sample has its caption's embedding or the empty caption's
    assert abs(float(dropped.float().mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    # per sample draw: the same seed drops the same caption in another batch
    again = module.training_conditioning(captions[5:9], seeds[5:9], position=0)
    assert all(torch.equal(a, b) for a, b in zip(again, conditioning[5:9]))
    off = tiny(caption_dropout=0.0).training_conditioning(captions[:50], seeds[:50], position=0)
    assert not any(torch.equal(row, empty) for row in off)


def test_embedding_noise_at_the_unet_input() -> None:
    module = tiny(caption_dropout=0.0, embedding_noise=0.4)
    inputs = Inputs(module.unet)
    batch = batch_of([0, 1, 2, 3, 4, 5])
    module.training_step(batch, 0)
    (seen,) = inputs.seen
    difference = seen - module.encode(batch["caption"])
    assert float(difference.std()) == pytest.approx(0.4, rel=0.05)
    assert abs(float(difference.mean())) < 4 * 0.4 / math.sqrt(difference.numel())
    plain = tiny(caption_dropout=0.0)
    inputs = Inputs(plain.unet)
    plain.training_step(batch, 0)
    assert torch.equal(inputs.seen[0], plain.encode(batch["caption"]))
    assert plain.hparams.embedding_noise == 0.0 and module.hparams.embedding_noise == 0.4  # recorded in hparams


def _solve_mixup(seen: torch.Tensor, own: torch.Tensor) -> tuple[list[int], list[float]]:
    """For each row, the partner j and weight w with seen_i = w own_i + (1 - w) own_j best (least squares)."""
    partners, weights = [], []
    for i in range(len(seen)):
        tolerance = 1e-4 * float(own[i].norm())
        if float((seen[i] - own[i]).norm()) < tolerance:  # its own partner (any j fits with w = 1)
            partners.append(i)
            weights.append(1.0)
            continue
        best = None
        for j in range(len(own)):
            if j != i:
                direction = (own[i] - own[j]).flatten()
                w = float(((seen[i] - own[j]).flatten() @ direction) / (direction @ direction))
                residual = float((seen[i] - (w * own[i] + (1 - w) * own[j])).norm())
                if best is None or residual < best[0]:
                    best = (residual, j, w)
        assert best is not None and best[0] < tolerance, best
        partners.append(best[1])
        weights.append(best[2])
    return partners, weights


def test_embedding_mixup_mixes_two_samples_with_one_weight_per_batch() -> None:
    module = tiny(caption_dropout=0.0, embedding_mixup=1.0)
    rows = [0, 1, 2, 3, 4, 5]
    own = module.encode([caption_of(r) for r in rows])
    means = {}
    for alpha in (1.0, 4.0):
        module.hparams.embedding_mixup = alpha
        weights_seen = []
        for position in range(30):
            seen = module.training_conditioning([caption_of(r) for r in rows], list(range(100 * position, 100 * position + 6)),
                                                position)
            partners, weights = _solve_mixup(seen, own)
            assert sorted(partners) == rows  # the partners form a permutation of the batch
            mixed = [w for i, (j, w) in enumerate(zip(partners, weights)) if j != i]
            assert mixed and max(mixed) - min(mixed) < 1e-4  # one weight for the whole batch
            weights_seen.append(mixed[0])
        assert all(0 <= w <= 1 for w in weights_seen)
        means[alpha] = sum(weights_seen) / len(weights_seen)
    # Beta(alpha, 1): mean alpha / (alpha + 1); 30 draws, sd of the mean <= 0.053
    assert means[1.0] == pytest.approx(0.5, abs=0.16) and means[4.0] == pytest.approx(0.8, abs=0.1)
    assert means[4.0] > means[1.0]


def test_mitigations_leave_the_dropped_captions_exactly_empty() -> None:
    module = tiny(caption_dropout=0.5, embedding_noise=0.3, embedding_mixup=1.0)
    captions = [caption_of(i) for i in range(40)]
    conditioning = module.training_conditioning(captions, list(range(40)), position=3)
    empty = module.encode([""])[0]
    exact = [torch.equal(row, empty) for row in conditioning]
    assert 8 < sum(exact) < 32  # about half dropped, each exactly the empty caption's embedding


def test_ema_follows_diffusers_warmup_formula(tmp_path: Path) -> None:
    """EMA weights after each step against the formula by hand: decay at update n is
    min(1 - (1 + n - 1) ** -power, ema_decay), and 0 at the first update."""
    module = tiny(ema_decay=0.6, ema_power=0.75)
    steps: list[dict[str, torch.Tensor]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            steps.append({k: v.detach().clone() for k, v in module.unet.state_dict().items()})

    fit(module, scenes(4), tmp_path, steps=4, callbacks=[Record()])
    reference = {k: v.clone() for k, v in steps[0].items()}
    for n, weights in enumerate(steps[1:], start=2):
        decay = min(1 - (1 + (n - 1)) ** -0.75, 0.6)
        reference = {k: decay * reference[k] + (1 - decay) * weights[k] for k in reference}
    ema = module.ema_unet.state_dict()
    assert all(torch.allclose(ema[k], reference[k], atol=1e-6) for k in reference)
    assert not all(torch.equal(ema[k], steps[-1][k]) for k in reference)


def test_pipeline_shares_the_modules_and_samples_per_seed(tmp_path: Path) -> None:
    module = tiny(ema_decay=0.5)
    fit(module, scenes(4), tmp_path, steps=3)
    ema, live = module.pipeline(), module.pipeline(ema=False)
    assert isinstance(ema, PixelTextToImagePipeline)
    assert ema.unet is module.ema_unet and live.unet is module.unet and ema.text_encoder is module.text_encoder
    captions, seeds = [caption_of(1), caption_of(2), caption_of(1)], [5, 6, 7]
    images = module.sample(captions, seeds)
    assert images.shape == (3, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    alone = module.sample(captions[2:], seeds[2:], batch_size=1)
    assert torch.allclose(alone[0], images[2], atol=1e-5)  # an image depends on its caption and seed only
    assert (images[0] - images[2]).abs().max() > 0.01  # other seed, other image
    assert (module.sample(captions, seeds, ema=False) - images).abs().max() > 1e-4  # EMA weights differ from the live ones
    direct = ema(prompt=captions, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                 generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert torch.allclose(direct, images, atol=1e-6)


def test_exported_folder_loads_and_samples_like_the_module(tmp_path: Path) -> None:
    module = tiny(ema_decay=0.5)
    fit(module, scenes(4), tmp_path, steps=2)
    folder = module.export_pipeline(tmp_path / "pipe")
    record = json.loads((folder / MARKER).read_text())
    assert record["ema"] is True and record["global_step"] == 2 and "model_index.json" in record["files"]
    loaded = load_text_pipeline(folder)
    assert isinstance(loaded, PixelTextToImagePipeline)
    kwargs = dict(prompt=[caption_of(0), caption_of(3)], num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    ours = module.pipeline()(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    theirs = loaded(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    assert torch.allclose(ours, theirs, atol=1e-6)
    # safety: a pipeline lit wrote is replaced only with overwrite; a foreign folder never
    with pytest.raises(UserError, match="pass --overwrite"):
        module.export_pipeline(folder)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        module.export_pipeline(folder, overwrite=True)
    (folder / "notes.txt").unlink()
    module.export_pipeline(folder, overwrite=True)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "photo.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not written by lit"):
        module.export_pipeline(tmp_path / "user", overwrite=True)
    assert (tmp_path / "user" / "photo.png").read_bytes() == b"x"


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one entry per level"):
        TextDiffusionModule(**{**TINY_TEXT, "down_block_types": ["DownBlock2D"]})
    with pytest.raises(ValueError, match="no CrossAttn block"):
        TextDiffusionModule(**{**TINY_TEXT, "down_block_types": ["DownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="caption_dropout"):
        TextDiffusionModule(**{**TINY_TEXT, "caption_dropout": 1.5})
    with pytest.raises(ValueError, match="cache_latents needs a pretrained"):
        TextDiffusionModule(**{**TINY_TEXT, "cache_latents": True})
    with pytest.raises(UserError, match="no such folder"):
        TextDiffusionModule(**{**TINY_TEXT, "text_encoder": str(tmp_path / "absent")})
    module = TextDiffusionModule(**TINY_TEXT)
    with pytest.raises(RuntimeError, match="prepare_text_encoder"):
        module.pipeline()
    module.prepare_text_encoder(["red"])
    with pytest.raises(ValueError, match=r"\(32, 32\) px images; the UNet was built for image_size 16"):
        module.diffusion_loss(batch_of([0, 1], size=32), 0)


def test_a_datamodule_without_caption_words_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no caption_words"):
        fit(TextDiffusionModule(**TINY_TEXT), ProceduralTrainData(num_images=2, resolution=16, batch_size=2), tmp_path, 1)
