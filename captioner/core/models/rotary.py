"""Rotary position embeddings (RoPE): positions enter attention as rotations of queries and
keys, so a query-key score depends on the positions only through their difference.

One rule serves words and patches: the head dimension is split into one chunk per position
axis (1 for a word's index, 2 for a patch's row and column: axial 2-D RoPE), and each chunk's
channel pairs (2i, 2i + 1) are rotated by the axis coordinate at geometric frequencies.
"""

from __future__ import annotations

import torch

Rotation = tuple[torch.Tensor, torch.Tensor]  # cos, sin, each (T, head_dim)


def rotation(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> Rotation:
    """cos and sin (T, head_dim) for positions (T, axes): axis a rotates the a-th chunk of
    head_dim / axes channels, its frequencies base^(-i / n) for i < n = head_dim / (2 axes)."""
    positions = positions.double()
    axes = positions.shape[1]
    if head_dim % (2 * axes):
        raise ValueError(f"rotary embedding over {axes} axes needs head_dim divisible by "
                         f"{2 * axes}, got {head_dim}")  # fmt: skip
    n = head_dim // (2 * axes)
    freqs = base ** (-torch.arange(n, dtype=torch.float64) / n)  # (n,)
    angles = (positions[:, :, None] * freqs).flatten(1)  # (T, axes * n): one per channel pair
    angles = angles.repeat_interleave(2, dim=1)  # (T, head_dim)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Rotate queries or keys (..., T, head_dim) by `rot` (T, head_dim), each channel pair
    (2i, 2i + 1) as a point in the plane."""
    cos, sin = rot
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # each (..., T, head_dim / 2)
    turned = torch.stack((-odd, even), dim=-1).flatten(-2)  # (..., T, head_dim)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)
