"""Image grids of retrieval results: each query beside its top-k, framed by correctness.

Pure tensor code (torchvision's ``make_grid`` for the layout) so the same grid
goes to TensorBoard (``add_image``) and to a PNG in the log directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from lit.files import atomic_path
from lit.io import to_uint8

GREEN = (0.1, 0.75, 0.1)
RED = (0.85, 0.1, 0.1)
GREY = (0.55, 0.55, 0.55)


def thumbnail(image: Tensor, size: int) -> Tensor:
    """Resize a (3,H,W) image in [0,1] to fit a size x size square (letterboxed in white)."""
    _, height, width = image.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                            antialias=True, align_corners=False)[0].clamp(0, 1)
    canvas = torch.ones(3, size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = resized
    return canvas


def framed(image: Tensor, colour: tuple[float, float, float], width: int) -> Tensor:
    """Surround a (3,H,W) image with a solid frame of ``width`` pixels."""
    frame = torch.tensor(colour, dtype=image.dtype).view(3, 1, 1)
    out = frame.expand(3, image.shape[1] + 2 * width, image.shape[2] + 2 * width).clone()
    out[:, width : width + image.shape[1], width : width + image.shape[2]] = image
    return out


def retrieval_grid(
    queries: Sequence[Tensor],
    retrieved: Sequence[Sequence[Tensor]],
    correct: Sequence[Sequence[bool]],
    size: int = 96,
    frame: int = 4,
) -> Tensor:
    """One row per query: the query (grey frame), then its ranked items (green right, red wrong).

    Rows with fewer retrieved items than the longest are padded with blank cells.
    """
    if not (len(queries) == len(retrieved) == len(correct)) or not queries:
        raise ValueError("queries, retrieved and correct must be non-empty and of equal length")
    columns = 1 + max(len(row) for row in retrieved)
    blank = torch.ones(3, size + 2 * frame, size + 2 * frame)
    cells: list[Tensor] = []
    for query, items, flags in zip(queries, retrieved, correct):
        if len(items) != len(flags):
            raise ValueError("each retrieved row needs one correctness flag per item")
        cells.append(framed(thumbnail(query, size), GREY, frame))
        cells += [framed(thumbnail(item, size), GREEN if ok else RED, frame) for item, ok in zip(items, flags)]
        cells += [blank] * (columns - 1 - len(items))
    return make_grid(torch.stack(cells), nrow=columns, padding=2, pad_value=1.0)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a (C, H, W) [0, 1] image (C = 1 or 3) as an 8-bit PNG, atomically: a killed run
    leaves no half file, and DDP ranks writing the same file cannot interleave."""
    array = to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)
