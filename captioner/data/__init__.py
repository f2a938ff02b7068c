"""Tokenizer, datasets and DataModules. Never imports the models."""

from captioner.data.datamodule import CaptionDataModule, ShapesDataModule
from captioner.data.files import (
    CocoDataModule,
    FileCaptionDataModule,
    FlickrDataModule,
    KarpathySplitDataModule,
    TableDataModule,
)
from captioner.data.shapes import Scene, ShapesWorld, parse_caption
from captioner.data.shards import WebDataModule
from captioner.data.tokenizer import Tokenizer, split_words
from captioner.data.transforms import ImagePreprocess, load_image

__all__ = [
    "CaptionDataModule",
    "CocoDataModule",
    "FileCaptionDataModule",
    "FlickrDataModule",
    "ImagePreprocess",
    "KarpathySplitDataModule",
    "Scene",
    "ShapesDataModule",
    "ShapesWorld",
    "TableDataModule",
    "Tokenizer",
    "WebDataModule",
    "load_image",
    "parse_caption",
    "split_words",
]
