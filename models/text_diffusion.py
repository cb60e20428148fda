"""``lit fit`` for a text-conditioned diffusion model: fine-tune Stable Diffusion, or train a small one.

:class:`TextDiffusionModule` trains a diffusers ``UNet2DConditionModel`` to predict the noise a
``DDPMScheduler`` added (MSE), conditioned on the frozen text encoder's hidden states of each
sample's caption, with AdamW + linear warmup and an exponential moving average of the weights.

Two modes:

- **fine-tune** (``pretrained``: a local Stable Diffusion 1.x / 2.x folder): the UNet trains, the
  VAE and the text encoder stay frozen; images become latents ``(z - shift) * scaling_factor`` of the
  VAE's posterior; the noise schedule and prediction type (epsilon or v) are the folder's.
  ``cache_latents`` keeps each image's VAE posterior (mean and log-variance, encoded alone so
  it depends on the image only) by its ``key``; every draw still samples its latent from the
  posterior with the draw's own seed, so the cache changes the speed, not the training data.
  It needs a datamodule that gives a key the same pixels at every draw (no random crop or flip);
  a key whose pixels change is refused in one line. A suite pixel-space pipeline folder fine-tunes too.
- **from scratch** (no ``pretrained``): a pixel-space UNet (no VAE) of the typed sizes below, with
  a text encoder from a local folder (``text_encoder``) or built offline by the suite from the
  training captions' words: at ``setup`` the module calls the datamodule's ``caption_words()``
  (every word of the training captions, after the caption-side mitigations), trains a CLIP BPE
  tokenizer on them and draws a small random CLIP text encoder (``text_encoder_seed``); both are
  saved in the checkpoint.

Conditioning at training: each caption is replaced by ``""`` with probability ``caption_dropout``
(so classifier-free guidance and the memorization score work); the kept captions' embeddings get
the mitigations of Somepalli et al. (NeurIPS 2023, ``somepago/DCR``): Gaussian noise
``embedding_noise * N(0, 1)``, then mixup with a partner's embedding, weight ``w ~ Beta(embedding_mixup, 1)``
(one per batch, partners a random permutation of the batch). Dropped captions get the exact
embedding of ``""``, the one sampling uses for the unconditional branch. Under DDP the mixup
partners are drawn from the global batch (all ranks' embeddings, gathered; the text encoder is frozen).

Randomness: every draw of a sample (timestep, noise, latent, caption dropout, embedding noise) comes
from its own CPU generator seeded by the run seed (kept in the checkpoint), the batch's index in the
fit and the sample's ``index`` (:mod:`lit.text_conditioning`); the mixup weight and partners from the
run seed and the batch index. So a resumed fit trains exactly what the uninterrupted one trained, and 2
DDP processes with batch B train what 1 process with batch 2B trains (to float rounding).

Batches: ``{"image": float (B, 3, H, W) in [0, 1], "caption": list[str], "index": LongTensor}``;
``"key": list[str]`` too with ``cache_latents``; other entries (``duplicated``) are ignored.

Sampling for monitors and export: :meth:`TextDiffusionModule.pipeline` is a diffusers pipeline
(``PixelTextToImagePipeline`` or ``StableDiffusionPipeline``) over the module's own modules, the EMA
UNet by default (no copy); :meth:`TextDiffusionModule.sample` draws images for (caption, seed) pairs;
:meth:`TextDiffusionModule.export_pipeline` writes a folder that ``load_text_pipeline`` and ``lit generate``
read (``lit export`` does it from a checkpoint; ``export_on_fit_end`` at the end of ``lit fit``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

import lit
from lit.errors import UserError
from lit.resume import close_finished_epoch, run_seed
from lit.seeding import derive_seed
from lit.text_conditioning import (
    add_embedding_noise,
    dropped_captions,
    generator,
    generators,
    mix_embeddings,
    mixup_partners,
    mixup_weight,
    per_sample_normal,
    per_sample_timesteps,
    sample_seeds,
)
from models.diffusion_training import (
    BetaSchedule,
    LrSchedule,
    adamw_with_warmup,
    as_seed,
    check_positive,
    check_unet_layout,
    fit_batch_position,
    make_ema,
    training_target,
)
from models.pipeline_folder import write_pipeline_folder
from models.text_components import (
    build_text_encoder,
    encode_captions,
    fingerprint,
    load_pretrained_pipeline,
    load_text_encoder_folder,
    same_fingerprint,
    suite_text_encoder,
    tokenizer_files,
    tokenizer_from_files,
)
from models.text_pipeline import PixelTextToImagePipeline

#: Entries of the checkpoint this module adds beside Lightning's.
CKPT_EMA, CKPT_RUN_SEED, CKPT_TOKENIZER, CKPT_FINGERPRINTS = "ema", "text_diffusion_run_seed", "text_tokenizer", "frozen_fingerprints"
#: Pixels compared to tell whether a cached key still shows the same image (every PROBE_STRIDE-th value).
PROBE_STRIDE = 97
DEFAULT_IMAGE_SIZE = 32


class TextDiffusionModule(pl.LightningModule):
    """Text-conditioned diffusion training (see the module docstring for the two modes).

    Args:
        pretrained: local Stable Diffusion 1.x / 2.x pipeline folder to fine-tune (or a suite pixel-space
            pipeline folder); the architecture and noise-schedule arguments are then the folder's.
        text_encoder: from scratch: a folder with ``text_encoder/`` and ``tokenizer/`` or a CLIP model
            folder; None builds a small one from the datamodule's ``caption_words()``.
        image_size: side of the training images. From scratch: the UNet's sample size (default 32).
            Fine-tuning: the pipeline's default generation size (default: the folder's).
        in_channels: image channels (3 for RGB), from scratch.
        block_out_channels: channels of each UNet level, from scratch.
        layers_per_block: ResNet layers per level.
        down_block_types: diffusers blocks per level (``CrossAttnDownBlock2D`` attends to the text).
        up_block_types: the matching up blocks, in reverse order.
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups; must divide every ``block_out_channels`` entry.
        cross_attention_dim: width of the text embeddings: the suite's text encoder is built this wide,
            a ``text_encoder`` folder must match it.
        text_layers: transformer layers of the suite's text encoder.
        max_caption_tokens: context length of the suite's tokenizer (start and end tokens included).
        tokenizer_vocab_size: BPE vocabulary size of the suite's tokenizer.
        text_encoder_seed: seed of the suite's random text encoder.
        caption_dropout: probability that a sample trains with the empty caption.
        embedding_noise: lambda of the Gaussian noise added to the caption embeddings (0: off).
        embedding_mixup: alpha of the mixup weight ``Beta(alpha, 1)`` of a sample's own embedding
            (0: off; larger alpha mixes less: the mean weight is ``alpha / (alpha + 1)``).
        cache_latents: fine-tuning: keep each image's VAE posterior by key (see the module docstring).
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory, slower).
        learning_rate: peak AdamW learning rate.
        warmup_steps: optimizer steps of linear warmup.
        lr_schedule: after warmup, ``constant`` or ``cosine`` decay to 0.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        ema_decay: maximum EMA decay.
        ema_power: EMA warmup power: decay ``1 - (1 + n) ** -ema_power`` at update n, capped at ``ema_decay``.
        num_train_timesteps: diffusion steps, from scratch.
        beta_schedule: diffusers beta schedule, from scratch.
        beta_start: first beta, from scratch.
        beta_end: last beta, from scratch.
        sample_steps: denoising steps of :meth:`sample` when none are given.
        guidance_scale: classifier-free guidance of :meth:`sample` when none is given.
        sample_batch_size: images denoised together by :meth:`sample` (memory only; images do not depend on it).
        export_on_fit_end: folder to write the pipeline (EMA weights) to at the end of ``lit fit``;
            relative to the run's log folder (e.g. ``pipeline``); None writes nothing.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        text_encoder: str | None = None,
        image_size: int | None = None,
        in_channels: int = 3,
        block_out_channels: list[int] = [32, 64, 64],  # noqa: B006 - LightningCLI shows list defaults
        layers_per_block: int = 1,
        down_block_types: list[str] = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],  # noqa: B006
        up_block_types: list[str] = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],  # noqa: B006
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        cross_attention_dim: int = 64,
        text_layers: int = 2,
        max_caption_tokens: int = 24,
        tokenizer_vocab_size: int = 1000,
        text_encoder_seed: int = 0,
        caption_dropout: float = 0.1,
        embedding_noise: float = 0.0,
        embedding_mixup: float = 0.0,
        cache_latents: bool = False,
        gradient_checkpointing: bool = False,
        learning_rate: float = 1e-4,
        warmup_steps: int = 500,
        lr_schedule: LrSchedule = "constant",
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        ema_decay: float = 0.9999,
        ema_power: float = 0.75,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        sample_steps: int = 50,
        guidance_scale: float = 7.5,
        sample_batch_size: int = 16,
        export_on_fit_end: str | None = None,
    ) -> None:
        super().__init__()
        check_positive(layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
                       text_layers=text_layers, max_caption_tokens=max_caption_tokens,
                       num_train_timesteps=num_train_timesteps, sample_steps=sample_steps,
                       sample_batch_size=sample_batch_size)
        if image_size is not None:
            check_positive(image_size=image_size)
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if embedding_noise < 0 or embedding_mixup < 0:
            raise ValueError(f"embedding_noise and embedding_mixup must be >= 0, got {embedding_noise}, {embedding_mixup}")
        if learning_rate <= 0 or warmup_steps < 0:
            raise ValueError(f"learning_rate must be > 0 and warmup_steps >= 0, got {learning_rate}, {warmup_steps}")
        if pretrained is not None and text_encoder is not None:
            raise ValueError("give pretrained (its own text encoder) or text_encoder, not both")
        if cache_latents and pretrained is None:
            raise ValueError("cache_latents needs a pretrained latent model (pretrained: a Stable Diffusion folder)")
        self.save_hyperparameters()
        self.vae: torch.nn.Module | None = None
        self.text_encoder: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._folder_parts: tuple[str, ...] = ()  # frozen parts read from folders: not saved in checkpoints
        self._sampler: Any = None  # the pretrained pipeline's scheduler (fine-tuning)
        if pretrained is not None:
            self._load_pretrained(pretrained, image_size)
        else:
            self.unet = build_conditional_unet(
                image_size or DEFAULT_IMAGE_SIZE, in_channels, block_out_channels, layers_per_block,
                down_block_types, up_block_types, attention_head_dim, norm_num_groups, cross_attention_dim)
            self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                                 beta_start=beta_start, beta_end=beta_end, prediction_type="epsilon")
            if text_encoder is not None:
                encoder, tokenizer = load_text_encoder_folder(text_encoder)
                width = encoder.config.hidden_size
                if width != cross_attention_dim:
                    raise ValueError(f"text_encoder {text_encoder} is {width} wide; set cross_attention_dim: {width}")
                self._set_text_encoder(encoder, tokenizer)
                self._folder_parts = ("text_encoder",)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train().requires_grad_(True)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        # diffusers' EMAModel does the averaging; its shadow weights are the parameters of ema_unet,
        # so the checkpoint, device moves and pipelines handle them like any module
        self.ema = make_ema([], decay=ema_decay, power=ema_power)
        self._run_seed: int | None = None
        self._latent_cache: dict[str, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ building
    def _load_pretrained(self, folder: str, image_size: int | None) -> None:
        pipeline = load_pretrained_pipeline(folder)
        self.unet = pipeline.unet
        vae = getattr(pipeline, "vae", None)
        if vae is not None:
            self.vae = vae.requires_grad_(False).eval()
        self._set_text_encoder(pipeline.text_encoder, pipeline.tokenizer)
        self._folder_parts = ("vae", "text_encoder") if vae is not None else ("text_encoder",)
        self._sampler = pipeline.scheduler
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        if image_size is not None:
            scale = self.vae_scale_factor
            if image_size % scale:
                raise ValueError(f"image_size {image_size} must divide by the VAE's factor {scale}")
            self.unet.register_to_config(sample_size=image_size // scale)
        rank_zero_info(f"fine-tuning {folder}: {type(pipeline).__name__}, "
                       f"{self.noise_scheduler.config.prediction_type} prediction, {self.image_size} px")

    def _set_text_encoder(self, encoder: torch.nn.Module, tokenizer: Any) -> None:
        self.text_encoder = encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (1 without a VAE)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the images the UNet is trained for (and generates by default)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def prepare_text_encoder(self, words: Iterable[str]) -> None:
        """Build the suite's text encoder from the training captions' words (from scratch without ``text_encoder``)."""
        hp = self.hparams
        encoder, tokenizer = build_text_encoder(words, width=hp.cross_attention_dim, layers=hp.text_layers,
                                                max_tokens=hp.max_caption_tokens, vocab_size=hp.tokenizer_vocab_size,
                                                seed=hp.text_encoder_seed)
        self._set_text_encoder(encoder.to(self.device), tokenizer)

    @property
    def builds_text_encoder(self) -> bool:
        """Whether the text encoder is the suite's own (built from caption words, kept in checkpoints)."""
        return self.hparams.pretrained is None and self.hparams.text_encoder is None

    def setup(self, stage: str) -> None:
        """From scratch without ``text_encoder``: build it from the datamodule's ``caption_words()``."""
        if self.text_encoder is not None or not self.builds_text_encoder:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        words = getattr(datamodule, "caption_words", None)
        if not callable(words):
            raise UserError(f"{type(self).__name__} with text_encoder null builds its text encoder from the training "
                            f"captions, but the datamodule {type(datamodule).__name__} has no caption_words(); "
                            "use a captioned datamodule or give text_encoder: a local folder")
        self.prepare_text_encoder(words())

    def train(self, mode: bool = True) -> TextDiffusionModule:
        """Train mode for the UNet only: the frozen parts and the EMA UNet stay in eval mode."""
        super().train(mode)
        for part in (self.vae, self.text_encoder, self.ema_unet):
            if part is not None:
                part.eval()
        return self

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """:meth:`diffusion_loss` of the batch at its place in the fit, logged as ``train/loss``."""
        loss = self.diffusion_loss(batch, fit_batch_position(self._trainer, batch_idx))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["caption"]))
        return loss

    def diffusion_loss(self, batch: dict[str, Any], position: int) -> Tensor:
        """MSE between the UNet's prediction and its target, with the draws (timesteps, noise, latents,
        caption dropout, embedding noise and mixup) of the batch at ``position`` in the fit: the same
        ``position`` and batch give the same draws (a fixed-draw evaluation loss)."""
        images = batch["image"]
        captions = [str(c) for c in batch["caption"]]
        seeds = sample_seeds(self._seed(), position, [int(i) for i in batch["index"]])
        if len(captions) != images.shape[0] or len(seeds) != images.shape[0]:
            raise ValueError(f"batch has {images.shape[0]} images, {len(captions)} captions, {len(seeds)} indices")
        clean = self.clean_samples(images, batch.get("key"), seeds)
        noise = per_sample_normal(clean.shape[1:], generators(seeds, "noise")).to(clean.device, clean.dtype)
        steps = per_sample_timesteps(self.noise_scheduler.config.num_train_timesteps,
                                     generators(seeds, "timestep")).to(clean.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, steps)
        conditioning = self.training_conditioning(captions, seeds, position)
        prediction = self.unet(noisy, steps, encoder_hidden_states=conditioning, return_dict=False)[0]
        target = training_target(self.noise_scheduler, clean, noise, steps)
        return F.mse_loss(prediction.float(), target.float())

    def _seed(self) -> int:
        if self._run_seed is None:
            self._run_seed = run_seed()
        return self._run_seed

    @torch.no_grad()
    def clean_samples(self, images: Tensor, keys: Sequence[str] | None, seeds: Sequence[int]) -> Tensor:
        """What the UNet denoises: the images in [-1, 1] (pixel space) or latents sampled from the VAE's
        posterior with each sample's seed, ``(z - shift) * scaling_factor``."""
        if self.vae is None:
            if self.hparams.pretrained is None and tuple(images.shape[-2:]) != (self.image_size,) * 2:
                raise ValueError(f"the datamodule gives {tuple(images.shape[-2:])} px images; the UNet was built for "
                                 f"image_size {self.image_size}")
            return images * 2.0 - 1.0
        pixels = (images * 2.0 - 1.0).to(self.vae.dtype)
        posterior = DiagonalGaussianDistribution(self._posterior_parameters(pixels, keys))
        eps = per_sample_normal(posterior.mean.shape[1:], generators(seeds, "latent"))
        latents = posterior.mean + posterior.std * eps.to(posterior.mean.device, posterior.mean.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def _posterior_parameters(self, pixels: Tensor, keys: Sequence[str] | None) -> Tensor:
        """The VAE posterior's (mean, log-variance) of each image: encoded with the batch, or per image
        from the cache (``cache_latents``; a new key is encoded alone, so its entry depends on its pixels only)."""
        assert self.vae is not None
        if not self.hparams.cache_latents:
            return self.vae.encode(pixels).latent_dist.parameters
        if keys is None:
            raise ValueError("cache_latents needs batches with 'key' (one name per image) to cache latents by")
        probes = pixels.flatten(1)[:, ::PROBE_STRIDE].float().cpu()
        rows = []
        for key, pixel, probe in zip(keys, pixels, probes):
            cached = self._latent_cache.get(str(key))
            if cached is None:
                cached = (self.vae.encode(pixel[None]).latent_dist.parameters[0].cpu(), probe)
                self._latent_cache[str(key)] = cached
            elif not torch.equal(cached[1], probe):
                raise UserError(f"cache_latents: the image of key {key!r} changed between draws (random crop or "
                                "flip in the datamodule?); turn the augmentation off or cache_latents off")
            rows.append(cached[0])
        return torch.stack(rows).to(pixels.device)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> Tensor:
        """The frozen text encoder's hidden states of ``captions`` (as the pipelines encode prompts)."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder is built at the start of lit fit from the datamodule's caption_words(); "
                               "call prepare_text_encoder(words) first")
        return encode_captions(self.tokenizer, self.text_encoder, captions, self.device)

    def training_conditioning(self, captions: Sequence[str], seeds: Sequence[int], position: int) -> Tensor:
        """Encoder hidden states the UNet attends to: caption dropout, then for kept captions the
        embedding noise and mixup (module docstring)."""
        hp = self.hparams
        embeddings = self.encode(captions)
        if hp.embedding_noise > 0:
            embeddings = add_embedding_noise(embeddings, hp.embedding_noise, generators(seeds, "embedding-noise"))
        if hp.embedding_mixup > 0:
            embeddings = self._mixup(embeddings, seeds, position)
        dropped = dropped_captions(hp.caption_dropout, generators(seeds, "caption-dropout"))
        if bool(dropped.any()):
            empty = self.encode([""]).expand_as(embeddings)
            embeddings = torch.where(dropped.to(embeddings.device)[:, None, None], empty, embeddings)
        return embeddings

    def _mixup(self, embeddings: Tensor, seeds: Sequence[int], position: int) -> Tensor:
        """Mix each embedding with a partner's from the global batch (all ranks), in an order that does
        not depend on how the batch is split over ranks (by sample seed)."""
        batch_seed = derive_seed(self._seed(), position)
        weight = mixup_weight(self.hparams.embedding_mixup, generator(batch_seed, "mixup-weight"))
        keys = torch.tensor(list(seeds), dtype=torch.long, device=embeddings.device)
        every, every_key, offset = embeddings, keys, 0
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            every = self.all_gather(embeddings).flatten(0, 1)
            every_key = self.all_gather(keys).flatten()
            offset = trainer.global_rank * embeddings.shape[0]
        order = torch.argsort(every_key, stable=True)
        place = torch.empty_like(order)
        place[order] = torch.arange(order.numel(), device=order.device)
        partners = mixup_partners(order.numel(), generator(batch_seed, "mixup-partners")).to(order.device)
        mine = place[offset:offset + embeddings.shape[0]]
        return mix_embeddings(embeddings, every[order[partners[mine]]], weight)

    def configure_optimizers(self) -> Any:
        """AdamW over the UNet with linear warmup, then constant or cosine."""
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches) if hp.lr_schedule == "cosine" else None
        return adamw_with_warmup(self.unet.parameters(), learning_rate=hp.learning_rate, adam_betas=hp.adam_betas,
                                 weight_decay=hp.weight_decay, warmup_steps=hp.warmup_steps,
                                 lr_schedule=hp.lr_schedule, total_steps=total)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimizer, then the EMA (once per optimizer step)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.shadow_params = list(self.ema_unet.parameters())
        self.ema.step(self.unet.parameters())

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the EMA counters, the run seed and the suite's tokenizer; leave out the frozen parts read
        from folders (their fingerprints go in instead: a resume checks the folder still holds them)."""
        checkpoint[CKPT_EMA] = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        checkpoint[CKPT_RUN_SEED] = self._run_seed
        if self.builds_text_encoder and self.tokenizer is not None:
            checkpoint[CKPT_TOKENIZER] = tokenizer_files(self.tokenizer)
        state = checkpoint["state_dict"]
        for part in self._folder_parts:
            for key in [k for k in state if k.startswith(f"{part}.")]:
                del state[key]
        checkpoint[CKPT_FINGERPRINTS] = {part: fingerprint(getattr(self, part)) for part in self._folder_parts}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the EMA counters, the run seed and the suite's text encoder; put the frozen parts read
        from folders back into the state dict after checking they are the ones the checkpoint trained with."""
        if CKPT_EMA not in checkpoint:
            raise ValueError("checkpoint has no 'ema' entry: it was not written by TextDiffusionModule")
        self.ema.load_state_dict({k: v for k, v in checkpoint[CKPT_EMA].items() if k != "shadow_params"})
        if checkpoint.get(CKPT_RUN_SEED) is not None:
            self._run_seed = int(checkpoint[CKPT_RUN_SEED])
        if CKPT_TOKENIZER in checkpoint:
            tokenizer = tokenizer_from_files(checkpoint[CKPT_TOKENIZER])
            if self.tokenizer is None or tokenizer.get_vocab() != self.tokenizer.get_vocab():
                hp = self.hparams
                encoder = suite_text_encoder(tokenizer, width=hp.cross_attention_dim, layers=hp.text_layers,
                                             seed=hp.text_encoder_seed)
                self._set_text_encoder(encoder.to(self.device), tokenizer)
        saved = checkpoint.get(CKPT_FINGERPRINTS, {})
        state = checkpoint["state_dict"]
        for part in self._folder_parts:
            module = getattr(self, part)
            if part in saved and not same_fingerprint(saved[part], fingerprint(module)):
                source = self.hparams.pretrained or self.hparams.text_encoder
                raise UserError(f"the {part} in {source} is not the one this checkpoint was trained with "
                                "(its weights changed); give the original folder")
            state.update({f"{part}.{k}": v for k, v in module.state_dict().items()})
        close_finished_epoch(checkpoint)

    # ------------------------------------------------------------------ sampling and export
    def pipeline(self, ema: bool = True) -> DiffusionPipeline:
        """A diffusers pipeline over this module's UNet (the EMA one with ``ema``), text encoder, tokenizer
        (and VAE): ``PixelTextToImagePipeline`` from scratch, ``StableDiffusionPipeline`` when fine-tuning
        Stable Diffusion. Modules are shared, not copied: later training steps show in it."""
        if self.text_encoder is None:
            raise RuntimeError("no text encoder yet: it is built at the start of lit fit (or prepare_text_encoder(words))")
        unet = self.ema_unet if ema else self.unet
        scheduler = (type(self._sampler).from_config(self._sampler.config) if self._sampler is not None
                     else DDIMScheduler.from_config(self.noise_scheduler.config))
        if self.vae is not None:
            pipeline: DiffusionPipeline = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            pipeline = PixelTextToImagePipeline(unet=unet, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                                scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @torch.no_grad()
    def sample(self, captions: Sequence[str], seeds: Sequence[int], *, steps: int | None = None,
               guidance_scale: float | None = None, ema: bool = True, batch_size: int | None = None) -> Tensor:
        """One image per (caption, seed): float (N, 3, H, W) in [0, 1] on the CPU. Image ``i`` depends on
        ``captions[i]`` and ``seeds[i]`` only (one CPU generator per image), not on its batch."""
        if len(captions) != len(seeds):
            raise ValueError(f"{len(captions)} captions for {len(seeds)} seeds")
        seeds = [as_seed(s) for s in seeds]
        steps = self.hparams.sample_steps if steps is None else steps
        check_positive(steps=steps)
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        size = batch_size or self.hparams.sample_batch_size
        pipeline = self.pipeline(ema=ema)
        chunks = []
        for start in range(0, len(seeds), size):
            chunk = seeds[start:start + size]
            images = pipeline(prompt=list(captions[start:start + size]), num_inference_steps=steps, guidance_scale=scale,
                              generator=[torch.Generator().manual_seed(s) for s in chunk], output_type="pt").images
            chunks.append(images.float().cpu())
        if not chunks:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.cat(chunks)

    def export_pipeline(self, folder: str | Path, *, ema: bool = True, overwrite: bool = False,
                        provenance: dict[str, Any] | None = None) -> Path:
        """Write :meth:`pipeline` as a pipeline folder (``load_text_pipeline``, ``lit generate``); see
        :func:`models.pipeline_folder.write_pipeline_folder` for what may be overwritten."""
        record = {"module_class": f"{type(self).__module__}.{type(self).__qualname__}", "ema": ema,
                  "global_step": int(self.global_step) if self._trainer is not None else None,
                  "suite_version": lit.__version__, **(provenance or {})}
        return write_pipeline_folder(self.pipeline(ema=ema), folder, overwrite=overwrite, provenance=record)

    def on_fit_end(self) -> None:
        """``export_on_fit_end``: write the pipeline folder (rank 0), relative to the run's log folder."""
        target = self.hparams.export_on_fit_end
        if not target:
            return
        folder = Path(target).expanduser()
        if not folder.is_absolute():
            folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / folder
        if self.trainer.is_global_zero:
            # a folder an earlier export of this run wrote is replaced; anything else is refused
            written = self.export_pipeline(folder, overwrite=True)
            rank_zero_info(f"pipeline written to {written} (load it with lit generate)")
        self.trainer.strategy.barrier()


def build_conditional_unet(image_size: int, in_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                           down_block_types: Sequence[str], up_block_types: Sequence[str], attention_head_dim: int,
                           norm_num_groups: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """A diffusers ``UNet2DConditionModel`` after one-line checks of the block layout."""
    check_unet_layout(image_size, block_out_channels, down_block_types, up_block_types, norm_num_groups, "image_size")
    if not any("CrossAttn" in name for name in down_block_types):
        raise ValueError("no CrossAttn block in down_block_types: the UNet would ignore the captions")
    return UNet2DConditionModel(
        sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim,
    )
