"""Tests for lit.io: every odd image mode converts correctly, every bad file is a named skip."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit.errors import UserError
from lit.io import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    ImageSkipWarning,
    list_images,
    load_image,
    scan_images,
)
from photo_fixtures import PhotoSet


def _load_clean(path: Path, **kwargs) -> torch.Tensor:
    """load_image that must neither fail nor warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path, **kwargs)
    assert image is not None
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    return image


def _colour(image: torch.Tensor, y: int = 0, x: int = 0) -> list[float]:
    return image[:, y, x].tolist()


# ---------------------------------------------------------------- conversions


def test_rgb_png_is_exact(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    image = _load_clean(tmp_path / "rgb.png")
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def test_grayscale_is_repeated_on_three_channels(tmp_path: Path) -> None:
    Image.new("L", (4, 3), 128).save(tmp_path / "gray.png")
    image = _load_clean(tmp_path / "gray.png")
    assert image.shape == (3, 3, 4)
    assert torch.allclose(image, torch.full_like(image, 128 / 255))


def test_one_bit_image(tmp_path: Path) -> None:
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.png")
    image = _load_clean(tmp_path / "bits.png")
    assert _colour(image, 0, 0) == [0.0, 0.0, 0.0] and _colour(image, 0, 1) == [1.0, 1.0, 1.0]


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    Image.new("RGBA", (3, 2), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    image = _load_clean(tmp_path / "rgba.png")
    alpha = 128 / 255
    expected = torch.tensor([1.0, 1 - alpha, 1 - alpha])  # red * a + white * (1 - a)
    assert torch.allclose(image[:, 1, 2], expected, atol=1e-6)


def test_la_fully_transparent_black_becomes_white(tmp_path: Path) -> None:
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert torch.allclose(_load_clean(tmp_path / "la.png"), torch.ones(3, 2, 2))


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 6))  # 0 = blue, 1 = green
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    palette_image.save(tmp_path / "opaque.png")
    palette_image.save(tmp_path / "transparent.png", transparency=1)
    opaque = _load_clean(tmp_path / "opaque.png")
    assert _colour(opaque, 0, 0) == [0.0, 0.0, 1.0] and _colour(opaque, 0, 1) == [0.0, 1.0, 0.0]
    transparent = _load_clean(tmp_path / "transparent.png")
    assert _colour(transparent, 0, 0) == [0.0, 0.0, 1.0] and _colour(transparent, 0, 1) == [1.0, 1.0, 1.0]


def test_rgb_colour_key_transparency(tmp_path: Path) -> None:
    keyed = Image.new("RGB", (2, 1), (0, 0, 0))
    keyed.putpixel((1, 0), (10, 20, 30))
    keyed.save(tmp_path / "keyed.png", transparency=(0, 0, 0))  # black is transparent
    image = _load_clean(tmp_path / "keyed.png")
    assert _colour(image, 0, 0) == [1.0, 1.0, 1.0]
    assert torch.allclose(image[:, 0, 1], torch.tensor([10, 20, 30]) / 255)


def test_cmyk(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))  # no ink = white
    cmyk.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow = red
    cmyk.save(tmp_path / "cmyk.tif")
    image = _load_clean(tmp_path / "cmyk.tif")
    assert _colour(image, 0, 0) == [1.0, 1.0, 1.0] and _colour(image, 0, 1) == [1.0, 0.0, 0.0]


def test_sixteen_bit_png_scales_by_65535(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    image = _load_clean(tmp_path / "deep.png")
    assert torch.allclose(image[0, 0], torch.tensor([0.0, 32768 / 65535, 1.0]))
    assert abs(float(image[0, 0, 1]) - 0.5) < 1e-4  # not clipped at 255


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_big_endian_and_int32_sixteen_bit_tiffs(tmp_path: Path, mode: str) -> None:
    deep = Image.new(mode, (3, 1))
    deep.putdata([0, 32768, 65535])
    deep.save(tmp_path / "deep.tif")
    image = _load_clean(tmp_path / "deep.tif")
    assert torch.allclose(image[:, 0], torch.tensor([0.0, 32768 / 65535, 1.0]).expand(3, 3))


def test_float_images_in_unit_range_kept_else_min_max(tmp_path: Path) -> None:
    unit = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32), mode="F")
    unit.save(tmp_path / "unit.tif")
    assert torch.allclose(_load_clean(tmp_path / "unit.tif")[1, 0], torch.tensor([0.0, 0.25, 1.0]))
    wide = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32), mode="F")
    wide.save(tmp_path / "wide.tif")
    assert torch.allclose(_load_clean(tmp_path / "wide.tif")[2, 0], torch.tensor([0.0, 0.25, 1.0]))


