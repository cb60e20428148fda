"""The two records of a scan: its options (:class:`ScanOptions`) and what it found (:class:`ScanResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lit.commands.scan.analysis import DEFAULT_THRESHOLDS, ClassSimilarity, RowSample
from lit.commands.scan.approx import IndexOptions
from lit.replication import DUPLICATE_THRESHOLD
from lit.search import SearchResult
from lit.similarity import SimilarityKind, TokenNormalization


@dataclass(frozen=True)
class ScanOptions:
    """The knobs of the analysis (everything but where the features come from)."""

    k: int = 5
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    similarity: SimilarityKind = "cosine"
    token_normalization: TokenNormalization = "token"
    baseline_sample: int | None = 10000
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


@dataclass
class ScanResult:
    """Everything a scan found, in training rows / generation rows (files are written from it)."""

    top: SearchResult  # (G, k) raw scores, training rows
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

    @property
    def ranking_scores(self) -> Tensor:
        """Scores that order the report (normalised when asked), (G, k)."""
        return self.top.scores if self.normalized is None else self.normalized
