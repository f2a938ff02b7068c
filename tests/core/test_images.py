"""Images load as what they show, whatever their pixel format or orientation, and reach the
model whole, whatever their shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.core.images import ImagePreprocess, load_image
from captioner.data.augment import TrainAugment


def exif_rotated_jpeg(path: Path) -> None:
    """Pixels stored sideways (tall), with EXIF orientation 6: shown upright as 40 wide, 20 tall,
    red on the left half."""
    upright = Image.new("RGB", (40, 20), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 20, 20))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # displayed after turning 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


def transparent_key(image: Image.Image) -> Image.Image:
    """An RGB PNG whose black is marked transparent (a tRNS colour key)."""
    image.info["transparency"] = (0, 0, 0)
    return image


@pytest.mark.parametrize(
    "mode, make, expected",
    [
        ("L", lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
        ("P", lambda: Image.new("RGB", (8, 8), (200, 40, 40)).quantize(4), (200, 40, 40)),
        ("RGBA", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        ("LA", lambda: Image.new("LA", (8, 8), (0, 128)), (128, 128, 128)),
        ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        ("I;16", lambda: Image.fromarray(np.full((8, 8), 51400, np.uint16)), (200, 200, 200)),
        ("RGB", lambda: transparent_key(Image.new("RGB", (8, 8), (0, 0, 0))), (255, 255, 255)),
    ],
)
def test_images_in_every_pixel_format_load_as_what_they_show(
    mode: str, make, expected: tuple, tmp_path: Path
) -> None:
    image = make()
    assert image.mode == mode
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - expected).max() <= 3, pixels[0, 0]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif_rotated_jpeg(tmp_path / "phone.jpg")
    pixels = np.asarray(load_image(tmp_path / "phone.jpg")).astype(int)
    assert pixels.shape == (20, 40, 3)
    assert pixels[10, 5, 0] > 200 and pixels[10, 35, 2] > 200  # red left, blue right


def test_evaluation_sees_the_whole_image_whatever_its_shape() -> None:
    """A wide image keeps its left and right edges (no centre crop cuts them away)."""
    wide = Image.new("RGB", (96, 24), (0, 0, 0))
    wide.paste((255, 0, 0), (0, 0, 8, 24))
    wide.paste((0, 255, 0), (88, 0, 96, 24))
    pixels = ImagePreprocess((32, 32)).resize(wide)
    assert pixels.shape == (3, 32, 32)
    assert pixels[0, 16, 0] > 200 and pixels[1, 16, -1] > 200
    augment = TrainAugment(ImagePreprocess((32, 32)), min_area=0.8)
    crops = torch.stack([augment(wide) for _ in range(20)]).float()
    assert crops.shape == (20, 3, 32, 32)
    assert (crops[:, :, 16, 16] == 0).all()  # the centre is always kept
    assert crops.std(0).mean() > 0  # and the crops differ
