"""Image encoders: what turns an image into tokens a caption decoder reads.

`ImageEncoder` is the interface everything else uses: its output tokens, and how they map
back to the image (`grid_size`, `patch_size`, `num_prefix_tokens`). `VisionEncoder` is the
ViT one: patches -> bidirectional transformer -> one token per patch.
"""

from __future__ import annotations

import torch
from torch import nn

from captioner.models.blocks import Block
from captioner.models.config import EncoderConfig
from captioner.models.rotary import Rotation, rotation


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


class ImageEncoder(nn.Module):
    """An image (B, C, H, W) -> tokens (B, num_prefix_tokens + grid_h * grid_w, dim): first the
    prefix tokens (CLS, registers), then one per patch in row-major order, row 0 at the top.

    `forward(images, need_weights)` returns the tokens and, when asked, the encoder's own
    attention per layer (B, heads, tokens, tokens); the grid, patch size and prefix count map
    any attention over the tokens back to pixels.
    """

    dim: int  # width of the tokens
    grid_size: tuple[int, int]  # patch rows, columns
    patch_size: int  # pixels a side of one patch
    num_prefix_tokens: int  # tokens before the patches

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def forward(
        self, images: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        raise NotImplementedError

    def attention_flops(self) -> int:
        """FLOPs of the attention products (Q K^T and weights x V) for one image."""
        raise NotImplementedError


class VisionEncoder(ImageEncoder):
    """The ViT encoder (`model/encoder=vit`): learned or fixed 2-D sin-cos positions added to
    the patches, or 2-D axial rotary positions in every attention (`rope`: half of each
    head's channels turn with the patch's row, half with its column); no prefix token (every
    output token is a patch)."""

    num_prefix_tokens = 0

    def __init__(self, config: EncoderConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.grid_size = config.grid_size
        self.patch_size = config.patch_size
        self.dim = dim = config.dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        rope = None
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        elif config.pos_embed == "sincos":
            self.register_buffer(
                "pos_embed", sincos_2d(self.grid_size, dim)[None], persistent=False
            )
        else:  # rope: (row, column) of each patch, row-major, instead of an added embedding
            self.pos_embed = None
            rows, cols = torch.meshgrid(
                torch.arange(self.grid_size[0]), torch.arange(self.grid_size[1]), indexing="ij"
            )
            coords = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (N, 2)
            rope = torch.stack(rotation(coords, dim // config.heads))  # (2, N, head_dim)
        self.register_buffer("rope", rope, persistent=False)  # cos, sin
        self.blocks = nn.ModuleList(
            Block(dim, config.heads, config.mlp_ratio, dropout, config.kv_heads)
            for _ in range(config.depth)
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
        x = self.patch_embed(images)  # (B, N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rope: Rotation | None = None
        if self.rope is not None:
            cos, sin = self.rope
            rope = (cos, sin)
        weights = []
        for block in self.blocks:
            x, w = block(x, need_weights, rope=rope)
            weights.append(w)
        return self.norm(x), (weights if need_weights else None)

    def attention_flops(self) -> int:
        return len(self.blocks) * 4 * self.num_tokens**2 * self.dim
