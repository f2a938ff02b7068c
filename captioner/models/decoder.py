"""Causal text decoder that reads the image through cross-attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from captioner.models.blocks import DecoderBlock
from captioner.models.cache import DecoderCache, LayerCache
from captioner.models.config import CaptionerConfig


@dataclass
class DecoderOutput:
    """Logits and, when asked, per-layer attention weights (B, heads, T, S) for each layer."""

    logits: torch.Tensor  # (B, T, vocab)
    self_attention: list[torch.Tensor] | None = None
    cross_attention: list[torch.Tensor] | None = None


@dataclass
class DecoderStates:
    """The final normed states before the output projection, and the attention weights."""

    hidden: torch.Tensor  # (B, T, D)
    self_attention: list[torch.Tensor] | None = None
    cross_attention: list[torch.Tensor] | None = None


class TextDecoder(nn.Module):
    """Token + position embeddings, pre-norm blocks, final norm, output tied to the input."""

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        dim = config.decoder_dim
        self.max_len = config.max_len
        self.token_embed = nn.Embedding(config.vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_len, dim))
        self.blocks = nn.ModuleList(
            DecoderBlock(
                dim, config.decoder_heads, config.encoder_dim, config.mlp_ratio, config.dropout
            )
            for _ in range(config.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config.vocab_size, bias=False)
        self.head.weight = self.token_embed.weight  # tied: one matrix for words in and out

    def init_cache(self, memory: torch.Tensor, max_len: int | None = None) -> DecoderCache:
        """A cache for decoding captions of these images (B, S, Dimg), up to `max_len` tokens.

        The image's cross-attention keys and values are projected here, once per image and
        block; every later step (and every beam of the image) reads them.
        """
        max_len = self.max_len if max_len is None else min(max_len, self.max_len)
        return DecoderCache(
            [LayerCache(block.cross_attn.project_kv(memory), max_len) for block in self.blocks]
        )

    def forward(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor | None,
        token_padding_mask: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        cache: DecoderCache | None = None,
        last_only: bool = False,
    ) -> DecoderOutput:
        """Tokens (B, T) and image tokens (B, S, Dimg) -> next-token logits (B, T, vocab).

        With a `cache` (from `init_cache`), `tokens` are only the new positions, which follow
        the `cache.length` positions already decoded, and `memory` is not needed. The cache
        rows may be beams: B is then a multiple of the number of images. `last_only` computes
        the logits of the last position alone (B, 1, vocab), all that decoding needs.
        """
        states = self.features(
            tokens, memory, token_padding_mask, memory_padding_mask, need_weights, cache
        )
        if last_only:
            # (W h^T)^T: with few rows, BLAS runs faster with the vocabulary matrix on the
            # left, streamed, than on the right, where it is repacked at every step
            logits = torch.mm(self.head.weight, states.hidden[:, -1].T).T[:, None]  # (B, 1, V)
        else:
            logits = self.head(states.hidden)
        return DecoderOutput(logits, states.self_attention, states.cross_attention)

    def features(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor | None,
        token_padding_mask: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        cache: DecoderCache | None = None,
    ) -> DecoderStates:
        """`forward` without the output projection, for a loss that projects only the
        positions it scores."""
        start = 0 if cache is None else cache.length
        end = start + tokens.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"token sequence of length {end} exceeds model.max_len={self.max_len}."
            )
        x = self.token_embed(tokens) + self.pos_embed[:, start:end]  # (B, T, D)
        self_weights, cross_weights = [], []
        for i, block in enumerate(self.blocks):
            x, sw, cw = block(
                x, memory, token_padding_mask, memory_padding_mask, need_weights,
                None if cache is None else cache.layers[i],
            )  # fmt: skip
            self_weights.append(sw)
            cross_weights.append(cw)
        if not need_weights:
            return DecoderStates(self.norm(x))
        return DecoderStates(self.norm(x), self_weights, cross_weights)
