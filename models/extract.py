"""The descriptor as a LightningModule for ``lit predict``: batches of images -> features for a store.

``predict_step`` embeds a batch of :mod:`datamodules.extraction_inputs` and returns the features
(float32 on the CPU, whatever the trainer's precision) with the batch's keys, captions,
labels and shard, for :class:`callbacks.store_writer.StoreWriterCallback` to write.

Precision: ``--trainer.precision bf16-mixed`` runs the backbone in bfloat16 (about 7x faster
than float32 for a ViT-B on an H200); ``precision: auto`` (the default) does the same on a
CUDA device with bfloat16 support when the trainer itself runs in float32, and keeps float32
on the CPU. Features are always cast to float32 before they are stored (as float16 by default).
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from lit.errors import UserError
from lit.similarity import TokenNormalization
from models.descriptor_config import DescriptorConfig, SimilarityChoice
from models.extractors import Preprocessing

ExtractPrecision = Literal["auto", "32", "bf16"]


class DescriptorExtractor(pl.LightningModule):
    """Embeds images with a descriptor for a feature store (no training).

    Args:
        descriptor: registry name (``pixel``, ``sscd_resnet50``, ``dino_vit_b16``, ...).
        weights: local weights file (none for ``pixel``).
        random_init: random weights instead of a file (tests, floors; recorded in the store).
        input_size: override of the descriptor's input resolution.
        similarity: the similarity the store is meant for (``auto``: the descriptor's default).
        token_normalization: token normalisation for split-product (recorded).
        precision: ``auto`` (bfloat16 autocast on CUDA when the trainer runs in float32),
            ``32`` (never autocast here) or ``bf16`` (always autocast to bfloat16).
    """

    def __init__(
        self,
        descriptor: str = "pixel",
        weights: str | None = None,
        random_init: bool = False,
        input_size: int | None = None,
        similarity: SimilarityChoice = "auto",
        token_normalization: TokenNormalization = "token",
        precision: ExtractPrecision = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = DescriptorConfig(descriptor, weights, random_init, input_size, similarity, token_normalization)
        try:
            self.descriptor = self.config.build()
        except ValueError as error:  # unknown name, bad input size, weights given to pixel...
            raise UserError(str(error)) from error
        self.descriptor.requires_grad_(False)
        self.precision_choice: ExtractPrecision = precision
        self._feature_shape: tuple[int, ...] | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        return self.descriptor.preprocessing

    def record(self) -> dict[str, Any]:
        """The descriptor's record for the store manifest (``DescriptorConfig.record``)."""
        return self.config.record(self.descriptor)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """``(D,)`` or ``(T, D)``, from one forward pass of a blank image (computed once)."""
        if self._feature_shape is None:
            size = self.preprocessing.input_size
            with torch.inference_mode():
                probe = self.descriptor.embed_cropped(torch.zeros(1, 3, size, size))  # moved to the weights' device
            self._feature_shape = tuple(probe.shape[1:])
        return self._feature_shape

    def autocast_dtype(self) -> torch.dtype | None:
        """bfloat16 when this module itself should autocast (see ``precision``), else None."""
        if self.precision_choice == "bf16":
            return torch.bfloat16
        if self.precision_choice == "32" or self.device.type != "cuda":
            return None
        trainer_precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if trainer_precision not in ("32", "32-true") or not torch.cuda.is_bf16_supported():
            return None
        return torch.bfloat16

    def effective_precision(self) -> str:
        """What the features were computed in, for the manifest."""
        trainer_precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return "bf16-autocast" if self.autocast_dtype() is not None else trainer_precision

    def forward(self, images: Tensor | list[Tensor]) -> Tensor:
        if isinstance(images, Tensor):
            return self.descriptor.embed_cropped(images)
        return self.descriptor(images)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        images = batch["images"]
        if len(batch["keys"]) == 0:
            features = torch.empty(0, *self.feature_shape)
        else:
            if isinstance(images, Tensor):
                images = images.to(self.device, non_blocking=True)
            dtype = self.autocast_dtype()
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                features = self(images)
            features = features.float().cpu()
        return {**{k: v for k, v in batch.items() if k != "images"}, "features": features}
