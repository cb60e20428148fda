"""The Descriptor module: preprocessing + a backbone, images in [0, 1] -> features.

A :class:`Descriptor` owns its preprocessing (:mod:`models.preprocessing`) and maps
float images in [0, 1] -- a (B, 3, H, W) batch or a list of differently sized
(3, H, W) tensors -- to L2-normalised global features (B, D) or raw token features
(B, T, D). The output kind decides the similarity (:func:`similarity_of`): cosine for
global features, split-product for tokens (whose token normalisation is chosen at
search time, see ``lit.similarity``). Descriptors are built by :mod:`models.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit.choices import SimilarityKind
from models.preprocessing import Preprocessing, center_crop, check_images, resize_short_side

__all__ = ["Descriptor", "OutputKind", "similarity_of"]

OutputKind = Literal["global", "tokens"]


def similarity_of(output: OutputKind) -> SimilarityKind:
    """The similarity features of this kind are compared with (the paper's pairing): split-product
    for token features, cosine for global ones. The only place this choice is made."""
    return "split_product" if output == "tokens" else "cosine"


class Descriptor(nn.Module):
    """Preprocessing + backbone: images in [0, 1] -> (B, D) L2-normalised or (B, T, D) float32 features."""

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        output: OutputKind,
        preprocessing: Preprocessing,
    ) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.output: OutputKind = output
        self.preprocessing = preprocessing
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    @property
    def similarity(self) -> SimilarityKind:
        """How these features are compared: :func:`similarity_of` the output kind."""
        return similarity_of(self.output)

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def preprocess(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """Float images in [0, 1] -> normalised (B, 3, S, S) on the module's device."""
        groups = check_images(images)
        spec = self.preprocessing
        crops = [
            center_crop(
                resize_short_side(group.to(self.mean.device, self.mean.dtype), spec.resize_size, spec.interpolation),
                spec.input_size,
            )
            for group in groups
        ]
        batch = crops[0] if len(crops) == 1 else torch.cat(crops)
        return (batch - self.mean) / self.std

    def forward(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        return self._features(self.preprocess(images))

    def embed_cropped(self, crops: Tensor) -> Tensor:
        """Features of (B, 3, S, S) images in [0, 1] already resized and centre-cropped as
        :meth:`preprocess` would (e.g. in data-loader workers): normalise, then the backbone."""
        if crops.ndim != 4 or tuple(crops.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"expected crops of shape (B, 3, {self.input_size}, {self.input_size}), "
                             f"got {tuple(crops.shape)}")
        return self._features((crops.to(self.mean.device, self.mean.dtype) - self.mean) / self.std)

    def _features(self, x: Tensor) -> Tensor:
        features = self.backbone.forward_features(x) if self.output == "tokens" else self.backbone(x)
        features = features.float()
        if self.output == "global":
            if features.ndim != 2:
                raise RuntimeError(f"{self.name}: backbone returned shape {tuple(features.shape)}, expected (B, D)")
            return F.normalize(features, dim=-1)
        if features.ndim != 3:
            raise RuntimeError(f"{self.name}: backbone returned shape {tuple(features.shape)}, expected (B, T, D)")
        return features

    def extra_repr(self) -> str:
        return f"name={self.name!r}, output={self.output!r}, {self.preprocessing.describe()}"