def test_exif_rotation_swaps_dimensions(tmp_path: Path) -> None:
    photo = Image.new("RGB", (40, 20), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = _load_clean(tmp_path / "phone.jpg")
    assert image.shape == (3, 40, 20)
    top, bottom = image[:, 5, 10], image[:, 35, 10]  # stored left half ends up on top
    assert top[0] > 0.8 and top[2] < 0.2 and bottom[2] > 0.8 and bottom[0] < 0.2


# ---------------------------------------------------------------- bad files


def _truncated_jpeg(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.jpg"


def _zero_byte(tmp_path: Path) -> Path:
    (tmp_path / "empty.png").write_bytes(b"")
    return tmp_path / "empty.png"


def _text_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    return tmp_path / "notes.jpg"


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere.png"


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "folder.png").mkdir()
    return tmp_path / "folder.png"


BAD_FILES = {
    "truncated": (_truncated_jpeg, "truncated"),
    "zero-byte": (_zero_byte, "empty file"),
    "text": (_text_file, "not an image"),
    "missing": (_missing, "not found"),
    "directory": (_directory, "directory"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_skipped_with_a_warning_naming_it(tmp_path: Path, kind: str) -> None:
    make, reason = BAD_FILES[kind]
    path = make(tmp_path)
    with pytest.warns(ImageSkipWarning, match=re.escape(path.name)) as record:
        assert load_image(path) is None
    assert reason in str(record[0].message)


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_raises_in_strict_mode(tmp_path: Path, kind: str) -> None:
    path = BAD_FILES[kind][0](tmp_path)
    with pytest.raises(ImageLoadError, match=re.escape(path.name)):
        load_image(path, strict=True)


# ---------------------------------------------------------------- large images


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_images_above_max_pixels_are_downscaled(tmp_path: Path, suffix: str) -> None:
    Image.new("RGB", (200, 100), (200, 40, 90)).save(tmp_path / f"wide{suffix}", quality=95)
    image = _load_clean(tmp_path / f"wide{suffix}", max_pixels=5000)
    height, width = image.shape[1:]
    assert height * width <= 5000
    assert (height, width) == (50, 100)  # aspect ratio kept, budget used
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor([200, 40, 90]) / 255, atol=0.02)
    assert _load_clean(tmp_path / f"wide{suffix}", max_pixels=20000).shape == (3, 100, 200)


def test_thin_image_keeps_at_least_one_pixel(tmp_path: Path) -> None:
    Image.new("L", (300, 1), 7).save(tmp_path / "line.png")
    image = _load_clean(tmp_path / "line.png", max_pixels=10)
    assert image.shape == (3, 1, 10)


def test_decompression_bomb_is_skipped_and_pil_warning_silenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")  # 10000 > 2 * 1000: PIL refuses
    with pytest.warns(ImageSkipWarning, match="bomb.png.*decompression bomb"):
        assert load_image(tmp_path / "bomb.png") is None
    with pytest.raises(ImageLoadError, match="bomb.png"):
        load_image(tmp_path / "bomb.png", strict=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1600: PIL only warns; we handle size
    assert _load_clean(tmp_path / "big.png", max_pixels=400).shape == (3, 20, 20)


def test_max_pixels_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(tmp_path / "x.png", max_pixels=0)


# ---------------------------------------------------------------- real photos


@pytest.mark.real_photos
def test_real_photos_load_at_full_size(bsds300: PhotoSet) -> None:
    paths = list_images(bsds300.split("val") / "images")
    assert len(paths) == 100
    for path in paths[:6]:
        image = _load_clean(path)
        assert tuple(image.shape) in {(3, 321, 481), (3, 481, 321)}
        assert float(image.std()) > 0.02  # a photo, not a blank


# ---------------------------------------------------------------- listing


def test_list_images_sorted_case_insensitive_and_recursive(tmp_path: Path) -> None:
    names = ["b.JPG", "a.png", "sub/c.Tiff", "sub/deeper/d.webp", "notes.txt", "sub/e.jpeg.bak"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()  # a folder with an image suffix is not a file
    expected = sorted(tmp_path / n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
    with pytest.warns(ImageSkipWarning, match="1 entry .*dir.png"):
        assert list_images(tmp_path) == expected
    # written out by hand: the four image files, in path order, recursive
    listed = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path).paths]
    assert listed == ["a.png", "b.JPG", "sub/c.Tiff", "sub/deeper/d.webp"]
    assert scan_images(tmp_path, recursive=False).paths == [tmp_path / "a.png", tmp_path / "b.JPG"]


def test_list_images_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found.*absent"):
        list_images(tmp_path / "absent")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="file.png"):
        list_images(tmp_path / "file.png")


def test_dangling_symlinks_and_image_named_folders_are_counted_as_skipped(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # dangling
    (tmp_path / "album.jpg").mkdir()  # a folder named like an image
    (tmp_path / "album.jpg" / "inner.png").symlink_to(tmp_path / "good.png")  # a live link is an image
    listing = scan_images(tmp_path)
    assert listing.paths == [tmp_path / "album.jpg" / "inner.png", tmp_path / "good.png"]
    assert listing.skipped == [(tmp_path / "album.jpg", "a directory, not an image file"),
                               (tmp_path / "gone.jpg", "dangling symlink")]
    with pytest.warns(ImageSkipWarning) as caught:
        assert list_images(tmp_path) == listing.paths
    message = str(caught[0].message)
    assert "2 entries" in message and "gone.jpg (dangling symlink)" in message and "album.jpg (a directory" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan_images(tmp_path, recursive=False).paths == [tmp_path / "good.png"]  # scan never warns


def test_strict_load_error_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_image(tmp_path / "broken.png", strict=True)
