"""TextDiffusionModule fine-tuning a local Stable Diffusion folder (a tiny random one): latents against
diffusers' own posterior sampling, cached latents, frozen VAE and text encoder (left out of checkpoints,
checked on load), v-prediction, export, and one-line errors for a missing or broken folder; text encoders
from a pipeline-layout folder and from a CLIP model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPConfig, CLIPModel

from lit.errors import UserError
from lit.text_conditioning import generators, sample_seeds
from models.text_diffusion import TextDiffusionModule
from models.text_pipeline import load_text_pipeline
from models.tiny_text2image import train_clip_tokenizer, write_tiny_pixel_pipeline, write_tiny_sd_pipeline
from tests.text_standins import TINY_TEXT, caption_of, scenes

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd", image_size=32, seed=3)


def batch_of(rows: list[int]) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(7)
    return {"image": torch.rand(len(rows), 3, 32, 32, generator=generator), "caption": [caption_of(r) for r in rows],
            "key": [f"scene{r:03d}" for r in rows], "index": torch.tensor(rows)}


class Keys(pl.Callback):
    """The keys of every training batch."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self.seen += list(batch["key"])


def fit(module: TextDiffusionModule, tmp_path: Path, steps: int, keys: Keys | None = None,
        precision: str = "32-true") -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    run = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False, precision=precision,
                     enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
                     callbacks=[keys] if keys is not None else [])
    run.fit(module, datamodule=scenes(4, resolution=32))
    return run


def test_latents_are_diffusers_posterior_samples_scaled(sd_folder: Path) -> None:
    module = TextDiffusionModule(pretrained=str(sd_folder))
    batch = batch_of([0, 1, 2])
    seeds = sample_seeds(0, 0, [0, 1, 2])
    vae = load_text_pipeline(sd_folder).vae
    with torch.no_grad():
        posterior = vae.encode(batch["image"] * 2 - 1).latent_dist
        expected = posterior.sample(generator=generators(seeds, "latent")) * vae.config.scaling_factor
    assert vae.config.scaling_factor == module.vae.config.scaling_factor
    latents = module.clean_samples(batch["image"], batch["key"], seeds)
    assert latents.shape == (3, 4, 16, 16) and torch.allclose(latents, expected, atol=1e-5)
    cached = TextDiffusionModule(pretrained=str(sd_folder), cache_latents=True)
    first = cached.clean_samples(batch["image"], batch["key"], seeds)
    assert sorted(cached._latent_cache) == batch["key"]
    assert torch.allclose(first, expected, atol=1e-5)  # each image encoded alone: equal to rounding
    again = cached.clean_samples(batch["image"][[2, 0]], [batch["key"][2], batch["key"][0]], [seeds[2], seeds[0]])
    assert torch.equal(again, first[[2, 0]])  # from the cache, the same draws
    flipped = batch["image"].flip(-1)
    with pytest.raises(UserError, match="image of key 'scene001' changed between draws"):
        cached.clean_samples(flipped[1:2], ["scene001"], seeds[1:2])
    with pytest.raises(ValueError, match="needs batches with 'key'"):
        cached.clean_samples(batch["image"], None, seeds)


