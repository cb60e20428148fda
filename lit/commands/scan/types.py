"""The two records of a scan: its options (:class:`ScanOptions`) and what it found (:class:`ScanResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lit.choices import DEFAULT_THRESHOLDS, DUPLICATE_THRESHOLD, MATCH_MIRRORS, TokenNormalization
from lit.commands.scan.analysis import ClassSimilarity
from lit.commands.scan.approx import IndexOptions
from lit.replication import Matches, RowSample


@dataclass(frozen=True)
class ScanOptions:
    """The knobs of the analysis (everything but where the features come from).

    The similarity follows the features' shape (cosine for (D,), split-product for (T, D));
    ``match_mirrors`` and ``baseline_sample`` (``None``: exact) mean what they mean in
    :mod:`lit.replication`, with the monitor's defaults.
    """

    k: int = 5
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    token_normalization: TokenNormalization = "token"
    match_mirrors: bool = MATCH_MIRRORS
    baseline_sample: int | None = None
    random_sample: int = 1000
    class_sample: int = 1000
    duplicate_threshold: float = DUPLICATE_THRESHOLD
    seed: int = 0
    block_rows: int = 65536
    device: str = "cpu"
    norm_k: int = 10
    norm_beta: float = 1.0
    progress: bool = True
    index: IndexOptions | None = None  # None: exact generation search


@dataclass(frozen=True)
class SourceMatches:
    """Each generation against its own caption-source training image (Fig. 11 centre and right)."""

    rows: Tensor  # (G,) int64 training row of the caption source, -1: none
    similarity: Tensor  # (G,) float32 similarity to it (NaN where there is none)
    duplicates: Tensor  # (G,) int64 duplicates of it in the training set (-1 where there is none)

    @property
    def known(self) -> Tensor:
        """(G,) bool: the generations whose caption source was found."""
        return self.rows >= 0


@dataclass
class ScanResult:
    """Everything a scan found, in training rows / generation rows (files are written from it)."""

    top: Matches  # (G, k) raw scores, training rows, whether each match was the mirrored image
    normalized: Tensor | None  # (G, k) SSCD-normalised scores, or None
    baseline: Tensor  # (n,) top-1 self-similarity of the sampled training rows
    baseline_sample: RowSample
    match_duplicates: Tensor  # (G,) duplicates of each generation's top match
    random_rows: RowSample
    random_duplicates: Tensor  # (n,) duplicates of random training rows
    classes: ClassSimilarity | None
    class_source: str | None
    normalization: dict[str, Any] | None
    timings: dict[str, float] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=lambda: {"method": "exact"})
    sources: SourceMatches | None = None  # only for generations with caption-source keys

    @property
    def ranking_scores(self) -> Tensor:
        """Scores that order the report (normalised when asked), (G, k)."""
        return self.top.scores if self.normalized is None else self.normalized
