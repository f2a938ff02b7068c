"""Where each generated word looked: its attention over the patches, blended over the image.

The helpers here (`as_rgb`, `blend_heatmap`, `draw_overlay`) are shared by every figure and by
the GIF, so a heat-map looks the same wherever it is drawn.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from PIL import Image

CMAP = "inferno"  # every heat-map and matrix, figures and GIF alike
ALPHA = 0.8  # opacity of the heat where attention is largest; it fades to 0 with the weight

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
    """RGB floats (H, W, 3) with the colour-mapped `heat` (H, W), scaled 0..`vmax`, laid on
    where the attention is: each pixel's opacity is `alpha` times its scaled weight, so a pixel
    nothing looks at keeps its own colour (a uniform blend would dim the whole image under the
    colormap's dark end). The same blend for figures and GIF frames."""
    level = np.clip(heat / max(vmax, 1e-12), 0.0, 1.0)  # (H, W)
    colours = heat_colormap(alpha)(level)  # (H, W, 4): RGB and opacity
    opacity = colours[..., 3:]  # (H, W, 1)
    return (1.0 - opacity) * pixels + opacity * colours[..., :3]  # (H, W, 3)


def heat_colormap(alpha: float) -> ListedColormap:
    """`CMAP` with an opacity that grows from 0 to `alpha` with the weight: what
    `blend_heatmap` lays on an image, so the colour bar shows the colours the panels show."""
    colours = matplotlib.colormaps[CMAP](np.linspace(0.0, 1.0, 256))  # (256, 4)
    colours[:, 3] = alpha * np.linspace(0.0, 1.0, 256)
    return ListedColormap(colours)


def draw_image(ax: Axes, rgb: np.ndarray) -> None:
    """One image panel without ticks or frame (so a y-label can still show)."""
    ax.imshow(rgb)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_overlay(ax: Axes, pixels: np.ndarray, heat: np.ndarray, vmax: float, alpha: float) -> None:
    """One image panel with `heat` blended on it."""
    draw_image(ax, blend_heatmap(pixels, heat, vmax, alpha))


def add_colorbar(fig: Figure, axes: Axes | np.ndarray, vmax: float, alpha: float) -> None:
    """The colour scale of panels blended with `blend_heatmap` (they hold RGB, not weights)."""
    mappable = ScalarMappable(norm=Normalize(0.0, vmax), cmap=heat_colormap(alpha))
    fig.colorbar(mappable, ax=axes, shrink=0.8, label="attention weight")


def shared_max(heat: np.ndarray) -> float:
    """One colour scale from 0 to the largest weight, so a diffuse look stays dim."""
    return max(float(heat.max()), 1e-12)


def word_maps(
    attention: torch.Tensor, words: Sequence[str], layer: int | None, head: int | None
) -> torch.Tensor:
    """Cross-attention (layers, heads, T, gh, gw) -> (T, gh, gw), checked against the words."""
    check_words(attention, words)
    return select_attention(attention, layer, head)


def check_words(attention: torch.Tensor, words: Sequence[str]) -> None:
    """Fail loudly when the words are not the ones the attention (..., T, gh, gw) was for."""
    if attention.shape[-3] != len(words) or not words:
        raise ValueError(
            f"{len(words)} words but image attention for {attention.shape[-3]} tokens."
        )


def word_overlays(
    image: ImageLike,
    attention: torch.Tensor,
    words: Sequence[str],
    *,
    layer: int | None = None,
    head: int | None = None,
    columns: int = 6,
    alpha: float = ALPHA,
) -> Figure:
    """The plain image, then one panel per word: the image with that word's attention on it.

    `attention` is `Caption.image_attention` (layers, heads, T, grid_h, grid_w); `layer` and
    `head` pick one, or None averages. All panels share one colour scale, from 0 to the
    largest weight of any word, shown by the colour bar, so a diffuse look stays dim and a
    sharp one bright; the plain panel shows what the heat covers.
    """
    pixels = as_rgb(image)
    heat = attention_to_pixels(word_maps(attention, words, layer, head), pixels.shape[:2])
    top = shared_max(heat)  # heat: (T, H, W)
    panels = len(words) + 1  # the plain image first
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(2.2 * cols + 0.8, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k == 0:
            draw_image(ax, pixels)
            ax.set_title("image", fontsize=11)
        elif k < panels:
            draw_overlay(ax, pixels, heat[k - 1], top, alpha)
            ax.set_title(words[k - 1], fontsize=11)
    add_colorbar(fig, axes, top, alpha)
    fig.suptitle(f"image attention per word ({describe_selection(layer, head)})", fontsize=10)
    return fig


def word_position(words: Sequence[str], word: int | str) -> int:
    """The index of `word` in `words`: an index (negative counts from the end) or the text of
    its first occurrence; so a title can always name both."""
    if isinstance(word, str):
        if word not in words:
            raise ValueError(f"{word!r} is not a word of the caption {list(words)}.")
        return list(words).index(word)
    index = operator.index(word)
    if not -len(words) <= index < len(words):
        raise ValueError(f"word {index} is outside the caption's {len(words)} words.")
    return index % len(words)


def head_grid(
    image: ImageLike,
    attention: torch.Tensor,
    words: Sequence[str],
    word: int | str,
    *,
    alpha: float = ALPHA,
) -> Figure:
    """Every layer and head's image attention for one word, to see which heads ground it.

    `word` is the word's index in `words` or its text (first occurrence); the title names the
    word shown and its index. Rows are layers, columns heads plus a last "mean" column (mean of
    that layer's heads), all on one colour scale so heads that look nowhere in particular stay
    dim.
    """
    check_words(attention, words)
    index = word_position(words, word)
    pixels = as_rgb(image)
    maps = attention[:, :, index].float()  # (layers, heads, gh, gw)
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
    add_colorbar(fig, axes, top, alpha)
    fig.suptitle(f'image attention of word {index} "{words[index]}": layers × heads', fontsize=10)
    return fig
