"""An animated GIF of a caption being written: one frame per word, each showing where the
decoder looked while choosing that word, with the caption so far underneath."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from captioner.viz.overlay import (
    ImageLike,
    as_rgb,
    attention_to_pixels,
    blend_heatmap,
    shared_max,
    word_maps,
)

BACKGROUND = (24, 24, 24)
PAST_WORD = (190, 190, 190)
CURRENT_WORD = (255, 214, 0)
MARGIN = 8
BAR = 4  # progress bar height: it also keeps consecutive frames distinct, which PIL would merge

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only a small bitmap font
        return ImageFont.load_default()


def _layout(words: Sequence[str], font: Font, width: int) -> tuple[list[tuple[int, int]], int]:
    """Where each word goes when the whole caption is wrapped to `width`, and the text band's
    height; laid out once, so words stay put while the caption grows."""
    space = font.getlength(" ")
    line = int(font.getbbox("Hg")[3] * 1.3)
    x, y, places = MARGIN, MARGIN, []
    for word in words:
        length = font.getlength(word)
        if x > MARGIN and x + length > width - MARGIN:
            x, y = MARGIN, y + line
        places.append((round(x), y))
        x += length + space
    return places, y + line + MARGIN + BAR


def _frame(
    blended: np.ndarray,
    words: Sequence[str],
    places: list[tuple[int, int]],
    band: int,
    current: int,
    font: Font,
) -> Image.Image:
    """The blended image above the caption up to word `current`, that word highlighted."""
    height, width = blended.shape[:2]
    frame = Image.new("RGB", (width, height + band), BACKGROUND)
    frame.paste(Image.fromarray(np.round(blended * 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(frame)
    for k in range(current + 1):
        x, y = places[k]
        colour = CURRENT_WORD if k == current else PAST_WORD
        draw.text((x, height + y), words[k], font=font, fill=colour)
    progress = round((current + 1) * width / len(words))
    if progress > 0:  # an image a few pixels wide has no room for the first words' bar
        draw.rectangle((0, height + band - BAR, progress - 1, height + band - 1), fill=CURRENT_WORD)
    return frame


def save_gif(
    path: str | Path,
    image: ImageLike,
    attention: torch.Tensor,
    words: Sequence[str],
    *,
    layer: int | None = None,
    head: int | None = None,
    duration_ms: int = 700,
    alpha: float = 0.55,
    min_side: int = 256,
    max_side: int = 2048,
) -> Path:
    """Write a looping GIF with exactly one frame per word and return its path.

    `attention` is `Caption.image_attention` (layers, heads, T, grid_h, grid_w), `layer` and
    `head` pick one or None averages. Small images are enlarged by a whole factor
    (nearest-neighbour, so pixels stay crisp) until the shorter side is at least `min_side`,
    as long as the longer stays within `max_side` (a 1 x 20,000 strip is not blown up to
    gigabytes); the heat-map is computed at that size. All frames share one colour scale, as in
    `word_overlays`.
    """
    pixels = as_rgb(image)
    scale = min(math.ceil(min_side / min(pixels.shape[:2])), max_side // max(pixels.shape[:2]))
    scale = max(1, scale)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)  # (H * s, W * s, 3)
    heat = attention_to_pixels(word_maps(attention, words, layer, head), pixels.shape[:2])
    top = shared_max(heat)  # heat: (T, H * s, W * s)
    font = _font(max(12, pixels.shape[1] // 20))
    places, band = _layout(words, font, pixels.shape[1])
    frames = [
        _frame(blend_heatmap(pixels, heat[k], top, alpha), words, places, band, k, font)
        for k in range(len(words))
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=duration_ms,
        loop=0,
        optimize=False,
    )
    return path
