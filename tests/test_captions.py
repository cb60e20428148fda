"""lit.captions: the caption-side mitigations as pure text functions."""

from __future__ import annotations

from collections import Counter

import pytest

from lit.captions import (
    add_random_words,
    caption_vocabulary,
    insert_words,
    random_words,
    repeat_words,
    tokenizer_words,
    words,
)
from lit.seeding import SeededDraws, derive_seed


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(any(word == other for other in remaining) for word in short)


def test_vocabulary_is_sorted_distinct_words() -> None:
    assert caption_vocabulary(["a red  circle", "a blue circle\t"]) == ["a", "blue", "circle", "red"]
    assert words("  a  b\tc ") == ["a", "b", "c"]


def test_insert_words_reaches_every_place_uniformly() -> None:
    places = Counter()
    for trial in range(1200):
        out = insert_words("a b c", ["X"], SeededDraws(derive_seed(1, trial))).split()
        places[out.index("X")] += 1
        assert [w for w in out if w != "X"] == ["a", "b", "c"]
    assert set(places) == {0, 1, 2, 3}  # before, between and after the words (the study's len + 1 places)
    assert all(abs(n - 300) < 4 * (1200 * 0.25 * 0.75) ** 0.5 for n in places.values())


def test_add_random_words_inserts_count_vocabulary_words() -> None:
    vocabulary = ["zebra", "yak", "xylophone"]
    for trial in range(50):
        out = add_random_words("a red circle", vocabulary, 3, SeededDraws(trial)).split()
        assert len(out) == 6 and _is_subsequence(["a", "red", "circle"], out)
        added = Counter(out) - Counter(["a", "red", "circle"])
        assert sum(added.values()) == 3 and set(added) <= set(vocabulary)
    assert add_random_words("a b", vocabulary, 2, SeededDraws(7)) == add_random_words("a b", vocabulary, 2,
                                                                                       SeededDraws(7))


def test_repeat_words_inserts_the_captions_own_words() -> None:
    original = ["a", "red", "circle", "on", "blue"]
    for trial in range(50):
        out = repeat_words(" ".join(original), 2, SeededDraws(trial)).split()
        extra = Counter(out) - Counter(original)
        assert len(out) == 7 and sum(extra.values()) == 2 and set(extra) <= set(original)
        assert _is_subsequence(original, out)
    assert repeat_words("", 2, SeededDraws(0)) == ""


def test_random_words_checks_its_arguments() -> None:
    assert len(random_words(["a", "b"], 4, SeededDraws(0))) == 4
    with pytest.raises(ValueError, match="empty vocabulary"):
        random_words([], 1, SeededDraws(0))
    with pytest.raises(ValueError, match="count"):
        random_words(["a"], -1, SeededDraws(0))


def test_tokenizer_words_are_the_whole_word_tokens_sorted() -> None:
    vocabulary = ["cat</w>", "cat", "dog</w>", "do", "g</w>", "a</w>", "12</w>", "ca", ".</w>", "Ã©</w>", "<|endoftext|>",
                  "dog</w>", "zebra</w>"]
    assert tokenizer_words(vocabulary) == ["a", "cat", "dog", "g", "zebra"]
    assert tokenizer_words(["cat</w>", "x@"], end_of_word="@") == ["x"]
    assert tokenizer_words(["cat", "dog"]) == []
