"""An animated GIF of a caption being written: one frame per word, each showing where the
decoder looked while choosing that word, with the caption so far underneath."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from captioner.core.files import atomic_write
from captioner.viz.overlay import (
    ALPHA,
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


def fit_pixels(pixels: np.ndarray, min_side: int, max_side: int) -> np.ndarray:
    """RGB floats (H, W, 3) at the size a frame shows them: shrunk (antialiased) until the
    longer side is `max_side`, since a GIF stores every frame's pixels again; or, when small,
    enlarged by a whole factor (nearest-neighbour, so pixels stay crisp) until the shorter side
    is at least `min_side`, as long as the longer stays within `max_side`."""
    height, width = pixels.shape[:2]
    longest = max(height, width)
    if longest > max_side:
        size = (
            max(1, round(height * max_side / longest)),
            max(1, round(width * max_side / longest)),
        )
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 3, H, W)
        image = F.interpolate(
            image, size=size, mode="bilinear", antialias=True, align_corners=False
        )
        return image[0].permute(1, 2, 0).clamp(0.0, 1.0).numpy()  # (h, w, 3)
    scale = max(1, min(math.ceil(min_side / min(height, width)), max_side // longest))
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1)  # (H * s, W * s, 3)


def blended_words(
    image: ImageLike,
    attention: torch.Tensor,
    words: Sequence[str],
    layer: int | None = None,
    head: int | None = None,
    alpha: float = ALPHA,
    min_side: int = 256,
    max_side: int = 320,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image at frame size (`fit_pixels`) and, for each word, its attention blended over
    it (RGB floats), every word on one colour scale: a GIF's frames before the caption is
    written under them, and the demo app's overlays."""
    pixels = fit_pixels(as_rgb(image), min_side, max_side)  # (h, w, 3)
    heat = attention_to_pixels(word_maps(attention, words, layer, head), pixels.shape[:2])
    top = shared_max(heat)  # heat: (T, h, w)
    return pixels, [blend_heatmap(pixels, h, top, alpha) for h in heat]


def save_gif(
    path: str | Path,
    image: ImageLike,
    attention: torch.Tensor,
    words: Sequence[str],
    *,
    layer: int | None = None,
    head: int | None = None,
    duration_ms: int = 700,
    alpha: float = ALPHA,
    min_side: int = 256,
    max_side: int = 320,
) -> Path:
    """Write a looping GIF with exactly one frame per word and return its path.

    `attention` is `Caption.image_attention` (layers, heads, T, grid_h, grid_w), `layer` and
    `head` pick one or None averages. The image is brought to at most `max_side` pixels on its
    longer side (a photo's frames would take megabytes), small ones enlarged towards
    `min_side` (`fit_pixels`), and the heat-map computed at that size. All frames share one
    colour scale, as in `word_overlays`.
    """
    pixels, blended = blended_words(image, attention, words, layer, head, alpha, min_side, max_side)
    font = _font(max(12, pixels.shape[1] // 20))
    places, band = _layout(words, font, pixels.shape[1])
    frames = [_frame(b, words, places, band, k, font) for k, b in enumerate(blended)]
    path = Path(path)
    with atomic_write(path) as file:
        frames[0].save(
            file,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=duration_ms,
            loop=0,
            optimize=False,
        )
    return path
