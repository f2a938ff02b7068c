"""Tokenizer, datasets and DataModules. Never imports the models."""

from captioner.data.datamodule import CaptionDataModule, ShapesDataModule
from captioner.data.shapes import Scene, ShapesWorld, parse_caption
from captioner.data.tokenizer import Tokenizer, split_words
from captioner.data.transforms import ImagePreprocess, load_image

__all__ = [
    "CaptionDataModule",
    "ImagePreprocess",
    "Scene",
    "ShapesDataModule",
    "ShapesWorld",
    "Tokenizer",
    "load_image",
    "parse_caption",
    "split_words",
]
