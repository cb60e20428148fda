"""The descriptor as one option group: what every caller of the suite takes to name a descriptor.

``lit test`` (:class:`models.retrieval.RetrievalEvaluator`), extraction to a feature store
(:class:`models.extract.DescriptorExtractor`), ``lit scan`` and the replication monitor each
take one ``descriptor: DescriptorConfig`` argument: the registry ``name``, a local ``weights``
file, ``random_init`` (with its ``seed``), an ``input_size`` override and the
``token_normalization`` of split-product. In YAML ``descriptor: {name: dino_vit_b16, weights: /path}``; on the command
line ``--model.init_args.descriptor.name ...`` (LightningCLI) or ``lit scan --descriptor.name
... --descriptor.weights ...``. (The retrieval-metrics callback takes none: it measures the
descriptor of the module being trained.)

The similarity is not an option: the features decide it (cosine for global ``(B, D)``
features, split-product for token ``(B, T, D)`` features, :func:`models.descriptor.similarity_of`).
:meth:`DescriptorConfig.record` says what was measured, for ``metrics.json``, store manifests
and reports (weights file and its SHA-256, preprocessing, the similarity used), so a
random-init run can never pass for the real descriptor; :meth:`DescriptorConfig.differences`
is the one comparison of two such records (feature stores refuse features they cannot be
compared with).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, get_args

from lit.choices import SimilarityKind, TokenNormalization
from lit.errors import UserError
from lit.files import file_sha256
from models.descriptor import Descriptor, similarity_of
from models.descriptor_options import DescriptorOptions
from models.registry import build_descriptor, check_input_size, get_spec, resolve_spec
from models.weights import WeightsError, weights_error


@dataclass(frozen=True)
class DescriptorConfig(DescriptorOptions):
    """A descriptor as a user names it; refuses, at construction, what can be known wrong without building it.

    The fields (``name``, ``weights``, ``random_init``, ``seed``, ``input_size``,
    ``token_normalization``) and their documentation are :class:`models.descriptor_options.DescriptorOptions`'s,
    torch-free so that ``lit scan --help`` shows them without loading torch; this class checks them
    against the registry, builds the descriptor and records what was measured.

    A mistake raises a one-line :class:`lit.errors.UserError` that names the option
    (``descriptor.weights: weights file not found: ...``).
    """

    #: Fields of :meth:`record` that decide the features: two records that agree on all of them
    #: describe features that can be searched against each other (see :meth:`differences`).
    COMPARED: ClassVar[tuple[str, ...]] = (
        "name", "weights_sha256", "random_init", "seed", "input_size", "preprocessing", "similarity", "token_normalization",
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # the name, against the registry's names
        spec = get_spec(self.name)
        if self.weights is not None:
            if spec.weights is None:
                raise UserError(f"descriptor.weights: descriptor {self.name!r} takes no weights, got {self.weights}")
            if self.random_init:
                raise UserError("descriptor.weights: give either weights or random_init, not both")
            if not Path(self.weights).expanduser().is_file():
                missing = weights_error(self.weights, spec.weights, "weights file not found")
                raise WeightsError(f"descriptor.weights: {missing}")
        elif spec.weights is not None and not self.random_init:
            problem = f"descriptor {self.name!r} needs a weights file (or random_init for random features)"
            raise WeightsError(f"descriptor.weights: {weights_error(None, spec.weights, problem)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"descriptor.seed: must be an integer >= 0, got {self.seed!r}")
        if self.seed != 0 and not self.random_init:
            raise UserError(f"descriptor.seed: a seed ({self.seed}) is only used with random_init true")
        if self.input_size is not None:
            try:  # a ``lit export`` file's patch size is checked when the file is read (build)
                check_input_size(spec if spec.from_weights is None else replace(spec, size_multiple=1), self.input_size)
            except ValueError as error:
                raise UserError(f"descriptor.input_size: {error}") from None
        modes = get_args(TokenNormalization)
        if self.token_normalization not in modes:
            raise UserError(f"descriptor.token_normalization: must be one of {', '.join(modes)}, "
                            f"got {self.token_normalization!r}")

    @classmethod
    def of(cls, options: DescriptorOptions) -> DescriptorConfig:
        """``options`` (e.g. parsed by ``lit scan`` without torch) as a config, checked against the registry."""
        if isinstance(options, cls):
            return options
        return cls(**{field.name: getattr(options, field.name) for field in fields(options)})

    def build(self) -> Descriptor:
        """The descriptor in eval mode (weights read from the local file, or random when asked)."""
        try:
            return build_descriptor(self.name, weights=self.weights, random_init=self.random_init,
                                    input_size=self.input_size, seed=self.seed)
        except UserError:
            raise
        except ValueError as error:  # an input size the architecture cannot take, a file timm cannot build
            raise UserError(f"descriptor {self.name}: {error}") from error

    def resolved_similarity(self, descriptor: Descriptor | None = None) -> SimilarityKind:
        """The similarity these features are compared with, from their kind (``similarity_of``):
        the built ``descriptor``'s, else the registry's (``mocov3``: the weights file's)."""
        if descriptor is not None:
            return descriptor.similarity
        return similarity_of(resolve_spec(self.name, self.weights).output)

    @property
    def display_name(self) -> str:
        """The name a report shows: random-init runs are labelled as such."""
        return f"{self.name} (random init)" if self.random_init else self.name

    def record(self, descriptor: Descriptor | None = None) -> dict[str, Any]:
        """What was measured, for metrics.json, manifests and reports (JSON-serialisable).

        ``similarity`` is the one the features' kind implies (what every search used)."""
        if descriptor is not None:
            preprocessing = descriptor.preprocessing
        else:  # mocov3: read from the weights file's metadata
            preprocessing = resolve_spec(self.name, self.weights).preprocessing
        size = self.input_size if self.input_size is not None else preprocessing.input_size
        return {
            "name": self.name,
            "display_name": self.display_name,
            "weights": None if self.weights is None else str(Path(self.weights).expanduser().resolve()),
            "weights_sha256": None if self.weights is None else file_sha256(self.weights),
            "random_init": self.random_init,
            "seed": self.seed if self.random_init else None,
            "input_size": size,
            "preprocessing": replace(preprocessing, input_size=size).describe(),
            "similarity": self.resolved_similarity(descriptor),
            "token_normalization": self.token_normalization,
        }

    @classmethod
    def compared(cls, record: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of ``record`` that decide the features (:data:`COMPARED`), e.g. to name a store by them."""
        return {field: record.get(field) for field in cls.COMPARED}

    @classmethod
    def differences(cls, ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
        """How two :meth:`record` s differ where it matters (``"input_size 32 vs 16"``, ...); empty when
        features made under one can be searched against features made under the other."""
        return [f"{field} {ours.get(field)!r} vs {theirs.get(field)!r}"
                for field in cls.COMPARED if ours.get(field) != theirs.get(field)]
