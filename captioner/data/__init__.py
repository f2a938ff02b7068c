"""Datasets and DataModules, on the core alone (the tokenizer and image loading they use are
the core's, re-exported here for the paths of earlier versions)."""

from captioner.core.images import ImagePreprocess, load_image
from captioner.core.tokenizer import Tokenizer, split_words
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
