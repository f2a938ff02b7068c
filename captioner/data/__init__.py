"""Tokenizer, datasets and DataModules. Never imports the models."""

from captioner.data.datamodule import CaptionDataModule, ShapesDataModule
from captioner.data.shapes import Scene, ShapesWorld, parse_caption
from captioner.data.tokenizer import Tokenizer, split_words

__all__ = [
    "CaptionDataModule",
    "Scene",
    "ShapesDataModule",
    "ShapesWorld",
    "Tokenizer",
    "parse_caption",
    "split_words",
]
