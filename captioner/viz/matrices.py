"""The three attention matrices of the captioner side by side, as plain matrices.

Cross-attention is rectangular (words × patches), decoder self-attention square and causal
(a word sees only <bos> and the words before it), encoder self-attention square and
bidirectional (every token sees every token). Seeing the three shapes together is the
quickest way to tell what attends to what.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from captioner.viz.encoder import check_tokens
from captioner.viz.overlay import CMAP, describe_selection, select_attention, word_maps


def _matrix_panel(fig: Figure, ax: Axes, matrix: np.ndarray, title: str, xlabel: str) -> None:
    """One matrix, rows = queries, columns = keys, its own colour scale from 0."""
    image = ax.imshow(matrix, cmap=CMAP, vmin=0.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)


def _label_rows(ax: Axes, labels: Sequence[str]) -> None:
    ax.set_yticks(range(len(labels)), labels, fontsize=8)


def attention_matrices(
    words: Sequence[str],
    image_attention: torch.Tensor,
    self_attention: torch.Tensor,
    encoder_attention: torch.Tensor | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
    num_prefix_tokens: int = 0,
) -> Figure:
    """Cross-, decoder self- and (if given) encoder self-attention matrices side by side.

    Takes a `Caption`'s `words`, `image_attention` (layers, heads, T, grid_h, grid_w),
    `self_attention` (layers, heads, T, T; keys <bos>, words[:-1]) and `encoder_attention`
    (layers, heads, N, N; N = num_prefix_tokens + patches, prefix tokens kept). `layer` and
    `head` pick one for every panel, or None averages. The masked upper triangle of the
    causal matrix is NaN, drawn blank, so "not allowed" differs from "allowed but ignored".
    """
    cross = word_maps(image_attention, words, layer, head).flatten(1)  # (T, gh * gw)
    causal = select_attention(self_attention, layer, head)  # (T, T)
    count, patches = cross.shape
    if causal.shape != (count, count):
        raise ValueError(f"{count} words but self-attention of shape {tuple(causal.shape)}.")
    causal = causal.masked_fill(torch.ones_like(causal).triu(1).bool(), float("nan"))

    panels = 2 if encoder_attention is None else 3
    fig = Figure(figsize=(5.2 * panels, 4.8), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    grid = "×".join(map(str, image_attention.shape[-2:]))
    _matrix_panel(
        fig,
        axes[0],
        cross.numpy(),
        f"image attention, words × patches: {count} × {patches}",
        f"patch ({grid} grid, row-major)",
    )
    _label_rows(axes[0], words)
    _matrix_panel(
        fig,
        axes[1],
        causal.numpy(),
        f"decoder self-attention (causal): {count} × {count}",
        "key token",
    )
    _label_rows(axes[1], words)
    axes[1].set_xticks(range(count), ["<bos>", *words[:-1]], rotation=90, fontsize=8)
    axes[1].set_aspect("equal")
    axes[0].set_ylabel("word being chosen (query)")
    if encoder_attention is not None:
        matrix = select_attention(encoder_attention, layer, head)  # (N, N)
        tokens = matrix.shape[-1]
        check_tokens(tokens, tuple(image_attention.shape[-2:]), num_prefix_tokens)
        xlabel = "key patch (row-major)"
        if num_prefix_tokens:
            xlabel = f"key token ({num_prefix_tokens} prefix, then patches row-major)"
        _matrix_panel(
            fig,
            axes[2],
            matrix.numpy(),
            f"encoder self-attention (bidirectional): {tokens} × {tokens}",
            xlabel,
        )
        axes[2].set_aspect("equal")
        if num_prefix_tokens:  # a line between the prefix tokens and the patches
            axes[2].axhline(num_prefix_tokens - 0.5, color="cyan", linewidth=0.8)
            axes[2].axvline(num_prefix_tokens - 0.5, color="cyan", linewidth=0.8)
    fig.suptitle(f"attention matrices, rows = queries ({describe_selection(layer, head)})")
    return fig
