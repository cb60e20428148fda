"""Diffusion outpainting copy detection (the paper's IN-Dif-Patch and IN-Dif-Diagonal).

For every query, ``mixes_per_query`` synthetic images; each, from its own generator
(``datamodules.synthetic.builder``: seeded from ``(seed, "outpaint", query id, mix)``):

1. the query's largest square at a random place, resized to ``resolution`` (the canvas);
2. the **kept region**: ``patch`` mode, a square of side ``round(sqrt(patch_fraction) *
   resolution)`` (20% of the canvas by default) at a random place; ``diagonal`` mode, the
   triangular half above or below the main or the anti-diagonal (one of four, uniform;
   the diagonal pixels belong to the kept half);
3. diffusers' RePaint (``RePaintScheduler``: DDIM-style steps with the known region
   re-noised from the source at every step, and ``jump_length`` / ``jump_n_sample``
   resampling) fills the rest with a DDPM ``UNet2DModel``. The last RePaint step blends
   the source back exactly (``final_alpha_cumprod = 1``), so the kept pixels are the
   source's up to float rounding.

The diffusion noise of an item comes from a second generator, seeded from
``(seed, "outpaint", query id, mix, "noise")``, so the mask does not depend on the
sampler settings. :func:`repaint` runs ``RePaintPipeline.__call__``'s loop with one
generator **per image** for every step: the pipeline itself draws all the step noise of a
batch from its first generator, which would make an image depend on its batch-mates
(``tests/test_outpainting.py`` checks that :func:`repaint` equals the pipeline for a batch
of one). Items record the source box, the kept region and the model fingerprint.

The model is a local diffusers folder (``UNet2DModel``, or a pipeline folder with
``unet/``; a ``scheduler_config.json`` beside it sets the noise schedule) or a
``DDPMModule`` checkpoint of this suite (``models.ddpm``; EMA weights by default). It is
identified in the manifest by the SHA-256 of its files, so another model rebuilds the
set; it is loaded only when something has to be rendered.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import RePaintScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm.auto import tqdm

from datamodules.synthetic.builder import QueryOutput, RenderedItem, Skip, StageTimer, SyntheticBuilder
from datamodules.synthetic.datamodule import SyntheticRetrievalDataModule
from datamodules.synthetic.sampling import randint, random_square, random_square_resized
from datamodules.synthetic.sources import SourceRef, folder_refs, split_queries_and_pool
from lit.files import file_sha256
from lit.io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from models.ddpm import WEIGHT_FILES, DDPMModule, load_pretrained_unet, unet_folder

OutpaintMode = Literal["patch", "diagonal"]
Diagonal = Literal["main", "anti"]
Half = Literal["upper", "lower"]

_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample")
_EXPECTED = ("a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors/.bin, "
             "or a pipeline folder with unet/) or a DDPMModule checkpoint (.ckpt)")


# ----------------------------------------------------------------------------- masks
def patch_side(resolution: int, fraction: float) -> int:
    """Side of the square that covers ``fraction`` of a ``resolution`` x ``resolution`` canvas
    (rounded; at least 1 pixel)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"patch_fraction must be in (0, 1], got {fraction}")
    return max(1, min(resolution, round(math.sqrt(fraction) * resolution)))


def patch_mask(resolution: int, side: int, top: int, left: int) -> Tensor:
    """(R, R) float mask: 1 inside the ``side`` x ``side`` square at (top, left), 0 elsewhere."""
    if not (0 <= top <= resolution - side and 0 <= left <= resolution - side):
        raise ValueError(f"a {side} px square at ({top}, {left}) does not fit in {resolution} px")
    mask = torch.zeros(resolution, resolution)
    mask[top:top + side, left:left + side] = 1.0
    return mask


def diagonal_mask(resolution: int, diagonal: Diagonal, half: Half) -> Tensor:
    """(R, R) float mask of a triangular half, diagonal pixels included.

    ``main`` runs from the top-left to the bottom-right corner, ``anti`` from the top-right
    to the bottom-left; ``upper`` is the half above it (it holds the top edge)."""
    rows = torch.arange(resolution)[:, None]
    cols = torch.arange(resolution)[None, :]
    if diagonal == "main":
        keep = cols >= rows if half == "upper" else cols <= rows
    elif diagonal == "anti":
        keep = rows + cols <= resolution - 1 if half == "upper" else rows + cols >= resolution - 1
    else:
        raise ValueError(f"diagonal must be 'main' or 'anti', got {diagonal!r}")
    if half not in ("upper", "lower"):
        raise ValueError(f"half must be 'upper' or 'lower', got {half!r}")
    return keep.float()