@pytest.mark.parametrize("cache", [False, True])
def test_fine_tune_trains_the_unet_only(sd_folder: Path, tmp_path: Path, cache: bool) -> None:
    module = TextDiffusionModule(pretrained=str(sd_folder), cache_latents=cache, warmup_steps=0, learning_rate=1e-3)
    original = load_text_pipeline(sd_folder)
    keys = Keys()
    run = fit(module, tmp_path, steps=2, keys=keys)
    assert run.global_step == 2 and len(keys.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(module.vae.state_dict().values(), original.vae.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(module.text_encoder.state_dict().values(),
                                                  original.text_encoder.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(module.unet.state_dict().values(), original.unet.state_dict().values()))
    assert sorted(module._latent_cache) == (sorted(set(keys.seen)) if cache else [])  # one entry per image drawn
    assert all(not p.requires_grad for p in [*module.vae.parameters(), *module.text_encoder.parameters()])
    path = tmp_path / "model.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in checkpoint["state_dict"])  # read from the folder
    restored = TextDiffusionModule.load_from_checkpoint(path)
    for name in ("unet", "ema_unet", "vae", "text_encoder"):
        ours, theirs = getattr(module, name).state_dict(), getattr(restored, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_fine_tuning_with_cached_latents(sd_folder: Path, tmp_path: Path, precision: str) -> None:
    module = TextDiffusionModule(pretrained=str(sd_folder), cache_latents=True, warmup_steps=0, learning_rate=1e-3)
    before = [p.detach().clone() for p in module.unet.parameters()]
    run = fit(module, tmp_path, steps=2, precision=precision)
    assert torch.isfinite(run.callback_metrics["train/loss"])
    weights = list(module.unet.parameters())
    assert weights[0].dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert any(not torch.equal(a.to(b.dtype), b) for a, b in zip(before, weights))
    images = module.sample([caption_of(0)], [1], steps=2)
    assert images.dtype == torch.float32 and bool(torch.isfinite(images).all())


def test_a_changed_folder_is_refused_on_load(sd_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    module = TextDiffusionModule(pretrained=str(folder))
    run = fit(module, tmp_path, steps=1)
    run.save_checkpoint(tmp_path / "model.ckpt")
    other = write_tiny_sd_pipeline(tmp_path / "other", image_size=32, seed=4)
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(other / "text_encoder", folder / "text_encoder")
    with pytest.raises(UserError, match="the text_encoder in .* is not the one this checkpoint was trained with"):
        TextDiffusionModule.load_from_checkpoint(tmp_path / "model.ckpt")


def test_v_prediction_and_image_size_come_from_the_folder(sd_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sd_v"
    shutil.copytree(sd_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    module = TextDiffusionModule(pretrained=str(folder), caption_dropout=0.0)
    assert module.noise_scheduler.config.prediction_type == "v_prediction" and module.image_size == 32
    record: dict[str, torch.Tensor] = {}
    module.unet.register_forward_hook(lambda m, args, out: record.update(prediction=out[0]))
    batch = batch_of([0, 1])
    loss = module.diffusion_loss(batch, 0)
    seeds = sample_seeds(0, 0, [0, 1])
    clean = module.clean_samples(batch["image"], batch["key"], seeds)
    noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in generators(seeds, "noise")])
    steps = torch.tensor([int(torch.randint(0, 1000, (1,), generator=g)) for g in generators(seeds, "timestep")])
    alpha = module.noise_scheduler.alphas_cumprod[steps].sqrt()[:, None, None, None]
    sigma = (1 - module.noise_scheduler.alphas_cumprod[steps]).sqrt()[:, None, None, None]
    velocity = alpha * noise - sigma * clean  # Salimans & Ho: v = alpha_t eps - sigma_t x_0
    assert float(loss) == pytest.approx(float(((record["prediction"] - velocity) ** 2).mean()), rel=1e-5)
    assert TextDiffusionModule(pretrained=str(folder), image_size=48).pipeline().unet.config.sample_size == 24
    with pytest.raises(ValueError, match="divide by the VAE's factor 2"):
        TextDiffusionModule(pretrained=str(folder), image_size=33)


def test_fine_tuned_export_is_a_stable_diffusion_folder(sd_folder: Path, tmp_path: Path) -> None:
    module = TextDiffusionModule(pretrained=str(sd_folder), ema_decay=0.5, warmup_steps=0, learning_rate=1e-3)
    fit(module, tmp_path, steps=2)
    folder = module.export_pipeline(tmp_path / "pipe")
    loaded = load_text_pipeline(folder)
    assert isinstance(loaded, StableDiffusionPipeline) and isinstance(module.pipeline(), StableDiffusionPipeline)
    assert type(loaded.scheduler) is type(load_text_pipeline(sd_folder).scheduler)  # the folder's own sampler
    kwargs = dict(prompt=[caption_of(0), caption_of(1)], num_inference_steps=3, guidance_scale=4.0, output_type="pt")
    ours = module.pipeline()(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    theirs = loaded(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    assert ours.shape == (2, 3, 32, 32) and torch.allclose(ours, theirs, atol=1e-5)


def test_missing_or_broken_pretrained_folder_is_one_line(sd_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pretrained: .*absent: no such pipeline folder") as missing:
        TextDiffusionModule(pretrained=str(tmp_path / "absent"))
    assert "\n" not in str(missing.value)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(sd_folder, incomplete)
    shutil.rmtree(incomplete / "unet")
    with pytest.raises(UserError, match="lacks unet"):
        TextDiffusionModule(pretrained=str(incomplete))
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    (weights,) = (broken / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="pretrained: .*broken") as damaged:
        TextDiffusionModule(pretrained=str(broken))
    assert "\n" not in str(damaged.value)


def _clip_model_folder(folder: Path, width: int) -> Path:
    tokenizer = train_clip_tokenizer(["castle"], max_length=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_text_encoder_from_a_folder(tmp_path: Path) -> None:
    pixel = write_tiny_pixel_pipeline(tmp_path / "pixel", image_size=16, seed=1)  # text_encoder/ and tokenizer/, 32 wide
    module = TextDiffusionModule(**{**TINY_TEXT, "text_encoder": str(pixel)})
    reference = load_text_pipeline(pixel)
    assert torch.allclose(module.encode(["a red circle"]), reference.encode_text(["a red circle"], torch.device("cpu")))
    clip = _clip_model_folder(tmp_path / "clip", width=32)
    from_clip = TextDiffusionModule(**{**TINY_TEXT, "text_encoder": str(clip)})
    full = CLIPModel.from_pretrained(clip)
    ids = from_clip.tokenizer(["a castle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert torch.allclose(from_clip.encode(["a castle"]), full.text_model(ids)[0])
    with pytest.raises(ValueError, match="set cross_attention_dim: 32"):
        TextDiffusionModule(**{**TINY_TEXT, "cross_attention_dim": 64, "text_encoder": str(clip)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        TextDiffusionModule(**{**TINY_TEXT, "text_encoder": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="not both"):
        TextDiffusionModule(**{**TINY_TEXT, "text_encoder": str(clip), "pretrained": str(pixel)})
