"""The training augmentation: a mild random crop that keeps most of the image."""

from __future__ import annotations

import pytest
from PIL import Image

from captioner.data import ImagePreprocess
from captioner.data.augment import TrainAugment


def test_training_crops_keep_at_least_the_minimum_area(monkeypatch: pytest.MonkeyPatch) -> None:
    from captioner.data import transforms

    sizes = []
    real = transforms.TF.resized_crop

    def spy(pixels, top, left, height, width, size, interpolation, antialias):
        sizes.append((height, width))
        return real(pixels, top, left, height, width, size, interpolation, antialias=antialias)

    monkeypatch.setattr(transforms.TF, "resized_crop", spy)
    augment = TrainAugment(ImagePreprocess((32, 32)), min_area=0.8)
    for image in (Image.new("RGB", (100, 100)), Image.new("RGB", (300, 60))):
        for _ in range(200):
            augment(image)
        areas = [h * w / (image.height * image.width) for h, w in sizes[-200:]]
        assert min(areas) >= 0.79 and max(areas) <= 1.0
