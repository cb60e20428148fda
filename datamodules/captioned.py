"""Captioned training images for a text-conditioned diffusion model, with controlled duplication
and the caption-side mitigations of the follow-up study ("Understanding and Mitigating Copying
in Diffusion Models", Somepalli et al., NeurIPS 2023).

:class:`CaptionedImageDataModule` reads an image folder with ``.txt`` sidecars, a ``.csv`` /
``.jsonl`` / ``.tsv`` list of (file, caption) rows or webdataset tars
(:mod:`datamodules.caption_sources`), or renders ``procedural`` scenes captioned from their own
parameters (:mod:`datamodules.scene_captions`). Images are kept in memory as uint8 (shorter side
``load_size``) and served as float [0, 1] ``resolution`` squares (centre crop and no flip by
default: a flip would contradict "to the left of" in a caption), like the DDPM data
(:class:`datamodules.images.ResumableTrainData`, whose loader, resume and skipped-image records
this module shares).

**Epochs and draws.** Training draws images with replacement, image ``i`` with probability
``w_i / sum(w)``: ``w_i = dup_weight`` for the duplicated images (a seeded choice of
``dup_fraction`` of them, :mod:`datamodules.caption_draws`), 1 for the others. An epoch is
``ceil(repeats * sum(w))`` draws, so an image is drawn ``repeats * w_i`` times an epoch in
expectation (the study's code draws ``len(dataset)`` per epoch; only the epoch boundary differs).
The epoch's global sequence is a function of ``(draw seed, epoch)``; under DDP each rank takes
every ``world_size``-th position (:class:`datamodules.samplers.WeightedResumableSampler`), so one
process and two see the same draws, and a resumed run continues the uninterrupted one.
Each draw's crop and caption come from ``derive_seed(draw seed, epoch, position)``.

**Batches** (the contract of the text-conditioned modules)::

    {"image": float [B, 3, R, R] in [0, 1], "caption": list[str] (after the caption mitigations),
     "key": list[str], "index": LongTensor (the draw's global index, epoch * epoch_draws + position),
     "duplicated": BoolTensor}

**Records.** At ``setup("fit")`` with a logger, rank 0 writes ``training_images/``,
``training_captions.csv``, ``skipped_images.tsv`` and ``training_records.json`` into the log
folder (:mod:`datamodules.training_records`); :meth:`CaptionedImageDataModule.write_training_records`
does the same anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.caption_draws import (
    CaptionDraws,
    CaptionPolicy,
    DupCaption,
    ReplacementSource,
    check_duplication,
    duplicated_rows,
    sampling_weights,
)
from datamodules.caption_sources import CaptionedSet, procedural_set, read_captioned
from datamodules.images import ResumableTrainData, TrainingImages
from datamodules.samplers import WeightedResumableSampler
from datamodules.scene_captions import MAX_CAPTIONS
from datamodules.training_records import TrainingRecords
from datamodules.training_records import write_training_records as write_records
from lit.errors import UserError
from lit.io import to_uint8
from lit.seeding import derive_seed


class CaptionedDraws(Dataset):
    """The items of :class:`CaptionedImageDataModule`'s training loader, asked for by
    ``(row, draw index, draw seed)`` (what :class:`WeightedResumableSampler` yields)."""

    def __init__(self, images: TrainingImages, keys: Sequence[str], draws: CaptionDraws) -> None:
        self.images = images
        self.keys = list(keys)
        self.draws = draws

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        row, index, seed = item
        return {"image": self.images[(row, seed)]["image"],
                "caption": self.draws.draw(row, derive_seed(seed, "caption")).text,
                "key": self.keys[row], "index": index, "duplicated": self.draws.duplicated[row]}


class CaptionedImageDataModule(ResumableTrainData):
    """Captioned images with controlled duplication and caption mitigations (see the module docstring).

    Args:
        source: an image folder with ``NAME.txt`` caption sidecars (a caption a line), a ``.csv`` /
            ``.jsonl`` / ``.tsv`` list of (file, caption) rows, a ``.tar`` shard, a folder of them or
            a pattern such as ``shards/{00000..00009}.tar``. Not with ``procedural``.
        procedural: instead of ``source``, render this many procedural scenes captioned from their
            parameters.
        procedural_captions: paraphrased captions per procedural scene (1 to 8; the first is canonical).
        seed: the data seed: the procedural scenes and which images are duplicated.
        render_size: side the procedural scenes are drawn at before resizing to ``load_size``
            (default ``load_size``).
        caption_column: caption column of a ``.csv`` / ``.jsonl`` list (default: caption, text or prompt).
        file_column: file column of a list (default: file, path, image or filename).
        resolution: side of the square training images.
        load_size: shorter side the images are resized to (default ``resolution``).
        random_flip: random horizontal flips (off: captions may say left and right).
        random_crop: random crops of the resized images; off: centre crops.
        dup_fraction: share of the images that are duplicated (at least one when > 0).
        dup_weight: how many times as often a duplicated image is drawn.
        dup_caption: ``same``: a duplicated image always trains with its first caption; ``varied``:
            each draw picks one of its captions at random.
        captions_per_image: mitigation: every draw picks one of the image's first this-many captions
            at random (null: all of them); 1: the first caption only.
        caption_replacement: mitigation: probability that a draw's caption is replaced.
        replacement_source: ``random_words``: ``replacement_words`` random words of the captions'
            vocabulary (the study's code); ``dataset_caption``: a random caption of the set.
        replacement_words: words of a ``random_words`` replacement.
        token_addition: mitigation: probability that random vocabulary words are inserted.
        token_addition_count: words inserted by token addition.
        word_repetition: mitigation: probability that words of the caption are repeated.
        word_repetition_count: words repeated by word repetition.
        repeats: an epoch is ``ceil(repeats * sum of the sampling weights)`` draws.
        batch_size: draws per training batch (per process under DDP).
        num_workers: dataloader workers.
        draw_seed: seed of the draws, crops and caption changes (default: the run's seed,
            ``seed_everything``, like the DDPM data).
        strict: stop at the first image that cannot be used (default: skip it, count it and list
            it in ``skipped_images.tsv``, ``training_records.json`` and the hyper-parameters).
    """

    def __init__(self, source: str | None = None, procedural: int | None = None, procedural_captions: int = 5,
                 seed: int = 0, render_size: int | None = None, caption_column: str | None = None,
                 file_column: str | None = None, resolution: int = 32, load_size: int | None = None,
                 random_flip: bool = False, random_crop: bool = False, dup_fraction: float = 0.0,
                 dup_weight: float = 5.0, dup_caption: DupCaption = "same", captions_per_image: int | None = 1,
                 caption_replacement: float = 0.0, replacement_source: ReplacementSource = "random_words",
                 replacement_words: int = 4, token_addition: float = 0.0, token_addition_count: int = 2,
                 word_repetition: float = 0.0, word_repetition_count: int = 2, repeats: int = 1,
                 batch_size: int = 16, num_workers: int = 0, draw_seed: int | None = None,
                 strict: bool = False) -> None:
        super().__init__(resolution, load_size, random_flip, batch_size, num_workers, random_crop)
        if (source is None) == (procedural is None):
            raise UserError("give exactly one of source (a folder, list or tars) and procedural (a number of scenes)")
        if procedural is not None and procedural < 1:
            raise UserError(f"procedural must be >= 1 scenes, got {procedural}")
        if not 1 <= procedural_captions <= MAX_CAPTIONS:
            raise UserError(f"procedural_captions must be in 1..{MAX_CAPTIONS}, got {procedural_captions}")
        if render_size is not None and render_size < 1:
            raise UserError(f"render_size must be >= 1, got {render_size}")
        if repeats < 1:
            raise UserError(f"repeats must be >= 1, got {repeats}")
        self.policy = CaptionPolicy(dup_caption, captions_per_image, caption_replacement, replacement_source,
                                    replacement_words, token_addition, token_addition_count, word_repetition,
                                    word_repetition_count)
        check_duplication(dup_fraction, dup_weight)
        self.save_hyperparameters()
        self.source, self.procedural, self.procedural_captions = source, procedural, procedural_captions
        self.seed, self.render_size = seed, render_size
        self.caption_column, self.file_column = caption_column, file_column
        self.dup_fraction, self.dup_weight, self.repeats, self.strict = dup_fraction, dup_weight, repeats, strict
        self._train_seed = draw_seed
        self.keys: list[str] = []
        self.sources: list[str] = []
        self.draws: CaptionDraws | None = None
        self.weights: list[float] = []

    # loading ----------------------------------------------------------------
    def prepare_images(self) -> None:
        """Read the source (resizing each image as it loads), choose the duplicated images (once)."""
        if self.images is not None:
            return
        data = self._read()
        duplicated = duplicated_rows(data.keys, self.dup_fraction, self.seed)
        self.draws = CaptionDraws(data.captions, duplicated, self.policy)
        self.weights = sampling_weights(duplicated, self.dup_weight)
        self.keys, self.sources, self.skipped = data.keys, data.sources, data.skipped
        self.names = list(data.keys)
        self.images = data.images

    def _read(self) -> CaptionedSet:
        def store(image: Tensor) -> Tensor:
            return to_uint8(TF.resize(image, self.load_size, antialias=True))

        if self.procedural is not None:
            return procedural_set(self.procedural, store, seed=self.seed, size=self.render_size or self.load_size,
                                  captions=self.procedural_captions)
        assert self.source is not None
        return read_captioned(self.source, store, strict=self.strict, caption_column=self.caption_column,
                              file_column=self.file_column)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit"):
            self.record_hparams({"training_images": len(self.keys), "duplicated_images": self.duplicated_count,
                                 "epoch_draws": self.epoch_draws})

    @property
    def duplicated_count(self) -> int:
        """How many images are duplicated."""
        return sum(self.draws.duplicated) if self.draws is not None else 0

    @property
    def epoch_draws(self) -> int:
        """Draws per epoch over all processes: ``ceil(repeats * sum of the sampling weights)``."""
        self.prepare_images()
        return max(1, math.ceil(self.repeats * sum(self.weights) - 1e-9))

    # datasets and loaders ----------------------------------------------------
    def train_dataset(self) -> CaptionedDraws:
        self.prepare_images()
        assert self.images is not None and self.draws is not None
        images = TrainingImages(self.images, self.resolution, augment=True, random_flip=self.random_flip,
                                random_crop=self.random_crop)
        return CaptionedDraws(images, self.keys, self.draws)

    def train_sampler(self, dataset: Dataset, seed: int, num_replicas: int, rank: int) -> WeightedResumableSampler:
        """Weighted draws with replacement, ``epoch_draws`` an epoch over all ranks."""
        return WeightedResumableSampler(self.weights, self.epoch_draws, seed=seed, num_replicas=num_replicas, rank=rank)

    def monitor_pairs(self, count: int, seed: int) -> list[tuple[str, str, bool]]:
        """``count`` fixed ``(key, caption, duplicated)`` training captions for a replication monitor: half
        from the duplicated images and half from the unique ones when duplication is on
        (:meth:`datamodules.caption_draws.CaptionDraws.monitor_pairs`)."""
        self.prepare_images()
        assert self.draws is not None
        return self.draws.monitor_pairs(self.keys, count, seed)

    # records -------------------------------------------------------------------
    def write_training_records(self, folder: str | Path) -> dict[str, Any]:
        """Write ``training_images/``, ``training_captions.csv``, ``skipped_images.tsv`` and
        ``training_records.json`` into ``folder`` (:mod:`datamodules.training_records`)."""
        self.prepare_images()
        assert self.images is not None and self.draws is not None
        options = {**dict(self.hparams), "epoch_draws": self.epoch_draws}
        return write_records(folder, TrainingRecords(self.keys, self.sources, self.images, self.weights, self.draws,
                                                     self.skipped, type(self).__name__, options))

    def record_files(self, log_dir: Path) -> None:
        self.write_training_records(log_dir)

    # checkpoint ------------------------------------------------------------
    def fingerprint(self) -> str:
        """SHA-256 of the keys, captions, duplicated images and weights (a resume must match it)."""
        self.prepare_images()
        assert self.draws is not None
        payload = json.dumps([self.keys, self.draws.captions, self.draws.duplicated, self.weights])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.images is not None:
            state["captions_sha256"] = self.fingerprint()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base; also refuses a checkpoint trained on other captions or another duplication."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("captions_sha256")
        if saved is not None and self.images is not None and saved != self.fingerprint():
            raise ValueError("checkpoint was trained on other captions or other duplicated images; use the same "
                             "source, seed, dup_fraction and dup_weight to resume")


__all__ = ["CaptionedDraws", "CaptionedImageDataModule"]
