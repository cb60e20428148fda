"""Caption-side mitigations of copying as pure functions (follow-up study, Somepalli et al. 2023).

"Understanding and Mitigating Copying in Diffusion Models" (NeurIPS 2023, code: somepago/DCR,
``datasets.py`` and ``diff_inference.py``) randomises the captions a text-to-image model trains on
or is prompted with. A caption is split into words at white space and joined with single spaces.

- :func:`insert_words`: each word goes to a uniformly drawn one of the ``len + 1`` places between
  the caption's words (the study's ``insert_rand_word``), one after the other;
- :func:`add_random_words`: ``count`` words drawn from a vocabulary, inserted (random token
  addition at training time; random words added to the prompt at inference);
- :func:`repeat_words`: ``count`` words drawn from the caption itself, inserted (word repetition);
- :func:`random_words`: ``count`` vocabulary words as a caption (random caption replacement:
  the study's code trains on four random CLIP tokens in place of the caption);
- :func:`caption_vocabulary`: the sorted distinct words of a set of captions;
- :func:`tokenizer_words`: the word-final tokens of a CLIP BPE tokenizer's vocabulary (the words
  ``lit generate --random_words`` adds to a prompt).

Every draw comes from a :class:`lit.seeding.SeededDraws`, so a caption change is a pure function
of its seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lit.seeding import SeededDraws


def words(caption: str) -> list[str]:
    """The words of ``caption`` (split at white space)."""
    return caption.split()


def caption_vocabulary(captions: Iterable[str]) -> list[str]:
    """The distinct words of ``captions``, sorted (so the same captions give the same list)."""
    return sorted({word for caption in captions for word in words(caption)})


#: The end-of-word suffix of CLIP's byte-pair-encoding vocabulary (``"cat</w>"``: ``cat`` ending a word).
END_OF_WORD = "</w>"


def tokenizer_words(tokens: Iterable[str], end_of_word: str = END_OF_WORD) -> list[str]:
    """The words of a BPE vocabulary, sorted: the tokens ending in ``end_of_word`` whose stem is
    ASCII letters only, without the suffix (``"cat</w>"`` -> ``cat``). These are whole words and
    the word-final pieces BPE also keeps (``"ing</w>"`` -> ``ing``), each a word of its own when
    inserted between spaces; word-initial and inner pieces, numbers, punctuation and byte-level
    symbols are left out (the study's code decodes any of CLIP's first 49,400 token ids instead)."""
    found = set()
    for token in tokens:
        if token.endswith(end_of_word):
            stem = token[: -len(end_of_word)]
            if stem.isascii() and stem.isalpha():
                found.add(stem)
    return sorted(found)


def insert_words(caption: str, new_words: Sequence[str], draw: SeededDraws) -> str:
    """``caption`` with each of ``new_words`` inserted, in turn, at a uniformly drawn place."""
    tokens = words(caption)
    for word in new_words:
        tokens.insert(draw.integer(0, len(tokens)), word)
    return " ".join(tokens)


def random_words(vocabulary: Sequence[str], count: int, draw: SeededDraws) -> list[str]:
    """``count`` words drawn uniformly (with replacement) from ``vocabulary``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count and not vocabulary:
        raise ValueError("cannot draw words from an empty vocabulary")
    return [draw.choice(vocabulary) for _ in range(count)]


def add_random_words(caption: str, vocabulary: Sequence[str], count: int, draw: SeededDraws) -> str:
    """``caption`` with ``count`` random vocabulary words inserted at random places."""
    return insert_words(caption, random_words(vocabulary, count, draw), draw)


def repeat_words(caption: str, count: int, draw: SeededDraws) -> str:
    """``caption`` with ``count`` of its own words (drawn with replacement from the caption as
    given) inserted again at random places; an empty caption stays empty."""
    return insert_words(caption, random_words(words(caption), count, draw) if words(caption) else [], draw)


__all__ = ["add_random_words", "caption_vocabulary", "insert_words", "random_words", "repeat_words", "tokenizer_words", "words"]
