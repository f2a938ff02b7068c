"""From an image file or array to the model's input, the same way in training and inference."""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from captioner.core.errors import ConfigError, ImageLoadError
from captioner.core.values import is_finite, is_int, short

# Images are stored as uint8 and mapped to [-1, 1]; checkpoints record these numbers.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Transparent pixels are shown over white, as a browser or viewer shows them.
BACKGROUND = (255, 255, 255)
Image.init()
# Every raster format PIL reads, but not EPS, which PIL renders by running Ghostscript: no
# file named as a photo should start another program.
_READABLE = tuple(sorted(set(Image.OPEN) - {"EPS"}))


def load_image(
    source: str | Path | bytes,
    name: str | None = None,
    at_least: tuple[int, int] | None = None,
) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation, from a path or encoded bytes.

    With `at_least` (height, width: the model's input), an image more than twice that size
    is shrunk while it is decoded (JPEG's DCT scaling, else PIL's box `reduce`) to no less
    than twice it, so a huge photo costs memory for its decode only, never a batch of them,
    and the final resize still averages over at least 2 x 2 pixels.

    `ImageLoadError` names the file (or `name`) when it is missing, not an image, truncated or
    a decompression bomb, so a bad file never surfaces as a traceback from deep inside PIL.
    """
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        if not isinstance(source, bytes) and not stat.S_ISREG(os.stat(source).st_mode):
            kind = "a pipe, socket or device"  # reading could block
            if Path(source).is_dir():
                kind = "a link to a folder (not followed)" if os.path.islink(source) else "a folder"
            raise ImageLoadError(label, f"is {kind}, not an image file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            data = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(data, formats=_READABLE) as image:
                margin = None if at_least is None else 2 * max(at_least)
                if margin is not None and image.format == "JPEG":
                    image.draft(None, (margin, margin))  # decodes at 1/2, 1/4 or 1/8 scale
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # no copy of a huge image
                rgb = to_rgb(image)
                factor = 1 if margin is None else min(rgb.size) // margin
                return rgb.reduce(factor) if factor >= 2 else rgb
    except FileNotFoundError:
        if not isinstance(source, bytes) and os.path.islink(source):
            raise ImageLoadError(label, f"is a broken link (to {os.readlink(source)})") from None
        raise ImageLoadError(label, "no such file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(label, "not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageLoadError(label, f"refused as a possible decompression bomb ({err})") from None
    except ImageLoadError:
        raise
    except Exception as err:
        reason = f"unreadable, damaged or unsupported image data ({type(err).__name__}: {err})"
        raise ImageLoadError(label, reason) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode, keeping what the picture shows.

    PIL's own `convert("RGB")` clips 16-bit pixels to white and turns transparent pixels into
    whatever colour they happen to store; here 16-bit data is rescaled and transparency is
    composited over a white background.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer or float grey
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # floats in [0, 1]
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr


def image_size_pair(value: int | Any) -> tuple[int, int]:
    """`image_size` as (height, width) from an int or a pair."""
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or min(int(s) for s in size) <= 0:
        raise ConfigError(
            f"data.image_size must be a positive int or [height, width], got {value}."
        )
    return (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class ImagePreprocess:
    """The whole image resized to `image_size` (never cropped), then normalised.

    Stored in every checkpoint, so captioning a file sees what training saw. A pretrained
    encoder brings the statistics and interpolation its weights were trained with.
    """

    image_size: tuple[int, int]  # (height, width) the model takes
    mean: tuple[float, ...] = IMAGE_MEAN
    std: tuple[float, ...] = IMAGE_STD
    interpolation: str = "bilinear"  # or bicubic, nearest: how images are resized

    @property
    def mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels, or floats in [0, 1], shaped (..., C, H, W) -> normalised floats."""
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        return (pixels - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`, back to uint8 pixels: to show what the model saw."""
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        pixels = (images.float() * std + mean) * 255.0
        return pixels.round().clamp(0, 255).to(torch.uint8)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """A PIL image, or a (C, H, W) tensor of uint8 pixels or floats in [0, 1] -> (C, H, W)."""
        return self.normalize(self.resize(image))

    def resize(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """The whole image at the model's size, not yet normalised (uint8 for PIL input)."""
        if isinstance(image, Image.Image):
            pixels = TF.pil_to_tensor(image.convert("RGB"))  # (3, H, W) uint8
        elif isinstance(image, torch.Tensor) and image.ndim == 3:
            pixels = image
        else:
            raise TypeError(
                "expected a PIL image or a (C, H, W) tensor, got "
                f"{getattr(image, 'shape', type(image).__name__)}"
            )
        if pixels.shape[0] != len(self.mean):
            raise ValueError(
                f"expected {len(self.mean)} colour channels, got {pixels.shape[0]}: "
                "convert the image to RGB"
            )
        if tuple(pixels.shape[-2:]) != self.image_size:
            pixels = TF.resize(pixels, list(self.image_size), self.mode, antialias=True)
        return pixels

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for checkpoints and exported JSON."""
        return {
            "image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std),
            "interpolation": self.interpolation,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, state: Any) -> ImagePreprocess:
        """The preprocessing `to_dict` describes, read from a file: `ValueError` names the
        entry that is wrong."""
        if not isinstance(state, dict):
            raise ValueError("expected a mapping with image_size, mean and std")
        size = state.get("image_size")
        if not (
            isinstance(size, list | tuple) and len(size) == 2 and all(map(_positive_int, size))
        ):
            raise ValueError(f"image_size must be [height, width] in pixels, got {short(size)}")
        stats = {}
        for key in ("mean", "std"):
            values = state.get(key)
            if not (isinstance(values, list | tuple) and values and all(map(is_finite, values))):
                raise ValueError(f"{key} must be a list of finite numbers, got {short(values)}")
            stats[key] = tuple(float(v) for v in values)
        if len(stats["mean"]) != len(stats["std"]) or not all(
            1e-6 <= s <= 1e6 for s in stats["std"]
        ):
            raise ValueError("std must hold one number in [1e-6, 1e6] per entry of mean")
        interpolation = state.get("interpolation", "bilinear")  # older files: bilinear
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {list(INTERPOLATIONS)}, got {short(interpolation)}"
            )
        return cls((size[0], size[1]), stats["mean"], stats["std"], interpolation)


def _positive_int(value: Any) -> bool:
    return is_int(value) and value > 0
