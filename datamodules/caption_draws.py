"""Which images are duplicated, and which caption each training draw of an image gets.

Controlled duplication (follow-up study, code somepago/DCR ``datasets.py``): a share
``dup_fraction`` of the images is drawn ``dup_weight`` times as often as the others
(:func:`duplicated_rows`, :func:`sampling_weights`). The chosen images are the ones whose
``derive_seed(seed, "duplicated", key)`` is smallest: a seeded choice that depends on the keys,
not on the order the source lists them in.

A draw's caption (:meth:`CaptionDraws.draw`), from the draw's own seed, in this order:

1. the **base caption**, drawn uniformly from the image's pool (:meth:`CaptionDraws.pool`): its
   first caption; all its captions for a duplicated image under ``dup_caption: varied`` (the
   study's ``dup_image``); the first ``captions_per_image`` captions (``None``: all) for every
   image under the several-captions mitigation (the study's ``allcaps``), the larger pool winning;
2. **random caption replacement** with probability ``replacement``: the caption becomes
   ``replacement_words`` random words of the captions' vocabulary (``random_words``; the study's
   code trains on four random CLIP tokens) or a caption drawn uniformly from all the set's
   captions (``dataset_caption``, which may be the image's own);
3. **random token addition** with probability ``token_addition``: ``token_addition_count``
   random vocabulary words inserted at random places (the study: two);
4. **word repetition** with probability ``word_repetition``: ``word_repetition_count`` of the
   caption's own words inserted again at random places (the study: two).

Each step draws from its own seed (``derive_seed(draw seed, step)``), so switching one mitigation
on or off leaves the draws of the others as they were. The study applies one mitigation at a time;
here they combine in the order above. The vocabulary is every word of every caption of the set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lit.captions import (
    add_random_words,
    caption_vocabulary,
    random_words,
    repeat_words,
)
from lit.errors import UserError
from lit.seeding import SeededDraws, derive_seed

DupCaption = Literal["same", "varied"]
ReplacementSource = Literal["random_words", "dataset_caption"]


def check_duplication(fraction: float, weight: float) -> None:
    """One-line errors for a ``dup_fraction`` outside [0, 1] or a ``dup_weight`` that is not positive."""
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"dup_fraction must be in [0, 1], got {fraction}")
    if not weight > 0:
        raise UserError(f"dup_weight must be > 0, got {weight}")


def duplicated_count(total: int, fraction: float) -> int:
    """How many of ``total`` images a ``fraction`` duplicates: ``fraction * total`` rounded half up,
    at least one when ``fraction > 0``."""
    check_duplication(fraction, 1.0)
    if fraction == 0.0 or total == 0:
        return 0
    return min(total, max(1, math.floor(fraction * total + 0.5)))


def duplicated_rows(keys: Sequence[str], fraction: float, seed: int) -> list[bool]:
    """Per image, whether it is duplicated: the :func:`duplicated_count` images with the smallest
    ``derive_seed(seed, "duplicated", key)``."""
    count = duplicated_count(len(keys), fraction)
    order = sorted(range(len(keys)), key=lambda row: (derive_seed(seed, "duplicated", keys[row]), row))
    chosen = set(order[:count])
    return [row in chosen for row in range(len(keys))]


def sampling_weights(duplicated: Sequence[bool], dup_weight: float) -> list[float]:
    """Relative sampling weight per image: ``dup_weight`` for a duplicated one, 1 for the others."""
    check_duplication(0.0, dup_weight)
    return [float(dup_weight) if dup else 1.0 for dup in duplicated]


@dataclass(frozen=True)
class CaptionPolicy:
    """How a draw's caption is chosen and changed (see the module docstring)."""

    dup_caption: DupCaption = "same"
    captions_per_image: int | None = 1
    replacement: float = 0.0
    replacement_source: ReplacementSource = "random_words"
    replacement_words: int = 4
    token_addition: float = 0.0
    token_addition_count: int = 2
    word_repetition: float = 0.0
    word_repetition_count: int = 2

    def __post_init__(self) -> None:
        if self.dup_caption not in ("same", "varied"):
            raise UserError(f"dup_caption must be 'same' or 'varied', got {self.dup_caption!r}")
        if self.replacement_source not in ("random_words", "dataset_caption"):
            raise UserError(f"replacement_source must be 'random_words' or 'dataset_caption', "
                            f"got {self.replacement_source!r}")
        if self.captions_per_image is not None and self.captions_per_image < 1:
            raise UserError(f"captions_per_image must be >= 1 or null (all), got {self.captions_per_image}")
        for name in ("replacement", "token_addition", "word_repetition"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} is a probability, in [0, 1]; got {getattr(self, name)}")
        for name in ("replacement_words", "token_addition_count", "word_repetition_count"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.replacement > 0 and self.replacement_source == "random_words" and self.replacement_words < 1:
            raise UserError("replacement_words must be >= 1 for random_words replacement")

    @property
    def verbatim(self) -> float:
        """Probability that a draw trains on its base caption unchanged (no step 2-4 applies)."""
        return (1.0 - self.replacement) * (1.0 - self.token_addition) * (1.0 - self.word_repetition)


@dataclass(frozen=True)
class DrawnCaption:
    """A draw's caption, the index of its base caption in the image's captions, and the changes
    applied (``"replaced"``, ``"added N"``, ``"repeated N"``)."""

    text: str
    base: int
    changes: tuple[str, ...] = ()


class CaptionDraws:
    """The captions of a training set and the caption of every draw.

    Args:
        captions: per image, its captions (at least one each), in source order.
        duplicated: per image, whether it is duplicated.
        policy: the caption options.
    """

    def __init__(self, captions: Sequence[Sequence[str]], duplicated: Sequence[bool], policy: CaptionPolicy) -> None:
        if len(captions) != len(duplicated):
            raise ValueError(f"{len(captions)} caption lists for {len(duplicated)} images")
        if any(not texts for texts in captions):
            raise ValueError("every image needs at least one caption")
        self.captions = [tuple(texts) for texts in captions]
        self.duplicated = list(duplicated)
        self.policy = policy
        self.all_captions = [text for texts in self.captions for text in texts]
        self.vocabulary = caption_vocabulary(self.all_captions)

    def pool(self, row: int) -> tuple[str, ...]:
        """The base captions a draw of image ``row`` picks from, uniformly."""
        texts = self.captions[row]
        size = len(texts) if self.policy.captions_per_image is None else min(self.policy.captions_per_image, len(texts))
        if self.duplicated[row] and self.policy.dup_caption == "varied":
            size = len(texts)
        return texts[:size]

    def draw(self, row: int, seed: int) -> DrawnCaption:
        """The caption of one draw of image ``row`` whose seed is ``seed``."""
        policy = self.policy
        pool = self.pool(row)
        base = SeededDraws(derive_seed(seed, "base")).integer(0, len(pool) - 1) if len(pool) > 1 else 0
        text, changes = pool[base], []
        if policy.replacement and _happens(seed, "replacement", policy.replacement):
            draw = SeededDraws(derive_seed(seed, "replacement", "text"))
            if policy.replacement_source == "random_words":
                text = " ".join(random_words(self.vocabulary, policy.replacement_words, draw))
            else:
                text = draw.choice(self.all_captions)
            changes.append("replaced")
        if policy.token_addition and _happens(seed, "addition", policy.token_addition):
            text = add_random_words(text, self.vocabulary, policy.token_addition_count,
                                    SeededDraws(derive_seed(seed, "addition", "words")))
            changes.append(f"added {policy.token_addition_count}")
        if policy.word_repetition and _happens(seed, "repetition", policy.word_repetition):
            text = repeat_words(text, policy.word_repetition_count, SeededDraws(derive_seed(seed, "repetition", "words")))
            changes.append(f"repeated {policy.word_repetition_count}")
        return DrawnCaption(text, base, tuple(changes))

    def monitor_pairs(self, keys: Sequence[str], count: int, seed: int) -> list[tuple[str, str, bool]]:
        """``count`` fixed ``(key, caption, duplicated)`` draws: half (rounded down) from the duplicated
        images and the rest from the unique ones when both groups exist, else all from the one there is.
        Within a group, images in a seeded order (cycled when the group is smaller than its share),
        each with a seeded caption from its pool (:meth:`pool`; the base captions, unchanged)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        groups = {flag: [row for row, dup in enumerate(self.duplicated) if dup == flag] for flag in (True, False)}
        wanted = {True: count // 2, False: count - count // 2}
        if not groups[True] or not groups[False]:
            wanted = {flag: count if groups[flag] else 0 for flag in (True, False)}
        pairs = []
        for flag in (True, False):
            rows = sorted(groups[flag], key=lambda row: (derive_seed(seed, "monitor", keys[row]), row))
            for number in range(wanted[flag]):
                row = rows[number % len(rows)]
                pool = self.pool(row)
                pick = SeededDraws(derive_seed(seed, "monitor", keys[row], number)).integer(0, len(pool) - 1)
                pairs.append((keys[row], pool[pick], flag))
        return pairs


def _happens(seed: int, step: str, probability: float) -> bool:
    """A Bernoulli(``probability``) draw from the step's own seed."""
    return SeededDraws(derive_seed(seed, step)).uniform() < probability


__all__ = ["CaptionDraws", "CaptionPolicy", "DrawnCaption", "check_duplication", "duplicated_count", "duplicated_rows",
           "sampling_weights"]
