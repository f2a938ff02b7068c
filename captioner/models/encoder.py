"""ViT-style vision encoder: patches -> bidirectional transformer -> one token per patch."""

from __future__ import annotations

import torch
from torch import nn

from captioner.models.blocks import EncoderBlock
from captioner.models.config import CaptionerConfig


def sincos_2d(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (N, dim): half the channels per axis."""
    rows, cols = grid_size
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (D/4,)
    ys, xs = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )  # fmt: skip
    parts = []
    for coord in (ys.flatten(), xs.flatten()):  # row-major patch order
        angles = coord[:, None] * omega[None, :]  # (N, D/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # (N, D)


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a conv whose stride is the patch size."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images)  # (B, D, grid_h, grid_w)
        return x.flatten(2).transpose(1, 2)  # (B, grid_h * grid_w, D), row-major


class VisionEncoder(nn.Module):
    """Turns an image into `grid_h * grid_w` patch tokens in row-major order.

    `grid_size` and `num_prefix_tokens` let attention over the tokens be mapped back to pixels.
    """

    num_prefix_tokens = 0  # no CLS token: every output token is a patch

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.grid_size = config.grid_size
        dim = config.encoder_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        else:
            self.register_buffer(
                "pos_embed", sincos_2d(self.grid_size, dim)[None], persistent=False
            )
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, config.encoder_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.encoder_depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, images: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Images (B, C, H, W) -> patch tokens (B, N, D) and, if asked, per-layer attention."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"expected images shaped (B, C, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(images.shape)}: resize them to data.image_size."
            )
        x = self.patch_embed(images) + self.pos_embed  # (B, N, D)
        weights = []
        for block in self.blocks:
            x, w = block(x, need_weights)
            weights.append(w)
        return self.norm(x), (weights if need_weights else None)
