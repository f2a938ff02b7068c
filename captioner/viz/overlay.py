"""Where each generated word looked: its attention over the patches, blended over the image.

The helpers here (`as_rgb`, `blend_heatmap`, `draw_overlay`) are shared by every figure and by
the GIF, so a heat-map looks the same wherever it is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

CMAP = "inferno"  # every heat-map and matrix, figures and GIF alike

ImageLike = Image.Image | np.ndarray


def select_attention(
    attention: torch.Tensor, layer: int | None = None, head: int | None = None
) -> torch.Tensor:
    """(layers, heads, ...) -> (...): one layer or the mean over layers, then one head or the
    mean over heads. Works for image attention (T, grid_h, grid_w) as for square (Tq, Tk)."""
    maps = attention.float().mean(dim=0) if layer is None else attention[layer].float()
    return maps.mean(dim=0) if head is None else maps[head]


def describe_selection(layer: int | None, head: int | None) -> str:
    """'layer 1, mean of heads' and the like, for titles."""
    which = "mean of layers" if layer is None else f"layer {layer}"
    return which + (", mean of heads" if head is None else f", head {head}")


def attention_to_pixels(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Patch-grid weights (..., grid_h, grid_w) -> (..., height, width), bilinear, so patch
    (r, c) covers the pixel block of row r and column c of the image whatever the patch size."""
    grid = maps.float().reshape(-1, 1, *maps.shape[-2:])  # (N, 1, gh, gw)
    pixels = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return pixels.reshape(*maps.shape[:-2], *size).numpy()


def as_rgb(image: ImageLike) -> np.ndarray:
    """A PIL image or an (H, W), (H, W, 3|4) array (uint8, or floats in [0, 1]) -> floats in
    [0, 1] of shape (H, W, 3), the one form the blending works on."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)
    pixels = pixels[..., :3]  # drop an alpha channel
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    return np.clip(pixels.astype(np.float32), 0.0, 1.0)


def blend_heatmap(pixels: np.ndarray, heat: np.ndarray, vmax: float, alpha: float) -> np.ndarray:
    """RGB floats (H, W, 3) with the colour-mapped `heat` (H, W), scaled 0..`vmax`, laid over
    them at opacity `alpha`; the same blend for figures and GIF frames."""
    colours = matplotlib.colormaps[CMAP](np.clip(heat / max(vmax, 1e-12), 0.0, 1.0))[..., :3]
    return (1.0 - alpha) * pixels + alpha * colours  # (H, W, 3)


def draw_overlay(ax: Axes, pixels: np.ndarray, heat: np.ndarray, vmax: float, alpha: float) -> None:
    """One image panel: the blend, without ticks or frame (so a y-label can still show)."""
    ax.imshow(blend_heatmap(pixels, heat, vmax, alpha))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def add_colorbar(fig: Figure, axes: Axes | np.ndarray, vmax: float) -> None:
    """The colour scale of panels blended with `blend_heatmap` (they hold RGB, not weights)."""
    mappable = ScalarMappable(norm=Normalize(0.0, vmax), cmap=CMAP)
    fig.colorbar(mappable, ax=axes, shrink=0.8, label="attention weight")


def shared_max(heat: np.ndarray) -> float:
    """One colour scale from 0 to the largest weight, so a diffuse look stays dim."""
    return max(float(heat.max()), 1e-12)


def word_maps(
    attention: torch.Tensor, words: Sequence[str], layer: int | None, head: int | None
) -> torch.Tensor:
    """Cross-attention (layers, heads, T, gh, gw) -> (T, gh, gw), checked against the words."""
    maps = select_attention(attention, layer, head)
    if maps.shape[0] != len(words) or not words:
        raise ValueError(f"{len(words)} words but image attention for {maps.shape[0]} tokens.")
    return maps


def word_overlays(
    image: ImageLike,
    attention: torch.Tensor,
    words: Sequence[str],
    *,
    layer: int | None = None,
    head: int | None = None,
    columns: int = 6,
    alpha: float = 0.55,
) -> Figure:
    """One panel per word: the image with that word's attention over the image on it.

    `attention` is `Caption.image_attention` (layers, heads, T, grid_h, grid_w); `layer` and
    `head` pick one, or None averages. All panels share one colour scale, from 0 to the
    largest weight of any word, so a diffuse look stays dim and a sharp one bright.
    """
    pixels = as_rgb(image)
    heat = attention_to_pixels(word_maps(attention, words, layer, head), pixels.shape[:2])
    top = shared_max(heat)  # heat: (T, H, W)
    count = len(words)
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= count:
            continue
        draw_overlay(ax, pixels, heat[k], top, alpha)
        ax.set_title(words[k], fontsize=11)
    fig.suptitle(f"image attention per word ({describe_selection(layer, head)})", fontsize=10)
    return fig


def head_grid(
    image: ImageLike,
    attention: torch.Tensor,
    word_index: int,
    word: str | None = None,
    *,
    alpha: float = 0.55,
) -> Figure:
    """Every layer and head's image attention for one word, to see which heads ground it.

    Rows are layers, columns heads plus a last "mean" column (mean of that layer's heads), all
    on one colour scale so heads that look nowhere in particular stay dim.
    """
    pixels = as_rgb(image)
    maps = attention[:, :, word_index].float()  # (layers, heads, gh, gw)
    maps = torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1)  # (layers, heads + 1, ...)
    heat = attention_to_pixels(maps, pixels.shape[:2])  # (layers, heads + 1, H, W)
    top = shared_max(heat)
    layers, columns = heat.shape[:2]
    aspect = pixels.shape[0] / pixels.shape[1]  # panels as tall as the image, not square
    fig = Figure(
        figsize=(1.9 * columns + 1.0, (1.9 * aspect + 0.3) * layers + 0.5), layout="constrained"
    )
    axes = fig.subplots(layers, columns, squeeze=False)
    for (row, col), ax in np.ndenumerate(axes):
        draw_overlay(ax, pixels, heat[row, col], top, alpha)
        if row == 0:
            ax.set_title("mean" if col == columns - 1 else f"head {col}", fontsize=10)
        if col == 0:
            ax.set_ylabel(f"layer {row}", fontsize=10)
    add_colorbar(fig, axes, top)
    label = f"word {word_index}" + ("" if word is None else f' "{word}"')
    fig.suptitle(f"image attention of {label}: layers × heads", fontsize=10)
    return fig
