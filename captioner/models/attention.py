"""One multi-head attention module for encoder self-, decoder causal self- and cross-attention,
and for the prefix decoder's self-attention over image and word positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.cache import LayerCache


def attention_mask(
    num_queries: int,
    num_keys: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask, True where a query may attend a key, broadcastable to (B, heads, T, S):
    `mask` (T, S) if given, and causal order and key padding if asked.

    With causal masking the queries are the last `num_queries` positions of the keys, so the
    same rule serves a full sequence and a step that appends to a cache.
    """
    if causal:
        # (T, S): query t sees keys up to its own absolute position S - T + t
        order = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(
            diagonal=num_keys - num_queries
        )
        mask = order if mask is None else mask & order
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = keep if mask is None else mask & keep
    return mask


class Attention(nn.Module):
    """Scaled dot-product attention over `context` (cross) or over `x` itself (self).

    The fused path calls `F.scaled_dot_product_attention`; `need_weights=True` computes
    softmax(QK^T / sqrt(d)) V explicitly and also returns the weights, for analysis.
    Self-attention projects queries, keys and values in one matmul and can append its keys
    and values to a decoding cache; cross-attention (`kv_dim` given) can take the context's
    keys and values already projected (`kv`), as decoding does at every step. A self-attention
    cache that holds `prefix_kv` (the prefix decoder's) puts those keys before its own: the
    image positions, computed once per image and read by every beam of it without copies.
    """

    def __init__(
        self, dim: int, num_heads: int, kv_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_cross = kv_dim is not None
        if self.is_cross:
            self.q_proj = nn.Linear(dim, dim)
            self.kv_proj = nn.Linear(kv_dim, 2 * dim)
        else:
            self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, T, parts * D) -> `parts` tensors shaped (B, heads, T, d)."""
        batch, length, _ = x.shape
        x = x.view(batch, length, parts, self.num_heads, self.head_dim)
        return x.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, d)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `context` (B, S, Dkv), each (B, heads, S, d): cross-attention's
        of the image tokens, or self-attention's own (the prefix decoder's image positions)."""
        if self.is_cross:
            k, v = self._heads(self.kv_proj(context), 2)
            return k, v
        _, k, v = self._heads(self.qkv_proj(context), 3)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from `x` (B, T, D) to `context` (B, S, Dkv), or to `x` when it is None.

        `key_padding_mask` (B, S) is True at keys to ignore; `mask` (T, S) is True where a
        query may attend a key (the prefix decoder's prefix-LM mask). Cross-attention: `kv`,
        if given, replaces the projection of `context` with keys and values (Bkv, heads, S, d),
        where B is a multiple of Bkv, so the B / Bkv beams of one image read its keys without
        copies.
        Self-attention: with a `cache`, `x` holds only the newest positions, whose keys and
        values join the cached ones. Causal queries are the last T of the S key positions.
        Returns the output (B, T, D) and, with `need_weights`, the weights (B, heads, T, S).
        """
        batch, num_queries, dim = x.shape
        if self.is_cross:
            (q,) = self._heads(self.q_proj(x), 1)
            if kv is None and context is None:
                raise ValueError("cross-attention needs a context or its projected kv")
            k, v = kv if kv is not None else self.project_kv(context)
        else:
            if context is not None:
                raise ValueError("self-attention takes no context: give kv_dim for cross")
            q, k, v = self._heads(self.qkv_proj(x), 3)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, heads, S, d): every position so far
                if cache.prefix_kv is not None:  # image positions first, shared by beams
                    out, weights = self._after_prefix(q, (k, v), cache.prefix_kv, need_weights)
                    out = out.transpose(1, 2).reshape(batch, num_queries, dim)  # (B, T, D)
                    return self.out_proj(out), weights
        num_keys = k.shape[2]
        groups = batch // k.shape[0]
        if groups > 1:  # several query rows per key row: fold them into the query axis
            if causal:
                raise ValueError("shared keys/values are for cross-attention, not causal")
            q = q.reshape(k.shape[0], groups, self.num_heads, num_queries, self.head_dim)
            q = q.transpose(1, 2).flatten(2, 3)  # (Bkv, heads, groups * T, d)
        # The only query of a causal step is the newest position, which sees every key.
        causal = causal and num_queries > 1
        dropout = self.dropout if self.training else 0.0

        # Without padding, a full causal or unmasked pass takes SDPA's built-in fast path.
        fast = (
            not need_weights
            and key_padding_mask is None
            and mask is None
            and (not causal or num_queries == num_keys)
        )
        if not fast:
            mask = attention_mask(
                num_queries, num_keys, causal=causal, key_padding_mask=key_padding_mask,
                device=x.device, mask=mask,
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
        if groups > 1:  # unfold the beams back into the batch
            out = out.unflatten(2, (groups, num_queries)).transpose(1, 2)  # (Bkv, G, h, T, d)
            out = out.reshape(batch, self.num_heads, num_queries, self.head_dim)
            if weights is not None:
                weights = weights.unflatten(2, (groups, num_queries)).transpose(1, 2)
                weights = weights.reshape(batch, self.num_heads, num_queries, num_keys)
        out = out.transpose(1, 2).reshape(batch, num_queries, dim)  # (B, T, D)
        return self.out_proj(out), weights

    def _after_prefix(
        self,
        q: torch.Tensor,
        own: tuple[torch.Tensor, torch.Tensor],
        prefix: tuple[torch.Tensor, torch.Tensor],
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoding queries (B, heads, T, d), the newest of the word positions, over the image
        positions' keys/values `prefix` (Bimg, heads, N, d), shared by the B / Bimg beams of
        an image, then the words' own `own` (B, heads, t, d), causally: one softmax over both,
        without copying the image's keys per beam. Returns (B, heads, T, d) and, with
        `need_weights`, (B, heads, T, N + t)."""
        (k, v), (k_img, v_img) = own, prefix
        batch, heads, num_queries, head_dim = q.shape
        images, num_image = k_img.shape[0], k_img.shape[2]
        groups = batch // images
        scale = 1.0 / math.sqrt(head_dim)
        folded = q.reshape(images, groups, heads, num_queries, head_dim).transpose(1, 2)
        folded = folded.flatten(2, 3)  # (Bimg, heads, G * T, d)
        image_scores = (folded @ k_img.transpose(-2, -1)) * scale  # (Bimg, heads, G * T, N)
        image_scores = image_scores.unflatten(2, (groups, num_queries)).transpose(1, 2)
        image_scores = image_scores.reshape(batch, heads, num_queries, num_image)
        word_scores = (q @ k.transpose(-2, -1)) * scale  # (B, heads, T, t)
        if num_queries > 1:  # query i is word position t - T + i: no later word
            causal = attention_mask(num_queries, k.shape[2], causal=True, key_padding_mask=None,
                                    device=q.device)  # fmt: skip
            word_scores = word_scores.masked_fill(~causal, float("-inf"))
        weights = torch.cat([image_scores, word_scores], dim=-1).softmax(dim=-1)
        to_image, to_words = weights.split([num_image, k.shape[2]], dim=-1)
        to_image = to_image.reshape(images, groups, heads, num_queries, num_image)
        to_image = to_image.transpose(1, 2).flatten(2, 3)  # (Bimg, heads, G * T, N)
        from_image = (to_image @ v_img).unflatten(2, (groups, num_queries)).transpose(1, 2)
        out = from_image.reshape(batch, heads, num_queries, head_dim) + to_words @ v
        return out, weights if need_weights else None
