"""Text-to-image pipelines the suite generates from: Stable Diffusion 1.x / 2.x folders, and the
pixel-space text-conditioned models the suite trains itself.

- :class:`PixelTextToImagePipeline`: a diffusers ``DiffusionPipeline`` (unet, text_encoder,
  tokenizer, scheduler; no VAE) for the suite's own pixel-space models. Diffusers has no
  text-conditioned pixel-space pipeline; this one follows ``StableDiffusionPipeline`` step for
  step (prompt encoding, noise from ``randn_tensor`` with per-image generators, the guidance batch
  ``[unconditional, conditional]``, ``callback_on_step_end``, ``interrupt``, the same output
  types) so that ``lit generate`` and the memorization score treat both kinds alike.
- :func:`load_text_pipeline`: reads a local pipeline folder (never the hub), checks that it is one
  of these two kinds and has every component, and ends a mistake in one line naming what is
  missing. Stable Diffusion folders load without their safety checker: an audit needs the
  images the model makes, not blacked-out ones.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from lit.errors import UserError

#: ``_class_name`` values of ``model_index.json`` that load as Stable Diffusion (1.x and 2.x share the class).
STABLE_DIFFUSION_CLASSES = ("StableDiffusionPipeline",)
PIXEL_PIPELINE_CLASS = "PixelTextToImagePipeline"
#: Components each kind needs, as folders of the pipeline folder.
REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    PIXEL_PIPELINE_CLASS: ("unet", "text_encoder", "tokenizer", "scheduler"),
}


class PixelTextToImagePipeline(DiffusionPipeline):
    """Text-to-image sampling in pixel space: the UNet denoises images in [-1, 1] directly.

    Keywords and behaviour as ``StableDiffusionPipeline.__call__`` (the subset without adapters):
    classifier-free guidance when ``guidance_scale > 1``, per-image generators, ``output_type``
    ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the undecoded sample, here the image in [-1, 1])."""

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler: KarrasDiffusionSchedulers) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        self._guidance_scale = 1.0
        self._interrupt = False

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def encode_text(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """Text-encoder hidden states of ``texts``, padded and truncated to the tokenizer's length (as SD does)."""
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``; see ``StableDiffusionPipeline.__call__`` for the keywords."""
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")
        height = height or self.unet.config.sample_size
        width = width or self.unet.config.sample_size
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device

        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode_text(prompts, device)
        batch_size = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if self.do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negatives = [""] * batch_size if negative_prompt is None else (
                    [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt))
                negative_prompt_embeds = self.encode_text(negatives, device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (batch_size * num_images_per_prompt, self.unet.config.in_channels, int(height), int(width))
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} images")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    state = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
                    outputs = callback_on_step_end(self, i, t, {name: state[name] for name in tensor_inputs}) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()

        image = latents if output_type == "latent" else self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None, eta: float) -> dict[str, Any]:
        """``eta`` and ``generator`` for schedulers whose ``step`` takes them (DDIM, DDPM), as SD passes them."""
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers' and transformers' log lines and progress bars for the block (loading bars,
    the advice to install ``accelerate``, the per-call truncation warning: nothing a user of
    ``lit generate`` or ``lit fit`` acts on; truncation is counted and reported by the suite instead)."""
    saved = [(library, library.get_verbosity(), library.is_progress_bar_enabled())
             for library in (diffusers_logging, transformers_logging)]
    for library, _, _ in saved:
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, level, bars in saved:
            library.set_verbosity(level)
            if bars:
                library.enable_progress_bar()


def pipeline_class_name(folder: Path) -> str:
    """``_class_name`` of a pipeline folder's ``model_index.json``; one-line errors for a folder that is not one."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such pipeline folder (expected a local diffusers pipeline folder with model_index.json)")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        index = json.loads(index_file.read_text())
        name = str(index["_class_name"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{index_file} is not a diffusers model_index.json ({error})") from error
    if name not in REQUIRED_COMPONENTS:
        kinds = ", ".join(REQUIRED_COMPONENTS)
        raise UserError(f"{folder}: a {name} folder; lit generates from text-to-image pipelines of the kinds {kinds}")
    return name


def missing_components(folder: Path, class_name: str) -> list[str]:
    """Components of ``class_name`` whose folder (with a config or tokenizer file) is absent from ``folder``."""
    missing = []
    for component in REQUIRED_COMPONENTS[class_name]:
        part = folder / component
        if not part.is_dir() or not any(part.glob("*.json")):
            missing.append(component)
    return missing


def load_text_pipeline(folder: str | Path, *, torch_dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """The pipeline in ``folder``, from local files only: Stable Diffusion 1.x / 2.x (without the
    safety checker) or the suite's :class:`PixelTextToImagePipeline`."""
    folder = Path(folder).expanduser().resolve()
    class_name = pipeline_class_name(folder)
    missing = missing_components(folder, class_name)
    if missing:
        raise UserError(f"{folder}: the {class_name} folder lacks {', '.join(missing)} (each a sub-folder with its config)")
    try:
        if class_name in STABLE_DIFFUSION_CLASSES:
            return StableDiffusionPipeline.from_pretrained(
                folder, local_files_only=True, torch_dtype=torch_dtype,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        return PixelTextToImagePipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise UserError(f"{folder}: could not load the {class_name} ({str(error).splitlines()[0]})") from error
