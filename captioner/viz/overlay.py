"""Where each generated word looked: cross-attention over patches, blended over the image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image


def select_attention(
    attention: torch.Tensor, layer: int | None = None, head: int | None = None
) -> torch.Tensor:
    """(layers, heads, T, grid_h, grid_w) -> (T, grid_h, grid_w): one layer or the mean over
    layers, then one head or the mean over heads."""
    maps = attention.float().mean(dim=0) if layer is None else attention[layer].float()
    return maps.mean(dim=0) if head is None else maps[head]


def attention_to_pixels(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Patch-grid weights (..., grid_h, grid_w) -> (..., height, width), bilinear, so patch
    (r, c) covers the pixel block of row r and column c of the image."""
    grid = maps.float().reshape(-1, 1, *maps.shape[-2:])  # (N, 1, gh, gw)
    pixels = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return pixels.reshape(*maps.shape[:-2], *size).numpy()


def word_overlays(
    image: Image.Image | np.ndarray,
    attention: torch.Tensor,
    words: Sequence[str],
    *,
    layer: int | None = None,
    head: int | None = None,
    columns: int = 6,
    alpha: float = 0.55,
) -> Figure:
    """One panel per word: the image with that word's cross-attention over it.

    `attention` is `Caption.cross_attention` (layers, heads, T, grid_h, grid_w); `layer` and
    `head` pick one, or None averages. All panels share one colour scale, from 0 to the
    largest weight of any word, so a diffuse look stays dim and a sharp one bright.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    maps = select_attention(attention, layer, head)
    heat = attention_to_pixels(maps, pixels.shape[:2])  # (T, H, W)
    top = max(float(heat.max()), 1e-12)
    count = len(words)
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= count:
            continue
        ax.imshow(pixels)
        ax.imshow(heat[k], cmap="inferno", alpha=alpha, vmin=0, vmax=top)
        ax.set_title(words[k], fontsize=11)
    which = "mean of layers" if layer is None else f"layer {layer}"
    which += ", mean of heads" if head is None else f", head {head}"
    fig.suptitle(f"cross-attention per word ({which})", fontsize=10)
    return fig
