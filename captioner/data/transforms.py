"""From an image file or array to the model's input, the same way in training and inference."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from captioner.errors import ImageLoadError

# Images are stored as uint8 and mapped to [-1, 1]; checkpoints record these numbers.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def load_image(path: str | Path) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation; `ImageLoadError` names the file
    when it is missing, not an image, truncated or a decompression bomb."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                return image.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{path}: refused as a possible decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or damaged pixel data
        raise ImageLoadError(f"{path}: damaged image data ({err})") from None


@dataclass(frozen=True)
class ImagePreprocess:
    """The whole image resized to `image_size` (never cropped), then normalised.

    Stored in every checkpoint, so captioning a file sees what training saw.
    """

    image_size: tuple[int, int]  # (height, width) the model takes
    mean: tuple[float, ...] = IMAGE_MEAN
    std: tuple[float, ...] = IMAGE_STD

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels, or floats in [0, 1], shaped (..., C, H, W) -> normalised floats."""
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        return (pixels - mean) / std

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """A PIL image, or a (C, H, W) tensor of uint8 pixels or floats in [0, 1] -> (C, H, W)."""
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
            pixels = TF.resize(pixels, list(self.image_size), antialias=True)
        return self.normalize(pixels)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for checkpoints and exported JSON."""
        return {"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ImagePreprocess:
        size = state["image_size"]
        return cls(
            image_size=(int(size[0]), int(size[1])),
            mean=tuple(float(m) for m in state["mean"]),
            std=tuple(float(s) for s in state["std"]),
        )
