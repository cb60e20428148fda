"""The descriptor as a LightningModule for ``lit predict``: batches of images -> features for a store.

``predict_step`` embeds a batch of :mod:`datamodules.extraction_inputs` through the suite's one
embedding path (:class:`lit.embedding.Embedder`) and returns the features (float32 on the CPU,
whatever the trainer's precision) with the batch's keys, captions, labels and shard, for
:class:`callbacks.store_writer.StoreWriterCallback` to write.

Precision: ``--trainer.precision bf16-mixed`` runs the backbone in bfloat16 (about 7x faster
than float32 for a ViT-B on an H200); ``precision: auto`` (the default) does the same on a
CUDA device with bfloat16 support when the trainer itself runs in float32, and keeps float32
on the CPU. Features are always cast to float32 before they are stored (as float16 by default).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lit.embedding import Embedder, Precision, autocast_dtype, step_precision
from models.descriptor_config import DescriptorConfig
from models.preprocessing import Preprocessing


class DescriptorExtractor(pl.LightningModule):
    """Embeds images with a descriptor for a feature store (no training).

    Args:
        descriptor: the descriptor (:class:`models.descriptor_config.DescriptorConfig`: registry
            name, weights file, random init, input size, token normalisation; all recorded in
            the store's manifest).
        precision: ``auto`` (bfloat16 autocast on CUDA when the trainer runs in float32),
            ``32`` (never autocast here) or ``bf16`` (always autocast to bfloat16).
    """

    def __init__(
        self,
        descriptor: DescriptorConfig = DescriptorConfig(),  # noqa: B008 - frozen; LightningCLI shows it
        precision: Precision = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(descriptor, DescriptorConfig):
            raise TypeError(f"descriptor must be a models.descriptor_config.DescriptorConfig, "
                            f"got {type(descriptor).__name__}")
        self.save_hyperparameters()
        self.config = descriptor
        self.descriptor = descriptor.build()
        self.descriptor.requires_grad_(False)
        self.precision_choice: Precision = precision
        self._feature_shape: tuple[int, ...] | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        return self.descriptor.preprocessing

    def record(self) -> dict[str, Any]:
        """The descriptor's record for the store manifest (``DescriptorConfig.record``)."""
        return self.config.record(self.descriptor)

    def embedder(self, device: torch.device | None = None) -> Embedder:
        """The suite's one embedding path for this module (on ``device``, default its own; precision
        as chosen, in this trainer)."""
        precision = step_precision(self.precision_choice, self._trainer_precision())
        return Embedder(self, self.device if device is None else device, precision)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """``(D,)`` or ``(T, D)``, from one forward pass of a blank crop (computed once; where the
        weights are: in ``setup`` Lightning already reports the target device, the weights are not there yet)."""
        if self._feature_shape is None:
            size = self.preprocessing.input_size
            probe = self.embedder(self.descriptor.mean.device)
            self._feature_shape = probe.feature_shape(torch.zeros(1, 3, size, size))
        return self._feature_shape

    def _trainer_precision(self) -> str:
        return str(self.trainer.precision) if self._trainer is not None else "32-true"

    def effective_precision(self) -> str:
        """What the features were computed in, for the manifest."""
        precision = step_precision(self.precision_choice, self._trainer_precision())
        return "bf16-autocast" if autocast_dtype(self.device, precision) is not None else self._trainer_precision()

    def forward(self, images: Tensor | list[Tensor]) -> Tensor:
        if isinstance(images, Tensor):
            return self.descriptor.embed_cropped(images)
        return self.descriptor(images)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        if len(batch["keys"]) == 0:
            features = torch.empty(0, *self.feature_shape)
        else:
            features = self.embedder()(batch["images"]).cpu()
        return {**{k: v for k, v in batch.items() if k != "images"}, "features": features}
