"""Pre-norm transformer blocks: self-attention -> MLP (the encoder's, and the prefix
decoder's under its mask), and the cross decoder's self -> cross -> MLP."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from captioner.core.models.attention import Attention
from captioner.core.models.cache import DecoderCache, LayerCache
from captioner.core.models.rotary import Rotation


class Reading(NamedTuple):
    """What a caption decoder reads besides the words: the image tokens (B, S, Dimg), or a
    cache of what they became, the padding of words and image tokens, and whether to return
    attention weights."""

    memory: torch.Tensor | None
    token_padding_mask: torch.Tensor | None = None
    memory_padding_mask: torch.Tensor | None = None
    need_weights: bool = False
    cache: DecoderCache | None = None


class MLP(nn.Sequential):
    """Position-wise feed-forward layer."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class Block(nn.Module):
    """Self-attention then MLP. Unmasked it is the encoder's bidirectional block; with a
    boolean `mask` (True where a query may attend a key) or a decoding `cache` it is the
    prefix decoder's."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, dropout: float, kv_heads: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout=dropout, kv_heads=kv_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self,
        x: torch.Tensor,
        need_weights: bool = False,
        *,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        rope: Rotation | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With a `cache`, `x` holds the newest word positions only: they attend the cached
        image positions (shared by an image's beams), the cached words and themselves.
        `rope` rotates the queries and keys of `x`'s positions."""
        attn_out, weights = self.attn(
            self.norm1(x), need_weights=need_weights, mask=mask, cache=cache,
            causal=cache is not None, rope=rope,
        )  # fmt: skip
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, weights


class DecoderBlock(nn.Module):
    """Causal self-attention over the words so far, cross-attention to the image tokens (when
    this block reads the image), MLP. A `gated` block scales its cross-attention by
    tanh(gate), the gate starting at 0 (Flamingo), so the image is let in gradually."""

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int,
        mlp_ratio: float,
        dropout: float,
        reads_image: bool = True,
        gated: bool = False,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout=dropout, kv_heads=kv_heads)
        self.reads_image = reads_image
        if reads_image:
            self.norm2 = nn.LayerNorm(dim)
            self.cross_attn = Attention(
                dim, heads, kv_dim=context_dim, dropout=dropout, kv_heads=kv_heads
            )
            self.cross_gate = nn.Parameter(torch.zeros(())) if gated else None
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self,
        x: torch.Tensor,
        reading: Reading,
        cache: LayerCache | None = None,
        rope: Rotation | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns the new stream and, with `need_weights`, self- and cross-attention weights
        (None for the latter in a block that does not read the image). `rope` rotates the
        self-attention's queries and keys by word position; the image is read without it.

        With a `cache` (this block's layer of `reading.cache`), `x` holds only the new
        positions: their keys and values are appended to it, and the image's keys and values
        come from it instead of `reading.memory`.
        """
        attn_out, self_weights = self.self_attn(
            self.norm1(x), causal=True, key_padding_mask=reading.token_padding_mask,
            need_weights=reading.need_weights, cache=cache, rope=rope,
        )  # fmt: skip
        x = x + attn_out
        cross_weights = None
        if self.reads_image:
            attn_out, cross_weights = self.cross_attn(
                self.norm2(x), reading.memory, key_padding_mask=reading.memory_padding_mask,
                need_weights=reading.need_weights, kv=None if cache is None else cache.memory_kv,
            )  # fmt: skip
            if self.cross_gate is not None:
                attn_out = attn_out * self.cross_gate.tanh()
            x = x + attn_out
        x = x + self.mlp(self.norm3(x))
        return x, self_weights, cross_weights
