"""Attention rollout (Abnar & Zuidema, 2020): how much each input patch flows into each output
token through all encoder layers, residual connections included, instead of one layer's view."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from captioner.viz.encoder import outline_patch, query_map
from captioner.viz.overlay import (
    ALPHA,
    ImageLike,
    add_colorbar,
    as_rgb,
    attention_to_pixels,
    draw_overlay,
    select_attention,
    shared_max,
)

HEAD_FUSIONS = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}


def attention_rollout(
    encoder_attention: torch.Tensor,
    *,
    num_prefix_tokens: int = 0,
    residual: float = 0.5,
    head_fusion: str = "mean",
) -> torch.Tensor:
    """(layers, heads, N, N) or (B, layers, heads, N, N) -> (N, N) or (B, N, N), rows summing
    to 1: row i is how much each input token reaches output token i.

    Each layer becomes `residual * I + (1 - residual) * fuse_heads(A)`, rows renormalised (the
    residual stream carries the token itself), and the layers are multiplied first to last:
    `A'_L @ ... @ A'_1`. Prefix tokens stay in the matrix (they pass information between
    patches); `num_prefix_tokens` only checks the shape is square and large enough.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {tuple(HEAD_FUSIONS)}, got {head_fusion!r}.")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}.")
    if encoder_attention.ndim not in (4, 5) or encoder_attention.shape[-1] <= num_prefix_tokens:
        raise ValueError(
            f"expected (layers, heads, N, N) or (B, layers, heads, N, N) with N > "
            f"{num_prefix_tokens} prefix tokens, got {tuple(encoder_attention.shape)}."
        )
    attention = encoder_attention.double()
    heads = HEAD_FUSIONS[head_fusion](attention, dim=-3)  # (..., layers, N, N)
    eye = torch.eye(heads.shape[-1], dtype=heads.dtype, device=heads.device)
    layers = residual * eye + (1.0 - residual) * heads
    layers = layers / layers.sum(dim=-1, keepdim=True)  # (..., layers, N, N), rows sum to 1
    rollout = layers[..., 0, :, :]
    for k in range(1, layers.shape[-3]):
        rollout = layers[..., k, :, :] @ rollout  # later layers act on what earlier ones mixed
    return rollout.float()


def rollout_overlay(
    image: ImageLike,
    encoder_attention: torch.Tensor,
    grid: tuple[int, int],
    *,
    patch: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    residual: float = 0.5,
    head_fusion: str = "mean",
    alpha: float = ALPHA,
) -> Figure:
    """Rolled-out attention next to the last layer's raw attention (mean of heads), both for
    the same query, to show what the whole encoder mixes versus what its top layer sees.

    The query is `patch` (outlined), or when None the CLS token if `num_prefix_tokens > 0`,
    else the mean over all patch queries. Each panel has its own colour scale: rollout is
    flatter than one layer's attention.
    """
    pixels = as_rgb(image)
    rollout = attention_rollout(
        encoder_attention,
        num_prefix_tokens=num_prefix_tokens,
        residual=residual,
        head_fusion=head_fusion,
    )
    last = select_attention(encoder_attention, layer=-1, head=None)  # (N, N)
    panels = {
        f"rollout ({head_fusion} of heads, residual {residual:g})": rollout,
        "last layer (mean of heads)": last,
    }
    if patch is not None:
        query = f"patch {tuple(patch)}"
    else:
        query = "CLS token" if num_prefix_tokens else "mean of all patches"
    fig = Figure(figsize=(7.6, 3.6), layout="constrained")
    for ax, (title, matrix) in zip(fig.subplots(1, 2), panels.items(), strict=True):
        maps = query_map(matrix, grid, patch=patch, num_prefix_tokens=num_prefix_tokens)
        heat = attention_to_pixels(maps, pixels.shape[:2])  # (H, W)
        draw_overlay(ax, pixels, heat, shared_max(heat), alpha)
        if patch is not None:
            outline_patch(ax, patch, grid, pixels.shape[:2])
        add_colorbar(fig, ax, shared_max(heat), alpha)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"encoder attention from {query}", fontsize=10)
    return fig
