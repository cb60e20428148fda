"""Text-to-image generation as a LightningModule for ``lit generate`` (and ``lit predict``), with
the memorization score of Wen et al. read from the guidance batch the pipeline computes anyway.

- :class:`TextToImageGenerator`: loads a local pipeline folder (:func:`models.text_pipeline.load_text_pipeline`:
  Stable Diffusion 1.x / 2.x or the suite's pixel-space models), optionally swaps the scheduler
  (:func:`build_scheduler`), and in ``predict_step`` generates one batch of jobs through the
  pipeline's own ``__call__`` with one ``torch.Generator("cpu").manual_seed(seed)`` per image, so
  every image equals ``pipeline(prompt, generator=torch.Generator("cpu").manual_seed(seed), ...)``
  (to float tolerance when the batch holds more than one image: a batch is one computation);
- :class:`MemorizationScorer`: a forward hook on the pipeline's UNet that records
  ``d_t = || eps(x_t, c) - eps(x_t, empty) ||_2`` (:mod:`lit.memorization`) at every UNet call of a
  pipeline call. With classifier-free guidance (``guidance > 1``, no negative prompt) both halves
  are in the batch the pipeline already computes: no extra UNet pass. Otherwise the hook adds one
  unconditional pass with the empty prompt's embedding (:data:`EXTRA_PASS`, said in the manifest);
- ``score_only``: the pipeline stops after ``score_steps`` UNet calls (``callback_on_step_end``
  sets the pipeline's interrupt flag) and returns latents: no image is finished or decoded;
- inference-time mitigations of copying (Somepalli et al., NeurIPS 2023, ``diff_inference.py`` of
  somepago/DCR): ``random_words`` vocabulary words inserted into each prompt at random places
  (:func:`lit.captions.add_random_words`, drawn from ``derive_seed(seed, "random_words")``; the
  vocabulary: :func:`lit.captions.tokenizer_words` of the pipeline's tokenizer), and Gaussian noise
  of std ``embedding_noise`` added to each image's conditional prompt embeddings
  (:func:`lit.text_conditioning.add_embedding_noise`, generator ``derive_seed(seed, "embedding_noise")``):
  the prompts are encoded with the pipeline's own encoder and passed as ``prompt_embeds``; the
  unconditional (negative) side is encoded by the pipeline as usual and gets no noise. Both draws
  come from the image's recorded seed, so an image stays a function of (prompt, seed, arguments)
  whatever the batch, the process or a resume. The memorization score reads the conditioning
  actually used (the noisy embedding of the prompt with its added words).

Precision: float32 on the CPU; on CUDA ``auto`` is bfloat16 where supported (else float16), or
``32`` / ``bf16`` / ``16`` as asked. 16-bit precisions on the CPU are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch import Tensor, nn

from lit.captions import END_OF_WORD, add_random_words, tokenizer_words
from lit.errors import UserError
from lit.files import file_sha256
from lit.memorization import ScoreTrace, guidance_halves
from lit.seeding import SeededDraws, derive_seed
from lit.text_conditioning import add_embedding_noise, generators
from models.text_pipeline import PixelTextToImagePipeline, load_text_pipeline, quiet_libraries

SchedulerChoice = Literal["folder", "ddim", "dpm"]
"""``folder``: the pipeline folder's own scheduler; ``ddim``: DDIM; ``dpm``: DPM-Solver multistep
(both built from the folder scheduler's config: same noise schedule)."""
SCHEDULERS: dict[str, type | None] = {"folder": None, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
GenerationPrecision = Literal["auto", "32", "bf16", "16"]
PRECISIONS: tuple[str, ...] = ("auto", "32", "bf16", "16")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

GUIDANCE_BATCH = "guidance batch"
"""Score mode: both noise predictions come from the pipeline's own classifier-free-guidance batch."""
RANDOM_WORDS = "random_words"
"""Purpose of the draw of an image's added words: ``SeededDraws(derive_seed(seed, RANDOM_WORDS))``."""
EMBEDDING_NOISE = "embedding_noise"
"""Purpose of the draw of an image's embedding noise: ``lit.text_conditioning.generator(seed, EMBEDDING_NOISE)``."""
VOCABULARY_RULE = (f"the word-final tokens of the pipeline's tokenizer: tokens ending in {END_OF_WORD} whose stem is "
                   "ASCII letters only, the suffix removed, sorted")
EXTRA_PASS = "extra unconditional pass"
"""Score mode: no guidance batch (guidance <= 1) or its unconditional half is a negative prompt: one
more UNet pass with the empty prompt per step gives eps(x_t, empty)."""


def build_scheduler(pipeline: DiffusionPipeline, choice: str) -> Any:
    """The scheduler ``choice`` names (:data:`SchedulerChoice`), from the folder scheduler's config."""
    if choice not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {choice!r}")
    kind = SCHEDULERS[choice]
    return pipeline.scheduler if kind is None else kind.from_config(pipeline.scheduler.config)


def generation_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype the pipeline runs in for ``precision`` on ``device``: float32 on the CPU; on CUDA
    ``auto`` is bfloat16 where supported, else float16. A 16-bit precision on the CPU is refused."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = torch.device(device).type == "cuda"
    if precision == "32":
        return torch.float32
    if not cuda:
        if precision == "auto":
            return torch.float32
        raise UserError(f"--precision {precision} runs on a GPU only; on the CPU lit generate runs in float32 "
                        "(--precision 32 or auto)")
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def pipeline_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a pipeline folder (``model_index.json``, configs, tokenizer, weights),
    by path relative to the folder (hidden files and folders left out)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def size_multiple(pipeline: DiffusionPipeline) -> int:
    """What image sides must divide by: 8 for Stable Diffusion (its ``check_inputs``), the UNet's
    down-sampling factor for pixel-space pipelines."""
    if isinstance(pipeline, PixelTextToImagePipeline):
        return 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    return 8


def default_size(pipeline: DiffusionPipeline) -> int:
    """The side the pipeline generates when none is given (the UNet's sample size in pixels)."""
    scale = 1 if isinstance(pipeline, PixelTextToImagePipeline) else getattr(pipeline, "vae_scale_factor", 8)
    return int(pipeline.unet.config.sample_size) * scale


def empty_prompt_embedding(pipeline: DiffusionPipeline) -> Tensor:
    """The text encoder's states for the empty prompt, ``(1, L, D)``, as Stable Diffusion encodes its
    unconditional prompt (padded to the tokenizer's length, the attention mask where the encoder uses one)."""
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0].to(pipeline.unet.dtype)


class NonFinitePrediction(RuntimeError):
    """A noise prediction held NaN or inf (``image``: position in the batch, ``step``: 0-based UNet
    call), or the decoded image did (``step`` None)."""

    def __init__(self, image: int, step: int | None) -> None:
        where = "the decoded image" if step is None else f"the noise prediction at step {step + 1}"
        super().__init__(f"{where} of image {image} is not finite")
        self.image, self.step = image, step


class MemorizationScorer:
    """The memorization score of every image of a pipeline call, read by a forward hook on its UNet.

    Args:
        unet: the pipeline's UNet.
        empty: returns the empty prompt's embedding ``(1, L, D)`` (needed by :data:`EXTRA_PASS` only).
        mode: :data:`GUIDANCE_BATCH` (read both halves of the pipeline's ``[unconditional, conditional]``
            batch) or :data:`EXTRA_PASS` (run the UNet once more on the conditional half's input with
            the empty prompt; the hook does not see its own pass).
    """

    def __init__(self, unet: nn.Module, empty: Callable[[], Tensor], mode: str = GUIDANCE_BATCH) -> None:
        if mode not in (GUIDANCE_BATCH, EXTRA_PASS):
            raise ValueError(f"unknown score mode {mode!r}")
        self.unet, self.empty, self.mode = unet, empty, mode
        self.trace = ScoreTrace()
        self._images = 0
        self._inside = False

    @contextmanager
    def recording(self, images: int) -> Iterator[ScoreTrace]:
        """Hook the UNet for one pipeline call over ``images`` images; yields the (new) trace."""
        self.trace, self._images = ScoreTrace(), images
        handle = self.unet.register_forward_hook(self._hook, with_kwargs=True)
        try:
            yield self.trace
        finally:
            handle.remove()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._inside:  # our own unconditional pass
            return
        prediction = output[0] if isinstance(output, tuple) else output.sample
        images = self._images
        if self.mode == GUIDANCE_BATCH:
            if prediction.shape[0] != 2 * images:
                raise RuntimeError(f"expected a guidance batch of {2 * images} predictions, got {prediction.shape[0]}")
            conditional, unconditional = guidance_halves(prediction)
        else:
            if prediction.shape[0] not in (images, 2 * images):
                raise RuntimeError(f"expected {images} or {2 * images} predictions, got {prediction.shape[0]}")
            conditional = prediction[-images:]
            sample = (args[0] if args else kwargs["sample"])[-images:]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            if isinstance(timestep, Tensor) and timestep.ndim and timestep.shape[0] == prediction.shape[0]:
                timestep = timestep[-images:]
            empty = self.empty()
            self._inside = True
            try:
                unconditional = module(sample, timestep, encoder_hidden_states=empty.expand(images, *empty.shape[1:]),
                                       return_dict=False)[0]
            finally:
                self._inside = False
        self.trace.add(conditional, unconditional)
        for image, value in enumerate(self.trace.steps[-1].tolist()):  # B numbers: cheaper than a tensor check
            if not math.isfinite(value):
                raise NonFinitePrediction(image, self.trace.num_steps - 1)


class TextToImageGenerator(pl.LightningModule):
    """Generates images (and their memorization scores) from a local text-to-image pipeline folder.

    A batch is ``{"batch": number, "jobs": [{"prompt": str, "seed": int, ...}, ...]}`` (see
    :mod:`datamodules.generation`); ``predict_step`` returns the jobs as rows with
    ``memorization_score`` (mean ``d_t`` over the UNet calls) and ``memorization_score_first``
    (``d_t`` of the first), and the images (PIL, RGB; None with ``score_only``).

    Args:
        pipeline: a local diffusers pipeline folder (Stable Diffusion 1.x / 2.x layout, or the
            suite's pixel-space text-to-image models); nothing is downloaded.
        scheduler: ``folder`` (the folder's own), ``ddim`` or ``dpm`` (DPM-Solver multistep).
        steps: denoising steps (``num_inference_steps``).
        guidance: classifier-free guidance scale (<= 1: none; the score then adds one
            unconditional UNet pass per step).
        height, width: image size in pixels (default: the pipeline's).
        negative_prompt: the unconditional prompt of guidance (default: the empty prompt; when
            given, the score adds the empty prompt's pass, as its definition needs).
        score_only: compute the score over the first ``score_steps`` steps and stop: no image.
        score_steps: UNet calls scored with ``score_only`` (default: all ``steps``).
        precision: ``auto`` (float32 on the CPU, bfloat16 or float16 on CUDA), ``32``, ``bf16``, ``16``.
        embedding_noise: std of the Gaussian noise added to each image's conditional prompt
            embeddings (0: none), seeded from the image's seed.
        random_words: words of the tokenizer's vocabulary inserted into each prompt at random
            places (0: none), drawn from the image's seed; rows record the ``generated_prompt``.
    """

    def __init__(
        self,
        pipeline: str,
        scheduler: SchedulerChoice = "folder",
        steps: int = 50,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        score_only: bool = False,
        score_steps: int | None = None,
        precision: GenerationPrecision = "auto",
        embedding_noise: float = 0.0,
        random_words: int = 0,
    ) -> None:
        super().__init__()
        check_generation_options(steps=steps, guidance=guidance, score_only=score_only, score_steps=score_steps,
                                 precision=precision, scheduler=scheduler, height=height, width=width,
                                 embedding_noise=embedding_noise, random_words=random_words)
        self.save_hyperparameters()
        self.folder = Path(pipeline).expanduser().resolve()
        with quiet_libraries():
            loaded = load_text_pipeline(self.folder)
        loaded.scheduler = build_scheduler(loaded, scheduler)
        loaded.set_progress_bar_config(disable=True)
        multiple = size_multiple(loaded)
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % multiple:
                raise UserError(f"--{name} {value}: this pipeline generates sides that divide by {multiple}")
        self.pipeline = loaded
        self.parts = nn.ModuleDict({name: module for name, module in loaded.components.items()
                                    if isinstance(module, nn.Module)})  # Lightning moves what the module owns
        self.parts.requires_grad_(False)
        self.height = height or default_size(loaded)
        self.width = width or default_size(loaded)
        self.steps, self.guidance, self.negative_prompt = steps, float(guidance), negative_prompt
        self.score_only = score_only
        self.score_steps = (score_steps or steps) if score_only else None
        self.precision_choice: str = precision
        self.embedding_noise, self.random_words = float(embedding_noise), int(random_words)
        self.vocabulary: list[str] = tokenizer_words(loaded.tokenizer.get_vocab()) if random_words else []
        if random_words and not self.vocabulary:
            raise UserError(f"--random_words {random_words}: the pipeline's tokenizer has no word-final tokens to draw "
                            f"from ({VOCABULARY_RULE})")
        guided = self.guidance > 1 and getattr(loaded.unet.config, "time_cond_proj_dim", None) is None
        self.score_mode = GUIDANCE_BATCH if guided and negative_prompt is None else EXTRA_PASS
        self._empty: Tensor | None = None
        self.scorer = MemorizationScorer(loaded.unet, self.empty_embedding, self.score_mode)

    # ------------------------------------------------------------------ set-up
    def dtype_on(self, device: torch.device | str) -> torch.dtype:
        """The dtype generation runs in on ``device`` (:func:`generation_dtype`)."""
        return generation_dtype(self.precision_choice, device)

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        dtype = self.dtype_on(device)
        if self.pipeline.unet.dtype != dtype:
            with quiet_libraries():  # the cast equals loading with torch_dtype: no SD module keeps float32
                self.pipeline.to(dtype=dtype)
        self._empty = None

    def empty_embedding(self) -> Tensor:
        """The empty prompt's text-encoder states (computed once per device)."""
        if self._empty is None or self._empty.device != self.pipeline.unet.device:
            self._empty = empty_prompt_embedding(self.pipeline)
        return self._empty

    def generated_prompt(self, prompt: str, seed: int) -> str:
        """The prompt an image is generated from: ``prompt`` itself, or with ``random_words`` words
        inserted (:func:`lit.captions.add_random_words`, drawn from ``derive_seed(seed, "random_words")``)."""
        if not self.random_words:
            return prompt
        return add_random_words(prompt, self.vocabulary, self.random_words,
                                SeededDraws(derive_seed(int(seed), RANDOM_WORDS)))

    def prompt_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """The conditional embeddings ``(B, L, D)`` of ``prompts``, from the pipeline's own encoder
        (what its ``__call__`` computes from ``prompt``)."""
        pipeline, device = self.pipeline, self.pipeline._execution_device
        if isinstance(pipeline, PixelTextToImagePipeline):
            return pipeline.encode_text(list(prompts), device)
        return pipeline.encode_prompt(list(prompts), device, 1, False)[0]

    def too_long(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text has more tokens than the tokenizer's limit (the pipeline truncates it)."""
        tokenizer = self.pipeline.tokenizer
        ids = tokenizer(list(texts), truncation=False, verbose=False).input_ids
        return [len(i) > tokenizer.model_max_length for i in ids]

    def record(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """What the outputs depend on, for the manifest: the pipeline (path, class, SHA-256 of
        every file), the scheduler, the generation options, the mitigations and the score's mode."""
        scheduler = self.pipeline.scheduler
        dtype = self.dtype_on(self.device if device is None else device)
        return {
            "pipeline": {"path": str(self.folder), "class": type(self.pipeline).__name__,
                         "sha256": pipeline_files(self.folder)},
            "scheduler": {"choice": self.hparams.scheduler, "class": type(scheduler).__name__,
                          "config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}},
            "generation": {"steps": self.steps, "guidance": self.guidance, "height": self.height, "width": self.width,
                           "negative_prompt": self.negative_prompt, "precision": self.precision_choice,
                           "dtype": DTYPE_NAMES[dtype], "tokenizer_max_length": self.pipeline.tokenizer.model_max_length},
            "mitigations": {
                "embedding_noise": {"std": self.embedding_noise,
                                    "rule": "e + std * n, n ~ N(0, 1) per entry of the image's conditional prompt "
                                            "embeddings (the unconditional / negative ones unchanged), n drawn with "
                                            "lit.text_conditioning.generator(image seed, 'embedding_noise')"},
                "random_words": {"count": self.random_words, "vocabulary_size": len(self.vocabulary),
                                 "vocabulary": VOCABULARY_RULE if self.random_words else None,
                                 "rule": "each word drawn uniformly from the vocabulary and inserted at a uniformly "
                                         "drawn place between the prompt's words, with SeededDraws(derive_seed(image "
                                         "seed, 'random_words'))"},
            },
            "score": {"mode": self.score_mode, "score_only": self.score_only,
                      "steps": self.score_steps if self.score_only else "all",
                      "definition": "d_t = ||eps(x_t, prompt) - eps(x_t, empty prompt)||_2 over the whole prediction; "
                                    "memorization_score = mean over the UNet calls, memorization_score_first = d_1"},
        }

    # ------------------------------------------------------------------ generation
    def _stop_after_score_steps(self, pipeline: DiffusionPipeline, step: int, timestep: Any,
                                tensors: dict[str, Any]) -> dict[str, Any]:
        if self.score_steps is not None and step + 1 >= self.score_steps:
            pipeline._interrupt = True
        return {}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[Image.Image] | None, ScoreTrace]:
        """Images (None with ``score_only``) and the score trace of one pipeline call, one image per
        (prompt, seed); raises :class:`NonFinitePrediction` on NaN / inf predictions."""
        options: dict[str, Any] = {
            "prompt": list(prompts), "num_inference_steps": self.steps, "guidance_scale": self.guidance,
            "height": self.height, "width": self.width,
            "generator": [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds],
            "output_type": "latent" if self.score_only else "np",
        }
        if self.negative_prompt is not None:
            options["negative_prompt"] = [self.negative_prompt] * len(prompts)
        if self.embedding_noise > 0:  # the unconditional side stays the pipeline's own (from negative_prompt or "")
            embeddings = self.prompt_embeddings(prompts)
            options["prompt_embeds"] = add_embedding_noise(embeddings, self.embedding_noise,
                                                           generators([int(seed) for seed in seeds], EMBEDDING_NOISE))
            del options["prompt"]
        if self.score_only:
            options["callback_on_step_end"] = self._stop_after_score_steps
        with quiet_libraries(), self.scorer.recording(len(prompts)) as trace:
            output = self.pipeline(**options).images
        if self.score_only:
            return None, trace
        if not np.isfinite(output).all():
            bad = int(np.flatnonzero(~np.isfinite(output).reshape(len(prompts), -1).all(axis=1))[0])
            raise NonFinitePrediction(bad, None)
        return VaeImageProcessor.numpy_to_pil(output), trace

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        jobs = list(batch["jobs"])
        if not jobs:  # a rank with nothing left to do (datamodules.generation.NOTHING_LEFT)
            return {"batch": batch["batch"], "rows": [], "images": [], "score_steps": 0}
        prompts = [self.generated_prompt(job["prompt"], job["seed"]) for job in jobs]
        try:
            images, trace = self.generate(prompts, [job["seed"] for job in jobs])
        except NonFinitePrediction as error:
            job = jobs[error.image]
            where = "the decoded image" if error.step is None else f"the noise prediction at step {error.step + 1}"
            raise UserError(f"{where} is not finite (NaN or inf) for prompt {prompts[error.image]!r} with seed "
                            f"{job['seed']}: the pipeline's weights or --precision cannot make this image") from None
        means, firsts = trace.mean.tolist(), trace.first.tolist()
        rows = [{**job, "generated_prompt": prompts[i], "memorization_score": means[i],
                 "memorization_score_first": firsts[i]} for i, job in enumerate(jobs)]
        return {"batch": batch["batch"], "rows": rows, "images": images, "score_steps": trace.num_steps}


def check_generation_options(*, steps: int, guidance: float, score_only: bool, score_steps: int | None,
                             precision: str, scheduler: str, height: int | None, width: int | None,
                             embedding_noise: float = 0.0, random_words: int = 0) -> None:
    """One-line errors naming the option, before any pipeline is loaded."""
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if not np.isfinite(guidance) or guidance < 0:
        raise UserError(f"--guidance must be a finite number >= 0, got {guidance}")
    if score_steps is not None:
        if not score_only:
            raise UserError("--score_steps applies with --score_only (the score of a full run covers every step)")
        if not 1 <= score_steps <= steps:
            raise UserError(f"--score_steps must lie in [1, --steps {steps}], got {score_steps}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if not np.isfinite(embedding_noise) or embedding_noise < 0:
        raise UserError(f"--embedding_noise must be a finite number >= 0, got {embedding_noise}")
    if random_words < 0:
        raise UserError(f"--random_words must be >= 0, got {random_words}")
