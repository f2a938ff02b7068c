"""One multi-head attention module for encoder self-, decoder causal self- and cross-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(
    num_queries: int,
    num_keys: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask, True where a query may attend a key, broadcastable to (B, heads, T, S).

    With causal masking the queries are the last `num_queries` positions of the keys, so the
    same rule serves a full sequence and a step that appends to a cache.
    """
    mask = None
    if causal:
        # (T, S): query t sees keys up to its own absolute position S - T + t
        mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(
            diagonal=num_keys - num_queries
        )
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = keep if mask is None else mask & keep
    return mask


class Attention(nn.Module):
    """Scaled dot-product attention over `context` (cross) or over `x` itself (self).

    The fused path calls `F.scaled_dot_product_attention`; `need_weights=True` computes
    softmax(QK^T / sqrt(d)) V explicitly and also returns the weights, for analysis.
    """

    def __init__(
        self, dim: int, num_heads: int, kv_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(kv_dim or dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from `x` (B, T, D) to `context` (B, S, Dkv), or to `x` when it is None.

        `key_padding_mask` (B, S) is True at keys to ignore. Returns the output (B, T, D) and,
        with `need_weights`, the attention weights (B, heads, T, S).
        """
        source = x if context is None else context
        batch, num_queries, dim = x.shape
        num_keys = source.shape[1]
        q = self.q_proj(x).view(batch, num_queries, self.num_heads, self.head_dim)
        q = q.transpose(1, 2)  # (B, heads, T, d)
        kv = self.kv_proj(source).view(batch, num_keys, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, S, d)
        dropout = self.dropout if self.training else 0.0

        # Without padding, a full causal or unmasked pass takes SDPA's built-in fast path.
        fast = (
            not need_weights
            and key_padding_mask is None
            and (not causal or num_queries == num_keys)
        )
        mask = None
        if not fast:
            mask = attention_mask(
                num_queries, num_keys, causal=causal, key_padding_mask=key_padding_mask,
                device=x.device,
            )  # fmt: skip
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v  # (B, heads, T, d)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and fast
            )  # (B, heads, T, d)
        out = out.transpose(1, 2).reshape(batch, num_queries, dim)  # (B, T, D)
        return self.out_proj(out), weights