def kept_mask(kept: dict[str, Any], resolution: int) -> Tensor:
    """The (R, R) mask a manifest's ``placement.kept`` description stands for."""
    if kept["mode"] == "patch":
        left, top, right, _ = kept["box"]
        return patch_mask(resolution, right - left, top, left)
    if kept["mode"] == "diagonal":
        return diagonal_mask(resolution, kept["diagonal"], kept["half"])
    raise ValueError(f"mode must be 'patch' or 'diagonal', got {kept['mode']!r}")


def sample_mask(mode: OutpaintMode, resolution: int, patch_fraction: float,
                generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """A random kept-region mask (1 = keep) and its JSON-able description (two draws)."""
    if mode == "patch":
        side = patch_side(resolution, patch_fraction)
        top, left = random_square((resolution, resolution), side, generator)
        kept: dict[str, Any] = {"mode": "patch", "box": [left, top, left + side, top + side]}
    elif mode == "diagonal":
        kept = {"mode": "diagonal", "diagonal": ("main", "anti")[randint(generator, 2)],
                "half": ("upper", "lower")[randint(generator, 2)]}
    else:
        raise ValueError(f"mode must be 'patch' or 'diagonal', got {mode!r}")
    mask = kept_mask(kept, resolution)
    return mask, {**kept, "kept_fraction": float(mask.sum()) / resolution**2}


# ----------------------------------------------------------------------------- RePaint
@torch.no_grad()
def repaint(unet: UNet2DModel, scheduler: RePaintScheduler, images: Tensor, masks: Tensor,
            generators: list[torch.Generator], num_inference_steps: int = 250, jump_length: int = 10,
            jump_n_sample: int = 10, eta: float = 0.0, progress: bool = False) -> Tensor:
    """Outpaint a batch with diffusers' RePaint; image ``i`` depends only on ``generators[i]``.

    Args:
        images: (B, 3, R, R) float in [0, 1] (the sources; only the kept pixels matter).
        masks: (B, 1, R, R) or (B, R, R), 1 = keep, 0 = generate.
        generators: one CPU generator per image, for its initial and every step's noise.
    Returns:
        (B, 3, R, R) float32 in [0, 1] on the CPU.

    The loop is ``RePaintPipeline.__call__``'s, with the per-image generator list handed
    to ``RePaintScheduler.step`` / ``undo_step`` (the pipeline passes its first generator).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, R, R), got {tuple(images.shape)}")
    masks = masks[:, None] if masks.ndim == 3 else masks
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    if len(generators) != images.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for {images.shape[0]} images")
    device, dtype = unet.device, unet.dtype
    original = (images * 2.0 - 1.0).to(device=device, dtype=dtype)
    mask = masks.to(device=device, dtype=dtype)
    sample = randn_tensor(tuple(original.shape), generator=generators, device=device, dtype=dtype)
    scheduler.set_timesteps(num_inference_steps, jump_length, jump_n_sample, device)
    scheduler.eta = eta
    t_last = scheduler.timesteps[0] + 1
    for t in tqdm(scheduler.timesteps, disable=not progress, leave=False, desc="RePaint", unit="step"):
        if t < t_last:
            noise = unet(sample, t).sample
            sample = scheduler.step(noise, t, sample, original, mask, generators).prev_sample
        else:
            sample = scheduler.undo_step(sample, t_last, generators)
        t_last = t
    return (sample.float() / 2 + 0.5).clamp(0, 1).cpu()


# ----------------------------------------------------------------------------- models
def model_fingerprint(path: str | Path, use_ema: bool) -> dict[str, Any]:
    """What identifies the outpainting model in a manifest: its kind and the SHA-256 of
    its files (weights, UNet config, scheduler config). Missing files: one-line ValueError."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"outpainting model not found: {source} (expected {_EXPECTED})")
    if source.is_file():
        return {"kind": "ddpm_checkpoint", "sha256": _sha256([source]), "use_ema": use_ema}
    folder = unet_folder(source)
    weights = [folder / n for n in WEIGHT_FILES]
    weights = [w for w in weights if w.is_file()]
    if not (folder / "config.json").is_file() or not weights:
        raise ValueError(f"outpainting model folder {folder} is incomplete (expected {_EXPECTED})")
    scheduler = _scheduler_config_file(source, folder)
    files = [folder / "config.json", weights[0], *([scheduler] if scheduler else [])]
    return {"kind": "diffusers", "sha256": _sha256(files)}


def load_outpainting_model(path: str | Path, use_ema: bool = True) -> tuple[UNet2DModel, RePaintScheduler]:
    """The UNet (eval mode, CPU) and a ``RePaintScheduler`` with its noise schedule.

    A folder goes through ``UNet2DModel.from_pretrained(..., local_files_only=True)``; a
    file is read as a ``models.ddpm.DDPMModule`` checkpoint (EMA weights when ``use_ema``).
    RePaint needs an epsilon-prediction model; anything else is refused in one line."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"outpainting model not found: {source} (expected {_EXPECTED})")
    if source.is_file():
        unet, schedule, prediction = _load_checkpoint(source, use_ema)
    else:
        unet = load_pretrained_unet(source)
        config_file = _scheduler_config_file(source, unet_folder(source))
        config = RePaintScheduler.load_config(str(config_file)) if config_file else {}
        schedule = {k: v for k, v in config.items() if k in _SCHEDULE_KEYS}
        prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"{source}: RePaint needs an epsilon-prediction model, this one predicts {prediction!r}")
    if unet.config.in_channels != 3 or unet.config.out_channels != 3:
        raise ValueError(f"{source}: outpainting needs an RGB UNet (3 in / 3 out channels), got "
                         f"{unet.config.in_channels} / {unet.config.out_channels}")
    return unet.eval().requires_grad_(False), RePaintScheduler(**schedule)


def _load_checkpoint(path: Path, use_ema: bool) -> tuple[UNet2DModel, dict[str, Any], str]:
    try:
        module = DDPMModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - one line naming the file
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"cannot load {path} as a DDPMModule checkpoint (expected {_EXPECTED}): {first}") from error
    if use_ema:
        module.ema.copy_to(module.unet.parameters())
    config = module.noise_scheduler.config
    schedule = {k: config[k] for k in _SCHEDULE_KEYS if k in config}
    return module.unet, schedule, str(config.get("prediction_type", "epsilon"))


def _scheduler_config_file(given: Path, folder: Path) -> Path | None:
    """``scheduler_config.json`` beside the UNet, or in the pipeline's ``scheduler/``."""
    for candidate in (folder / "scheduler_config.json", given / "scheduler" / "scheduler_config.json",
                      folder.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    return None


def _sha256(files: list[Path]) -> str:
    """One checksum over several files: their names and their SHA-256s, in order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


# ----------------------------------------------------------------------------- builder
class OutpaintBuilder(SyntheticBuilder):
    """Renders outpainted images (see the module docstring); ``batch_size`` queries are
    denoised together.

    Args:
        queries: source images, one row each.
        model: diffusers UNet folder or ``DDPMModule`` checkpoint (see :func:`load_outpainting_model`).
        seed: seed of the whole set.
        mode: ``patch`` (IN-Dif-Patch) or ``diagonal`` (IN-Dif-Diagonal).
        patch_fraction: share of the canvas the kept square covers (``patch`` mode).
        mixes_per_query: outpaintings per query.
        resolution: side of the canvas (the UNet's training resolution, normally).
        num_inference_steps, jump_length, jump_n_sample, eta: RePaint settings.
        use_ema: take a checkpoint's EMA weights.
        batch_size: queries denoised together.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        step_progress: show a progress bar over the RePaint steps of each batch.
        max_pixels: query images larger than this are downscaled on load.
        strict: stop the build at the first unreadable query image (default: skip and count it).
    """

    kind = "outpaint"

    def __init__(self, queries: list[SourceRef], model: str | Path, seed: int = 0, mode: OutpaintMode = "patch",
                 patch_fraction: float = 0.2, mixes_per_query: int = 1, resolution: int = 256,
                 num_inference_steps: int = 250, jump_length: int = 10, jump_n_sample: int = 10, eta: float = 0.0,
                 use_ema: bool = True, batch_size: int = 8, device: str = "auto", step_progress: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False) -> None:
        super().__init__(seed=seed, batch_size=batch_size, strict=strict)
        if mode not in ("patch", "diagonal"):
            raise ValueError(f"mode must be 'patch' or 'diagonal', got {mode!r}")
        patch_side(resolution, patch_fraction)  # validates the fraction
        for name, value in (("mixes_per_query", mixes_per_query), ("num_inference_steps", num_inference_steps),
                            ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if not queries:
            raise ValueError("outpainting needs at least one query image")
        self._queries = list(queries)
        self.model_path = Path(model)
        self.mode = mode
        self.patch_fraction = float(patch_fraction)
        self.mixes_per_query = mixes_per_query
        self.resolution = resolution
        self.num_inference_steps = num_inference_steps
        self.jump_length = jump_length
        self.jump_n_sample = jump_n_sample
        self.eta = float(eta)
        self.use_ema = use_ema
        self.device = device
        self.step_progress = step_progress
        self.max_pixels = max_pixels
        self._fingerprint: dict[str, Any] | None = None
        self._model: tuple[UNet2DModel, RePaintScheduler] | None = None

    def parameters(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_path, self.use_ema)
        return {"mode": self.mode, "patch_fraction": self.patch_fraction if self.mode == "patch" else None,
                "mixes_per_query": self.mixes_per_query, "resolution": self.resolution,
                "num_inference_steps": self.num_inference_steps, "jump_length": self.jump_length,
                "jump_n_sample": self.jump_n_sample, "eta": self.eta, "model": self._fingerprint,
                "max_pixels": self.max_pixels}

    def queries(self) -> list[SourceRef]:
        return self._queries

    def model(self) -> tuple[UNet2DModel, RePaintScheduler]:
        """The UNet (on the builder's device) and scheduler, loaded once."""
        if self._model is None:
            unet, scheduler = load_outpainting_model(self.model_path, self.use_ema)
            levels = len(unet.config.block_out_channels)
            if self.resolution % 2 ** (levels - 1):
                raise ValueError(f"resolution {self.resolution} must be divisible by {2 ** (levels - 1)} "
                                 f"for the {levels}-level UNet of {self.model_path}")
            device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
            self._model = (unet.to(device), scheduler)
        return self._model

    def render(self, rows: Sequence[int], timer: StageTimer) -> list[QueryOutput]:
        outputs: list[QueryOutput | None] = [None] * len(rows)
        jobs: list[tuple[int, Tensor, Tensor, dict[str, Any], torch.Generator]] = []
        for position, row in enumerate(rows):
            ref = self._queries[row]
            with timer("decode"):
                try:
                    image = load_image(ref.path, strict=True, max_pixels=self.max_pixels)
                except ImageLoadError as error:
                    outputs[position] = self.unreadable(error)
                    continue
            for mix in range(self.mixes_per_query):
                generator = self.generator(ref.id, mix)
                with timer("mask"):
                    canvas, source_box = random_square_resized(image, self.resolution, generator)
                    mask, kept = sample_mask(self.mode, self.resolution, self.patch_fraction, generator)
                provenance = {"region": self.mode, "placement": {"source_box": source_box, "kept": kept},
                              "augmentation": {}}
                jobs.append((position, canvas, mask, provenance, self.generator(ref.id, mix, "noise")))
        if jobs:
            with timer("load_model"):
                unet, scheduler = self.model()
            with timer("diffusion"):
                result = repaint(unet, scheduler, torch.stack([j[1] for j in jobs]), torch.stack([j[2] for j in jobs]),
                                 [j[4] for j in jobs], self.num_inference_steps, self.jump_length,
                                 self.jump_n_sample, self.eta, progress=self.step_progress)
            for (position, _, _, provenance, _), image in zip(jobs, result):
                items = outputs[position]
                if items is None:
                    items = outputs[position] = []
                assert isinstance(items, list)
                items.append(RenderedItem(image, provenance))
        return [out if out is not None else Skip("no output") for out in outputs]


# ----------------------------------------------------------------------------- datamodule
class OutpaintingDataModule(SyntheticRetrievalDataModule):
    """IN-Dif-Patch / IN-Dif-Diagonal: queries are source images, the gallery their outpaintings.

    Args:
        root: folder of source images (listed recursively).
        unet: the diffusion model: a local diffusers ``UNet2DModel`` folder (or pipeline
            folder with ``unet/``) or a ``DDPMModule`` checkpoint; required to build.
        mode: ``patch`` (keep a square of ``patch_fraction`` of the image) or ``diagonal``
            (keep a triangular half).
        num_queries: number of queries, a seeded subset (None: every image under ``root``).
        output_dir: where the set is written (default ``synthetic/dif_<mode>``; reused while
            its manifest matches).
        seed: seed of the query subset, the crops, the masks and the diffusion noise.
        render_batch_size: queries denoised together while building.
        device: where the UNet runs while building (``auto``: CUDA when available).
        patch_fraction, mixes_per_query, resolution, num_inference_steps, jump_length,
        jump_n_sample, eta, use_ema: see :class:`OutpaintBuilder`.
        distractors, num_distractors, progress, build_workers, max_pixels, batch_size, num_workers, strict:
            see :class:`~datamodules.synthetic.datamodule.SyntheticRetrievalDataModule`.
    """

    def __init__(self, root: str, unet: str | None = None, mode: OutpaintMode = "patch",
                 patch_fraction: float = 0.2, num_queries: int | None = None, output_dir: str | None = None,
                 seed: int = 0, mixes_per_query: int = 1, resolution: int = 256, num_inference_steps: int = 250,
                 jump_length: int = 10, jump_n_sample: int = 10, eta: float = 0.0, use_ema: bool = True,
                 render_batch_size: int = 8, device: str = "auto", distractors: str | None = None,
                 num_distractors: int | None = None, progress: bool = True, build_workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 32, num_workers: int = 0,
                 strict: bool = False) -> None:
        super().__init__(output_dir=output_dir or f"synthetic/dif_{mode}",
                         distractors=distractors, num_distractors=num_distractors, progress=progress,
                         build_workers=build_workers, max_pixels=max_pixels, batch_size=batch_size,
                         num_workers=num_workers, strict=strict)
        if mode not in ("patch", "diagonal"):
            raise ValueError(f"mode must be 'patch' or 'diagonal', got {mode!r}")
        if build_workers > 0 and device != "cpu":
            raise ValueError(f"build_workers={build_workers} renders in worker processes, each with its own UNet: "
                             f"use device: cpu with it (device {device!r} renders in the main process)")
        self.root = root
        self.unet = unet
        self.num_queries = num_queries
        self.seed = seed
        self.builder_args = {"mode": mode, "patch_fraction": patch_fraction, "mixes_per_query": mixes_per_query,
                             "resolution": resolution, "num_inference_steps": num_inference_steps,
                             "jump_length": jump_length, "jump_n_sample": jump_n_sample, "eta": eta,
                             "use_ema": use_ema, "batch_size": render_batch_size, "device": device}


    @property
    def name(self) -> str:
        """Table 1 column: Dif-Patch or Dif-Diagonal (the paper's IN-Dif-* sets)."""
        return f"Dif-{self.builder_args['mode'].title()}"

    def make_builder(self) -> OutpaintBuilder:
        if self.unet is None:
            raise ValueError(f"OutpaintingDataModule needs unet: {_EXPECTED}")
        sources = folder_refs(Path(self.root))
        if not sources:
            raise ValueError(f"no images found under {self.root}")
        rows, _ = split_queries_and_pool(len(sources), self.seed, self.num_queries, 0.0, has_pool=True)
        return OutpaintBuilder([sources[r] for r in rows], self.unet, seed=self.seed,
                               max_pixels=self.max_pixels, strict=self.strict, **self.builder_args)


__all__ = [
    "OutpaintBuilder",
    "OutpaintMode",
    "OutpaintingDataModule",
    "diagonal_mask",
    "load_outpainting_model",
    "model_fingerprint",
    "patch_mask",
    "patch_side",
    "repaint",
    "sample_mask",
]
