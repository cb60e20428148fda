"""Retrieval grids: layout, frame colours by correctness, letterboxing, errors."""

from __future__ import annotations

import pytest
import torch

from lit.grids import GREEN, GREY, RED, framed, retrieval_grid, thumbnail


def test_thumbnail_letterboxes_to_square() -> None:
    image = torch.zeros(3, 20, 40)
    thumb = thumbnail(image, 10)
    assert thumb.shape == (3, 10, 10)
    assert torch.all(thumb[:, 0] == 1.0)  # white bands above a wide image
    assert torch.all(thumb[:, 5] == 0.0)


def test_frame_colour_marks_correctness() -> None:
    query, item = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    grid = retrieval_grid([query, query], [[item, item], [item]], [[True, False], [True]], size=8, frame=2)
    cell = 8 + 2 * 2
    pad = 2
    assert grid.shape == (3, 2 * (cell + pad) + pad, 3 * (cell + pad) + pad)

    def corner(row: int, column: int) -> tuple[float, ...]:
        y, x = pad + row * (cell + pad), pad + column * (cell + pad)
        return tuple(round(float(v), 4) for v in grid[:, y, x])

    assert corner(0, 0) == pytest.approx(GREY)
    assert corner(0, 1) == pytest.approx(GREEN)
    assert corner(0, 2) == pytest.approx(RED)
    assert corner(1, 2) == (1.0, 1.0, 1.0)  # blank padding cell


def test_framed_keeps_content() -> None:
    image = torch.rand(3, 5, 7)
    out = framed(image, RED, 3)
    assert torch.equal(out[:, 3:8, 3:10], image)


def test_mismatched_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="equal length"):
        retrieval_grid([torch.zeros(3, 4, 4)], [], [])
    with pytest.raises(ValueError, match="one correctness flag"):
        retrieval_grid([torch.zeros(3, 4, 4)], [[torch.zeros(3, 4, 4)]], [[True, False]])
