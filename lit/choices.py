"""The values the suite's options take and their defaults, defined once and torch-free.

A command line shows them in ``--help`` before torch is loaded (``lit scan --help``,
:mod:`lit.commands.scan.options`); the modules that compute with them import them from here:

- :data:`SimilarityKind`, :data:`TokenNormalization`: the similarities of :mod:`lit.similarity`
  and its normalisations of token features;
- :data:`DEFAULT_THRESHOLDS`, :data:`DUPLICATE_THRESHOLD`, :data:`MATCH_MIRRORS`: the defaults of
  the replication statistics of :mod:`lit.replication` (the monitor's and the scan's);
- :data:`DTYPES`: the dtypes a feature store (:mod:`lit.store`) holds its rows in.
"""

from __future__ import annotations

from typing import Literal

#: Normalisation of token features before split-product (see :func:`lit.similarity.normalize_tokens`).
TokenNormalization = Literal["token", "global", "none"]
#: How features are compared: cosine for global ``(N, D)``, split-product for token ``(N, T, D)`` features.
SimilarityKind = Literal["cosine", "split_product"]

#: Duplicates of a training image: other training images above this similarity (paper Sec. 7).
DUPLICATE_THRESHOLD = 0.95
#: Replication-rate thresholds of the monitor and the scan unless told otherwise.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)
#: The default of mirror-aware matching in the monitor and the scan (the paper's definition: off).
MATCH_MIRRORS = False

#: The dtypes of a feature store's rows (float16 by default).
DTYPES = ("float16", "float32")
