"""The training-time view of an image: the one augmentation captioner applies."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from captioner.core.errors import ConfigError
from captioner.core.images import ImagePreprocess


@dataclass(frozen=True)
class TrainAugment:
    """Training-time view of an image: a random crop keeping at least `min_area` of it, with
    the aspect ratio jittered by at most `max_aspect_change`, resized to the model's size.

    Mild on purpose: a caption describes the whole image, so a crop that cuts an object away
    would teach a wrong caption. There is no flip either: it would swap "left" and "right".
    """

    preprocess: ImagePreprocess
    min_area: float = 0.8
    max_aspect_change: float = 4 / 3

    def __post_init__(self) -> None:
        if not 0.0 < self.min_area <= 1.0:
            raise ConfigError(f"data.min_crop_area must be in (0, 1], got {self.min_area}.")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = TF.pil_to_tensor(image.convert("RGB"))  # (3, H, W) uint8
        height, width = pixels.shape[-2:]
        area = torch.empty(()).uniform_(self.min_area, 1.0).item()
        log_change = math.log(self.max_aspect_change)
        aspect = math.exp(torch.empty(()).uniform_(-log_change, log_change).item())
        crop_h = max(1, round(height * math.sqrt(area / aspect)))
        crop_w = max(1, round(width * math.sqrt(area * aspect)))
        if crop_h > height:  # too tall for the image: keep the area, give up the aspect change
            crop_h, crop_w = height, max(1, round(width * area))
        elif crop_w > width:
            crop_h, crop_w = max(1, round(height * area)), width
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        size = list(self.preprocess.image_size)
        mode = self.preprocess.mode
        return TF.resized_crop(pixels, top, left, crop_h, crop_w, size, mode, antialias=True)
