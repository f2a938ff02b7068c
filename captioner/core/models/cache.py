"""What the decoder keeps between decoding steps, so each new token costs one position."""

from __future__ import annotations

import torch


class LayerCache:
    """One decoder block's keys and values.

    The image's keys/values are computed once per image and only read afterwards, by every
    beam of it: `memory_kv`, a cross-attention's (None in a block that does not read the
    image), or `prefix_kv`, the prefix decoder's self-attention keys/values of the image
    positions, which come before the words'. The block's own self-attention keys/values go
    into buffers allocated once, at the first step, for the longest sequence: a step writes its
    positions and reads a view.
    """

    def __init__(
        self,
        max_len: int,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.memory_kv = memory_kv  # each (images, heads, S, d)
        self.prefix_kv = prefix_kv  # each (images, heads, N, d)
        self.max_len = max_len
        self.keys: torch.Tensor | None = None  # (rows, heads, max_len, d)
        self.values: torch.Tensor | None = None
        self.length = 0  # positions filled

    @property
    def image_positions(self) -> int:
        """How many image positions come before the words' (the prefix decoder's)."""
        return 0 if self.prefix_kv is None else self.prefix_kv[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held: the image's keys/values and the words' buffers."""
        held = [*(self.memory_kv or ()), *(self.prefix_kv or ()), self.keys, self.values]
        return sum(t.nbytes for t in held if t is not None)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys/values (rows, heads, t, d); return all filled so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the decoder cache holds {self.max_len} positions, asked for {end}")
        if self.keys is None or self.values is None:
            rows, heads, _, head_dim = k.shape
            self.keys = k.new_empty(rows, heads, self.max_len, head_dim)
            self.values = v.new_empty(rows, heads, self.max_len, head_dim)
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # (rows, heads, end, d)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i continues the history of old row `index[i]` (beam search)."""
        if self.keys is None or self.values is None:
            return
        filled = slice(0, self.length)
        self.keys[:, :, filled] = self.keys[:, :, filled].index_select(0, index)
        self.values[:, :, filled] = self.values[:, :, filled].index_select(0, index)


class DecoderCache:
    """The caches of every decoder block; they always hold the same number of positions."""

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers

    @property
    def length(self) -> int:
        """Positions already decoded: the position of the next token."""
        return self.layers[0].length

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer (divide by the images decoded for a per-image figure)."""
        return sum(layer.nbytes for layer in self.layers)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i continues the history of old row `index[i]` (beam search)."""
        for layer in self.layers:
            layer.reorder(index)
