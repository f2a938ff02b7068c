"""Encoder self-attention as maps: what one patch (or the CLS token) looks at in the image.

Encoder attention is over `num_prefix_tokens + grid_h * grid_w` tokens: prefix tokens (a CLS
token, registers) first, then the patches in row-major order with row 0 at the top. Maps drop
the prefix keys; matrices keep them.
"""

from __future__ import annotations

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from captioner.viz.overlay import (
    ALPHA,
    ImageLike,
    add_colorbar,
    as_rgb,
    attention_to_pixels,
    describe_selection,
    draw_overlay,
    select_attention,
    shared_max,
)


def check_tokens(num_tokens: int, grid: tuple[int, int], num_prefix_tokens: int) -> None:
    """Fail loudly when the token count does not match the grid (a forgotten CLS token)."""
    expected = num_prefix_tokens + grid[0] * grid[1]
    if num_tokens != expected:
        raise ValueError(
            f"{num_tokens} tokens, but {num_prefix_tokens} prefix tokens + a {grid[0]}×{grid[1]}"
            f" patch grid make {expected}."
        )


def query_map(
    matrix: torch.Tensor,
    grid: tuple[int, int],
    *,
    patch: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Square attention (N, N) -> one query's weights over the patches (grid_h, grid_w).

    The query is patch (row, column); or, when `patch` is None, the first prefix (CLS) token
    if there is one, else the mean over all patch queries. Prefix keys are dropped, so the map
    need not sum to 1: the rest went to the prefix tokens.
    """
    check_tokens(matrix.shape[-1], grid, num_prefix_tokens)
    if patch is not None:
        row, col = patch
        if not (0 <= row < grid[0] and 0 <= col < grid[1]):
            raise ValueError(f"patch {patch} is outside the {grid[0]}×{grid[1]} grid.")
        weights = matrix[num_prefix_tokens + row * grid[1] + col]
    elif num_prefix_tokens > 0:
        weights = matrix[0]
    else:
        weights = matrix.mean(dim=0)
    return weights[num_prefix_tokens:].float().reshape(grid)  # (N,) -> (grid_h, grid_w)


def encoder_patch_map(
    encoder_attention: torch.Tensor,
    patch: tuple[int, int],
    grid: tuple[int, int],
    *,
    layer: int | None = None,
    head: int | None = None,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """(layers, heads, N, N) -> (grid_h, grid_w): where patch `patch` looked, prefix dropped."""
    matrix = select_attention(encoder_attention, layer, head)
    return query_map(matrix, grid, patch=patch, num_prefix_tokens=num_prefix_tokens)


def outline_patch(
    ax: Axes, patch: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]
) -> None:
    """Draw the pixel block of `patch` on an image panel of `size` (height, width) pixels;
    the block need not be a whole number of pixels."""
    height, width = size[0] / grid[0], size[1] / grid[1]
    corner = (patch[1] * width - 0.5, patch[0] * height - 0.5)  # imshow puts pixel edges at -0.5
    ax.add_patch(Rectangle(corner, width, height, fill=False, edgecolor="cyan", linewidth=2))


def encoder_attention_from_patch(
    image: ImageLike,
    encoder_attention: torch.Tensor,
    patch: tuple[int, int],
    grid: tuple[int, int],
    *,
    layer: int | None = None,
    head: int | None = None,
    num_prefix_tokens: int = 0,
    alpha: float = ALPHA,
) -> Figure:
    """Where one query patch (outlined) looks in the encoder: its row of self-attention
    over the image, to see whether the encoder mixes nearby or related regions."""
    pixels = as_rgb(image)
    maps = encoder_patch_map(
        encoder_attention, patch, grid, layer=layer, head=head, num_prefix_tokens=num_prefix_tokens
    )
    heat = attention_to_pixels(maps, pixels.shape[:2])  # (H, W)
    top = shared_max(heat)
    fig = Figure(figsize=(4.2, 3.6), layout="constrained")
    ax = fig.subplots()
    draw_overlay(ax, pixels, heat, top, alpha)
    outline_patch(ax, patch, grid, pixels.shape[:2])
    add_colorbar(fig, ax, top, alpha)
    title = f"encoder attention from patch {tuple(patch)}\n({describe_selection(layer, head)})"
    if num_prefix_tokens:
        title += f"; {1.0 - float(maps.sum()):.0%} on prefix tokens"
    ax.set_title(title, fontsize=9)
    return fig
