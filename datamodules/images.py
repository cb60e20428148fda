"""Training data for ``lit fit`` of a DDPM: a seeded subset of N images, augmented as in the paper.

The paper trains DDPMs on subsets (300 / 3000 / all Celeb-A, 100 / 1083 / all
Oxford Flowers) and finds that copying falls as N grows, so the subset is a
first-class, recorded choice here:

- :class:`ImageFolderTrainData` lists the images under a folder, draws a
  permutation from ``subset_seed`` and keeps the first ``subset_size`` files that
  load (a file that fails is skipped with a warning and the next one in the
  permutation takes its place, so N stays N; with ``subset_size: null`` every
  readable file is used). Skipped files are counted and named: a warning,
  ``skipped_images.tsv`` (path, reason) beside ``training_subset.tsv``, the
  ``skipped_images`` hyper-parameter and the checkpoint. Only ``strict: true``
  (stop at the first bad file) or a ``subset_size`` larger than the readable files
  ends the run;
- :class:`ProceduralTrainData` renders ``num_images`` procedural scenes
  (``datamodules.procedural``), the offline default.

Images are resized once (shorter side ``load_size``, default ``resolution``) and
kept in memory as uint8; training items get a random crop to ``resolution`` and
a random horizontal flip, as in the paper (``random_crop: false`` takes the
centre crop instead, diffusers' ``--center_crop``).
Each item is ``{"image": (3, R, R) float in [0, 1], "index": subset row}``.
The order is a :class:`datamodules.samplers.ResumableShuffleSampler` (a function of
the run seed and the epoch, sharded over DDP ranks) and each crop and flip is drawn
from a seed of its own draw, so a run resumed from a checkpoint (even mid-epoch)
sees the batches and crops the uninterrupted run would have seen.

The chosen subset is recorded three ways: the datamodule's hyper-parameters,
``training_subset.tsv`` (index, path) in the log dir, and the checkpoint
(``state_dict``; resuming on a different subset is refused).
:meth:`TrainImagesDataModule.reference_dataset` gives the same images without
augmentation (centre crop) for the replication monitor.

``predict_dataloader`` yields seeds (:class:`SeedDataset`) so that
``lit predict -c <training config> --ckpt_path ...`` writes generations;
:class:`GenerationSeeds` does the same without any training data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.procedural import ProceduralScenes
from datamodules.samplers import ResumableDataLoader, ResumableShuffleSampler
from lit.errors import UserError
from lit.files import write_text_atomic
from lit.io import ImageLoadError, load_image, scan_images, shorten, to_uint8
from lit.resume import run_seed

SUBSET_FILE = "training_subset.tsv"
SKIPPED_FILE = "skipped_images.tsv"


class SeedDataset(Dataset):
    """Items ``{"seed": first_seed + i, "index": i}``: what ``DDPMModule.predict_step`` samples."""

    def __init__(self, num_samples: int, first_seed: int = 0) -> None:
        if num_samples < 0 or first_seed < 0:
            raise ValueError(f"num_samples and first_seed must be >= 0, got {num_samples}, {first_seed}")
        self.num_samples = num_samples
        self.first_seed = first_seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} seeds")
        return {"seed": self.first_seed + index, "index": index}


class TrainingImages(Dataset):
    """In-memory uint8 images (shorter side >= ``resolution``) served as float [0, 1] squares.

    ``augment``: random (or, ``random_crop=False``, centre) crop + random horizontal
    flip (training); otherwise a centre crop (the reference images). ``repeats`` lists the set that many
    times per epoch (fewer, longer epochs for tiny sets); ``index`` stays the
    image's subset row.

    An item is asked for by ``index`` or by ``(index, draw_seed)`` (what
    ``datamodules.samplers.ResumableShuffleSampler`` yields): with a draw seed the crop and
    flip come from a generator seeded by it, so the same draw gives the same crop in any
    worker, process or resumed run; with a bare index they come from torch's global generator.
    """

    def __init__(self, images: Sequence[Tensor], resolution: int, augment: bool,
                 random_flip: bool = True, repeats: int = 1, random_crop: bool = True) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        small = [i for i, im in enumerate(images) if min(im.shape[-2:]) < resolution]
        if small:
            raise ValueError(f"{len(small)} image(s) are smaller than resolution {resolution} (first: row {small[0]})")
        self.images = list(images)
        self.resolution = resolution
        self.repeats = repeats
        self.random_crop = augment and random_crop
        self.random_flip = augment and random_flip

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, draw_seed = (key if isinstance(key, tuple) else (key, None))
        row = int(index) % len(self.images)
        generator = None if draw_seed is None else torch.Generator().manual_seed(int(draw_seed))
        image = self._crop_and_flip(self.images[row], generator)
        return {"image": image.float() / 255.0, "index": row}

    def _crop_and_flip(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        """A ``resolution`` square (random window or centre), mirrored with probability 1/2 when flipping."""
        height, width = image.shape[-2:]
        size = self.resolution
        if self.random_crop:
            top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
            image = image[..., top:top + size, left:left + size]
        else:
            image = TF.center_crop(image, [size])
        if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
            image = image.flip(-1)
        return image


class GenerationSeeds(pl.LightningDataModule):
    """Seeds only, for ``lit predict`` of a DDPM without training data.

    Args:
        num_samples: how many images to generate.
        first_seed: seed of the first image (image i uses ``first_seed + i``).
        batch_size: seeds per predict batch.
    """

    def __init__(self, num_samples: int = 64, first_seed: int = 0, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.seeds = SeedDataset(num_samples, first_seed)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.seeds, batch_size=self.hparams.batch_size, shuffle=False)


class ResumableTrainData(pl.LightningDataModule):
    """Base of the training datamodules that hold their images in memory and resume exactly.

    Subclasses implement :meth:`load_subset` and :meth:`train_dataset`; they may replace
    :meth:`train_sampler` (the epoch's order), :meth:`record_files` (what is written into the
    run's log dir) and extend :meth:`state_dict`. This base loads and resizes the images once
    (uint8, shorter side ``load_size``), counts skipped files in the hyper-parameters, builds
    the resumable, DDP-sharded loader and keeps its position and seed in checkpoints.

    Args:
        resolution: side of the square training crops.
        load_size: shorter side the images are resized to before cropping
            (default ``resolution``: square images are then not cropped at all).
        random_flip: random horizontal flips.
        random_crop: random crops of the resized images; off: centre crops.
        batch_size: images per training batch (per process under DDP).
        num_workers: dataloader workers.
    """

    def __init__(self, resolution: int = 32, load_size: int | None = None, random_flip: bool = True,
                 batch_size: int = 16, num_workers: int = 0, random_crop: bool = True) -> None:
        super().__init__()
        if resolution < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"need resolution >= 1, batch_size >= 1, num_workers >= 0; got {resolution}, {batch_size}, {num_workers}")
        if load_size is not None and load_size < resolution:
            raise ValueError(f"load_size ({load_size}) must be >= resolution ({resolution})")
        self.resolution = resolution
        self.load_size = load_size or resolution
        self.random_flip = random_flip
        self.random_crop = random_crop
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.images: list[Tensor] | None = None
        self.names: list[str] = []
        self.skipped: list[tuple[str, str]] = []  # (file, reason) of files that could not be used
        self._train_seed: int | None = None  # the run seed, kept in the checkpoint
        self._resume_position: dict[str, int] | None = None  # from a checkpoint, for the next train_dataloader

    # subclasses -----------------------------------------------------------
    def load_subset(self) -> tuple[list[Tensor], list[str]]:
        """The subset as (float [0, 1] images of any size, their names/paths), in index order."""
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        """The dataset the training loader reads, indexed by what :meth:`train_sampler` yields."""
        raise NotImplementedError

    def train_sampler(self, dataset: Dataset, seed: int, num_replicas: int, rank: int) -> ResumableShuffleSampler:
        """This rank's sampler of ``dataset``: by default every item once per epoch, shuffled."""
        return ResumableShuffleSampler(dataset, seed=seed, num_replicas=num_replicas, rank=rank)  # type: ignore[arg-type]

    def record_files(self, log_dir: Path) -> None:
        """Write what the run was trained on into ``log_dir`` (rank 0, with a logger): nothing by default."""

    # loading ----------------------------------------------------------------
    def prepare_images(self) -> None:
        """Load, resize to ``load_size`` and keep the subset as uint8 (once)."""
        if self.images is not None:
            return
        images, names = self.load_subset()
        if not images:
            raise ValueError(f"{type(self).__name__} found no training images")
        self.images = [to_uint8(TF.resize(im, self.load_size, antialias=True)) for im in images]
        self.names = list(names)

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "fit"):
            return  # only training reads the images
        self.prepare_images()
        self._record_skipped_in_hparams()
        self._record_files()

    def _record_skipped_in_hparams(self) -> None:
        """Count and name the skipped files in the hyper-parameters the logger records."""
        if self.skipped or "skipped_images" in self.hparams:
            self.record_hparams({"skipped_images": len(self.skipped),
                                 "skipped_files": [name for name, _ in self.skipped]})

    def record_hparams(self, record: dict[str, Any]) -> None:
        """Add ``record`` to the hyper-parameters the logger records (and the checkpoint keeps)."""
        self.hparams.update(record)
        if hasattr(self, "_hparams_initial"):  # what Lightning hands to the loggers after setup
            self._hparams_initial.update(record)

    def _record_files(self) -> None:
        """:meth:`record_files` into the log dir (rank 0; log_dir is called on all ranks). Not
        without a logger: ``log_dir`` would then be the working directory, and the subset is in
        the hyper-parameters and the checkpoint anyway."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.loggers:
            return
        log_dir = trainer.log_dir
        if trainer.is_global_zero and log_dir is not None:
            self.record_files(Path(log_dir))

    # datasets and loaders ----------------------------------------------------
    def reference_dataset(self) -> TrainingImages:
        """The training subset without augmentation (centre crop): what copies are searched in."""
        self.prepare_images()
        assert self.images is not None
        return TrainingImages(self.images, self.resolution, augment=False)

    def train_dataloader(self) -> DataLoader:
        """Ordered by :meth:`train_sampler` (a function of the run seed and the epoch, sharded over
        DDP ranks); a run resumed from a checkpoint starts after the batches that checkpoint had
        already trained on."""
        dataset = self.train_dataset()
        trainer = getattr(self, "trainer", None)
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        if self._train_seed is None:
            self._train_seed = run_seed()
        sampler = self.train_sampler(dataset, self._train_seed, shard.get("num_replicas", 1), shard.get("rank", 0))
        # the checkpoint's position (the datamodule is restored before any loader is built); else the
        # trainer's own count (a checkpoint without one, or a loader rebuilt during the fit)
        position = self._resume_position or (self.train_position() if trainer is not None else None)
        if position is not None:
            sampler.resume(position["epoch"], position["batches"] * self.batch_size)
            self._resume_position = None
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0, position=self.train_position)

    def train_position(self) -> dict[str, int]:
        """Where training stands in the loader: ``{"epoch", "batches"}`` already trained on in that
        epoch, from the trainer's count of all batches trained (every epoch has
        ``num_training_batches``; Lightning's per-epoch counters are not reliable after a resume)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {"epoch": 0, "batches": 0}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        per_epoch = trainer.num_training_batches
        if not isinstance(per_epoch, int) or per_epoch < 1:
            return {"epoch": int(trainer.fit_loop.epoch_progress.current.processed), "batches": 0}
        epoch, batches = divmod(done, per_epoch)
        return {"epoch": epoch, "batches": batches}

    # checkpoint ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"subset": list(self.names), "skipped": [list(entry) for entry in self.skipped]}
        if getattr(self, "trainer", None) is not None:
            state.update(train_seed=self._train_seed, train_position=self.train_position())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the loader position and seed of the checkpoint (resume: the next ``train_dataloader``
        continues there), and refuse to resume on a different training subset than it was trained on."""
        if state_dict.get("train_position") is not None:
            self._resume_position = dict(state_dict["train_position"])
            self._train_seed = state_dict.get("train_seed", self._train_seed)
        saved = list(state_dict.get("subset", []))
        if self.images is None or not saved:
            self.names = saved or self.names
            return
        if saved != self.names:
            changed = sum(a != b for a, b in zip(saved, self.names)) + abs(len(saved) - len(self.names))
            raise ValueError(
                f"checkpoint was trained on a different subset ({changed} of {len(saved)} images differ); "
                "use the same data, subset_size and subset_seed to resume"
            )


class TrainImagesDataModule(ResumableTrainData):
    """Base of the DDPM training datamodules: subclasses implement :meth:`load_subset`.

    Args:
        resolution: side of the square training crops.
        load_size: shorter side the images are resized to before cropping
            (default ``resolution``: square images are then not cropped at all).
        random_flip: random horizontal flips (the paper: on).
        random_crop: random crops of the resized images (the paper: on); off: centre crops.
        batch_size: images per training batch (per process under DDP).
        num_workers: dataloader workers.
        repeats: times the subset is listed per epoch.
        predict_num_samples: seeds yielded by ``predict_dataloader``.
        predict_first_seed: first of those seeds.
    """

    def __init__(self, resolution: int = 32, load_size: int | None = None, random_flip: bool = True,
                 batch_size: int = 16, num_workers: int = 0, repeats: int = 1,
                 predict_num_samples: int = 64, predict_first_seed: int = 0, random_crop: bool = True) -> None:
        super().__init__(resolution, load_size, random_flip, batch_size, num_workers, random_crop)
        self.repeats = repeats
        self.seeds = SeedDataset(predict_num_samples, predict_first_seed)

    def record_files(self, log_dir: Path) -> None:
        """``training_subset.tsv`` (index, path) and, when files were skipped, ``skipped_images.tsv``."""
        lines = [f"# {len(self.names)} training images chosen by {type(self).__name__} {dict(self.hparams)}",
                 "index\tpath"] + [f"{i}\t{name}" for i, name in enumerate(self.names)]
        write_text_atomic(log_dir / SUBSET_FILE, "\n".join(lines) + "\n")
        write_skipped_file(log_dir, self.skipped, type(self).__name__)

    def train_dataset(self) -> TrainingImages:
        self.prepare_images()
        assert self.images is not None
        return TrainingImages(self.images, self.resolution, augment=True, random_flip=self.random_flip,
                              repeats=self.repeats, random_crop=self.random_crop)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.seeds, batch_size=self.batch_size, shuffle=False)


def write_skipped_file(log_dir: Path, skipped: Sequence[tuple[str, str]], owner: str) -> None:
    """``skipped_images.tsv`` (path, reason) in ``log_dir`` when ``skipped`` is not empty."""
    if skipped:
        lines = [f"# {len(skipped)} image file(s) skipped by {owner} (not in the subset)",
                 "path\treason"] + [f"{name}\t{reason}" for name, reason in skipped]
        write_text_atomic(log_dir / SKIPPED_FILE, "\n".join(lines) + "\n")


class ImageFolderTrainData(TrainImagesDataModule):
    """A seeded subset of the images under ``root`` (recursively).

    Args:
        root: image folder (the only required argument of the paper configs).
        subset_size: N, the number of training images (None: every readable one).
        subset_seed: seed of the permutation the subset is drawn from.
        recursive: also list images in sub-folders.
        strict: stop at the first file that cannot be read (default: skip it, count it
            and name it in a warning, ``skipped_images.tsv`` and the hyper-parameters).
        **kwargs: see :class:`TrainImagesDataModule`.
    """

    def __init__(self, root: str, subset_size: int | None = None, subset_seed: int = 0,
                 recursive: bool = True, resolution: int = 64, load_size: int | None = None,
                 random_flip: bool = True, random_crop: bool = True, batch_size: int = 16, num_workers: int = 0,
                 repeats: int = 1, predict_num_samples: int = 64, predict_first_seed: int = 0,
                 strict: bool = False) -> None:
        super().__init__(resolution, load_size, random_flip, batch_size, num_workers, repeats,
                         predict_num_samples, predict_first_seed, random_crop)
        if subset_size is not None and subset_size < 1:
            raise ValueError(f"subset_size must be >= 1 or null (all images), got {subset_size}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.subset_size = subset_size
        self.subset_seed = subset_seed
        self.recursive = recursive
        self.strict = strict

    def load_subset(self) -> tuple[list[Tensor], list[str]]:
        listing = scan_images(self.root, recursive=self.recursive)
        files = listing.paths
        skipped: list[tuple[str, str]] = [(str(path), reason) for path, reason in listing.skipped]
        if skipped and self.strict:
            raise ImageLoadError(f"cannot load image {skipped[0][0]}: {skipped[0][1]} (strict)")
        if not files:
            raise ValueError(f"no images found under {self.root}")
        if self.subset_size is not None and self.subset_size > len(files):
            raise ValueError(f"subset_size {self.subset_size} is larger than the {len(files)} images under {self.root}")
        wanted = len(files) if self.subset_size is None else self.subset_size
        order = subset_order(len(files), self.subset_seed)
        chosen: dict[int, Tensor] = {}
        progress = tqdm(total=wanted, desc=f"loading {wanted} training images", leave=False)
        for row in order:
            if len(chosen) == wanted:
                break
            try:  # strict: the error names the file and ends the run; else a counted skip
                image = load_image(files[row], strict=True)
            except ImageLoadError as error:
                if self.strict:
                    raise
                skipped.append((str(files[row]), str(error).removeprefix(f"cannot load image {files[row]}: ")))
                continue
            assert image is not None
            chosen[row] = image
            progress.update(1)
        progress.close()
        self.skipped = skipped
        if skipped:
            names = [name for name, _ in skipped]
            warnings.warn(f"{len(skipped)} unreadable image file(s) under {self.root} skipped"
                          f"{' and replaced in the subset' if self.subset_size is not None else ''}: "
                          f"{shorten(names)} (listed in {SKIPPED_FILE} in the log dir)", UserWarning, stacklevel=2)
        if not chosen:
            raise UserError(f"none of the {len(files)} images under {self.root} could be read "
                            f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
        if len(chosen) < wanted and self.subset_size is not None:
            raise UserError(f"subset_size {wanted} cannot be met: only {len(chosen)} of the {len(files)} images under "
                            f"{self.root} could be read ({len(skipped)} skipped, e.g. {skipped[0][0]}); lower "
                            "subset_size, or set it to null to train on every readable image")
        rows = sorted(chosen)
        return [chosen[r] for r in rows], [str(files[r]) for r in rows]


class ProceduralTrainData(TrainImagesDataModule):
    """``num_images`` procedural scenes (``datamodules.procedural``).

    Args:
        num_images: N, the number of training images.
        seed: scene seed (scene i is ``ProceduralScenes(seed=seed)[i]``).
        render_size: size the scenes are drawn at before the antialiased resize to
            ``load_size`` (default ``load_size``: drawn directly, with aliased edges and
            stripes at small sizes; a larger value gives smoother, photo-like pixels).
        **kwargs: see :class:`TrainImagesDataModule`.
    """

    def __init__(self, num_images: int = 32, seed: int = 0, render_size: int | None = None, resolution: int = 32,
                 load_size: int | None = None, random_flip: bool = True, random_crop: bool = True,
                 batch_size: int = 16, num_workers: int = 0, repeats: int = 1, predict_num_samples: int = 64,
                 predict_first_seed: int = 0) -> None:
        super().__init__(resolution, load_size, random_flip, batch_size, num_workers, repeats,
                         predict_num_samples, predict_first_seed, random_crop)
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if render_size is not None and render_size < 1:
            raise ValueError(f"render_size must be >= 1, got {render_size}")
        self.save_hyperparameters()
        self.scenes = ProceduralScenes(num_images, size=render_size or self.load_size, seed=seed)

    def load_subset(self) -> tuple[list[Tensor], list[str]]:
        items = [self.scenes[i] for i in range(len(self.scenes))]
        return [item["image"] for item in items], [item["path"] for item in items]


def subset_order(count: int, seed: int) -> list[int]:
    """The seeded permutation of ``range(count)`` that subsets are drawn from (prefixes nest:
    the N=100 subset is contained in the N=1083 subset of the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator).tolist()


