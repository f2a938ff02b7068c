"""Pre-norm transformer blocks: encoder (self -> MLP) and decoder (self -> cross -> MLP)."""

from __future__ import annotations

import torch
from torch import nn

from captioner.models.attention import Attention
from captioner.models.cache import LayerCache


class MLP(nn.Sequential):
    """Position-wise feed-forward layer."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class EncoderBlock(nn.Module):
    """Bidirectional self-attention: every patch sees every patch (no mask)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(self.norm1(x), need_weights=need_weights)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, weights


class DecoderBlock(nn.Module):
    """Causal self-attention over the words so far, cross-attention to the patches, MLP."""

    def __init__(
        self, dim: int, heads: int, context_dim: int, mlp_ratio: float, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, kv_dim=context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        token_padding_mask: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns the new stream and, with `need_weights`, self- and cross-attention weights.

        With a `cache`, `x` holds only the new positions: their keys and values are appended
        to the cache, and the image's keys and values come from it instead of `memory`.
        """
        attn_out, self_weights = self.self_attn(
            self.norm1(x), causal=True, key_padding_mask=token_padding_mask,
            need_weights=need_weights, cache=cache,
        )  # fmt: skip
        x = x + attn_out
        attn_out, cross_weights = self.cross_attn(
            self.norm2(x), memory, key_padding_mask=memory_padding_mask,
            need_weights=need_weights, kv=None if cache is None else cache.memory_kv,
        )  # fmt: skip
        x = x + attn_out
        x = x + self.mlp(self.norm3(x))
        return x, self_weights, cross_weights
