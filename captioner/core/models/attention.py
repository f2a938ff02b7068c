"""One multi-head attention module for encoder self-, decoder causal self- and cross-attention,
and for the prefix decoder's self-attention over image and word positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from captioner.core.models.cache import LayerCache
from captioner.core.models.rotary import Rotation, rotate


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

    Grouped-query attention: keys and values have `kv_heads` heads (`num_heads` by default;
    1 is multi-query), each read by `num_heads / kv_heads` query heads. The query heads of a
    group are folded into the query axis, as the beams of one image are, so both paths read
    the keys and values as they are stored, never repeated per query head.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kv_dim: int | None = None,
        dropout: float = 0.0,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv_heads = num_heads if kv_heads is None else kv_heads
        if num_heads % self.kv_heads:
            raise ValueError(f"{num_heads} query heads do not split into {self.kv_heads} groups")
        self.head_dim = dim // num_heads
        kv_width = self.kv_heads * self.head_dim
        self.is_cross = kv_dim is not None
        if self.is_cross:
            self.q_proj = nn.Linear(dim, dim)
            self.kv_proj = nn.Linear(kv_dim, 2 * kv_width)
        else:
            self.qkv_proj = nn.Linear(dim, dim + 2 * kv_width)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, heads * d) -> (B, heads, T, d)."""
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def _kv(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = projected.chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `context` (B, S, Dkv), each (B, kv_heads, S, d): cross-attention's
        of the image tokens, or self-attention's own (the prefix decoder's image positions)."""
        if self.is_cross:
            return self._kv(self.kv_proj(context))
        return self._kv(self.qkv_proj(context)[..., self.num_heads * self.head_dim :])

    def _fold(self, q: torch.Tensor, rows: int) -> torch.Tensor:
        """Queries (B, heads, T, d) -> (rows, kv_heads, B / rows * groups * T, d): the beams of
        a key row and the query heads of a key head, side by side on the query axis."""
        batch, _, length, head_dim = q.shape
        q = q.reshape(rows, batch // rows, self.kv_heads, -1, length, head_dim)
        return q.transpose(1, 2).reshape(rows, self.kv_heads, -1, head_dim)

    def _unfold(self, x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """The inverse of `_fold` for outputs or weights: (rows, kv_heads, ..., X) ->
        (B, heads, T, X), one row per query head."""
        rows, last = x.shape[0], x.shape[-1]
        x = x.reshape(rows, self.kv_heads, batch // rows, -1, last).transpose(1, 2)
        return x.reshape(batch, self.num_heads, length, last)

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
        rope: Rotation | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from `x` (B, T, D) to `context` (B, S, Dkv), or to `x` when it is None.

        `key_padding_mask` (B, S) is True at keys to ignore; `mask` (T, S) is True where a
        query may attend a key (the prefix decoder's prefix-LM mask). Cross-attention: `kv`,
        if given, replaces the projection of `context` with keys and values
        (Bkv, kv_heads, S, d), where B is a multiple of Bkv, so the B / Bkv beams of one image
        read its keys without copies.
        Self-attention: `rope` (cos, sin), each (T, d), rotates the queries and keys of `x`'s
        positions. With a `cache`, `x` holds only the newest positions, whose keys and values
        join the cached ones. Causal queries are the last T of the S key positions.
        Returns the output (B, T, D) and, with `need_weights`, the weights (B, heads, T, S).
        """
        batch, num_queries, dim = x.shape
        if self.is_cross:
            q = self._heads(self.q_proj(x))
            if kv is None and context is None:
                raise ValueError("cross-attention needs a context or its projected kv")
            k, v = kv if kv is not None else self.project_kv(context)
        else:
            if context is not None:
                raise ValueError("self-attention takes no context: give kv_dim for cross")
            projected = self.qkv_proj(x)
            q = self._heads(projected[..., :dim])
            k, v = self._kv(projected[..., dim:])
            if rope is not None:
                q, k = rotate(q, rope), rotate(k, rope)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, kv_heads, S, d): every position so far
                if cache.prefix_kv is not None:  # image positions first, shared by beams
                    out, weights = self._after_prefix(q, (k, v), cache.prefix_kv, need_weights)
                    out = out.transpose(1, 2).reshape(batch, num_queries, dim)  # (B, T, D)
                    return self.out_proj(out), weights
        rows, num_keys = k.shape[0], k.shape[2]
        if causal and rows != batch:
            raise ValueError("shared keys/values are for cross-attention, not causal")
        folds = batch // rows * self.num_heads // self.kv_heads  # query rows per key row
        # The only query of a causal step is the newest position, which sees every key.
        causal = causal and num_queries > 1
        dropout = self.dropout if self.training else 0.0

        # Without padding or folding, a full causal or unmasked pass takes SDPA's fast path.
        fast = (
            not need_weights
            and key_padding_mask is None
            and mask is None
            and (not causal or (num_queries == num_keys and folds == 1))
        )
        if not fast:
            mask = attention_mask(
                num_queries, num_keys, causal=causal, key_padding_mask=key_padding_mask,
                device=x.device, mask=mask,
            )  # fmt: skip
            if mask is not None and mask.shape[-2] > 1 and folds > 1:  # one copy per fold
                mask = mask.repeat(*([1] * (mask.ndim - 2)), folds, 1)
        q = self._fold(q, rows)  # (Bkv, kv_heads, folds * T, d)
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)  # (Bkv, kv_heads, folds * T, S)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = self._unfold(weights, batch, num_queries)  # (B, heads, T, S)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and fast
            )
        out = self._unfold(out, batch, num_queries)  # (B, heads, T, d)
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
        positions' keys/values `prefix` (Bimg, kv_heads, N, d), shared by the B / Bimg beams of
        an image, then the words' own `own` (B, kv_heads, t, d), causally: one softmax over
        both, without copying the image's keys per beam. Returns (B, heads, T, d) and, with
        `need_weights`, (B, heads, T, N + t)."""
        (k, v), (k_img, v_img) = own, prefix
        batch, _, num_queries, head_dim = q.shape
        images, num_image = k_img.shape[0], k_img.shape[2]
        scale = 1.0 / math.sqrt(head_dim)
        image_scores = (self._fold(q, images) @ k_img.transpose(-2, -1)) * scale
        image_scores = self._unfold(image_scores, batch, num_queries)  # (B, heads, T, N)
        word_scores = self._fold(q, batch) @ k.transpose(-2, -1) * scale
        word_scores = self._unfold(word_scores, batch, num_queries)  # (B, heads, T, t)
        if num_queries > 1:  # query i is word position t - T + i: no later word
            causal = attention_mask(num_queries, k.shape[2], causal=True, key_padding_mask=None,
                                    device=q.device)  # fmt: skip
            word_scores = word_scores.masked_fill(~causal, float("-inf"))
        weights = torch.cat([image_scores, word_scores], dim=-1).softmax(dim=-1)
        to_image, to_words = weights.split([num_image, k.shape[2]], dim=-1)
        from_image = self._unfold(self._fold(to_image, images) @ v_img, batch, num_queries)
        from_words = self._unfold(self._fold(to_words, batch) @ v, batch, num_queries)
        return from_image + from_words, weights if need_weights else None
