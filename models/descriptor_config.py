"""One object that names a descriptor for every caller of the suite.

The evaluator (``lit test``), the replication monitor, the retrieval-metrics
callback and ``lit scan`` all take the same :class:`DescriptorConfig`: which
registry entry, which local weights file, which input size and which
similarity. It builds the descriptor and describes it for ``metrics.json``,
store manifests and reports (with the weights file's SHA-256), so a run
records exactly what was measured and a random-init run can never pass for
the real descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from lit.files import file_sha256
from lit.similarity import SimilarityKind, TokenNormalization
from models.extractors import Descriptor, build_descriptor, resolve_spec

SimilarityChoice = Literal["auto", "cosine", "split_product"]


@dataclass(frozen=True)
class DescriptorConfig:
    """A descriptor as a user names it: registry ``name``, local ``weights``, ``input_size``, similarity.

    Args:
        name: registry name (``models.extractors.available_descriptors``).
        weights: local weights file (none for ``pixel``).
        random_init: random weights instead of a file (tests, floors); recorded, and
            reported under ``<name> (random init)``.
        input_size: override of the descriptor's input resolution.
        similarity: ``auto`` takes the descriptor's default (split-product for tokens).
        token_normalization: normalisation for split-product (see ``lit.similarity``).
    """

    name: str = "pixel"
    weights: str | None = None
    random_init: bool = False
    input_size: int | None = None
    similarity: SimilarityChoice = "auto"
    token_normalization: TokenNormalization = "token"

    def build(self) -> Descriptor:
        """The descriptor in eval mode (weights read from the local file, or random when asked)."""
        return build_descriptor(
            self.name, weights=self.weights, random_init=self.random_init, input_size=self.input_size
        )

    def resolved_similarity(self, descriptor: Descriptor | None = None) -> SimilarityKind:
        """The similarity actually used: ``similarity``, or the descriptor's default for ``auto``."""
        if descriptor is not None:
            return descriptor.similarity_for(self.similarity)
        if self.similarity != "auto":
            return self.similarity  # type: ignore[return-value]
        return resolve_spec(self.name, self.weights).default_similarity

    @property
    def display_name(self) -> str:
        """The name a report shows: random-init runs are labelled as such."""
        return f"{self.name} (random init)" if self.random_init else self.name

    def record(self, descriptor: Descriptor | None = None) -> dict[str, Any]:
        """What was measured, for metrics.json, manifests and reports (JSON-serialisable)."""
        built = descriptor
        if built is not None:
            preprocessing = built.preprocessing
        else:  # mocov3: read from the weights file's metadata
            preprocessing = resolve_spec(self.name, self.weights).preprocessing
        size = self.input_size if self.input_size is not None else preprocessing.input_size
        return {
            "name": self.name,
            "display_name": self.display_name,
            "weights": None if self.weights is None else str(Path(self.weights).expanduser().resolve()),
            "weights_sha256": None if self.weights is None else file_sha256(self.weights),
            "random_init": self.random_init,
            "input_size": size,
            "preprocessing": replace(preprocessing, input_size=size).describe(),
            "similarity": self.resolved_similarity(built),
            "token_normalization": self.token_normalization,
        }
