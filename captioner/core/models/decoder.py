"""Caption decoders: words so far + image tokens -> next-word logits, and where each word
looked in the image.

`CaptionDecoder` is the interface everything else uses (generation, inference, training,
grounding): word and position embeddings, the output projection tied to the word embedding,
a KV cache, and per-layer attention split into the words' attention over the image
(`image_attention`) and over the words (`self_attention`), whatever the fusion. Two fusions:
- `CrossAttentionDecoder` (`model/decoder=cross`): each block is causal self-attention over
  the words, cross-attention from the words to the image tokens, MLP; with `cross_every=k`
  only every k-th block reads the image, through a tanh gate starting at 0. Attention costs
  m^2 + n*m for m words and n image tokens.
- `PrefixDecoder` (`model/decoder=prefix`): decoder-only. The image tokens, projected to the
  decoder's width, are the first n positions, the words the next m, in one stack of
  self-attention blocks under a prefix-LM mask: image positions see every image position
  (never a word), a word sees every image position and the words up to itself. Attention
  costs (n + m)^2, and the decoder's MLPs run over the image positions too. The image
  positions keep the encoder's 2-D position information and get no word position; the words
  take positions 0, 1, ... as in the cross decoder, so a caption's positions do not depend on
  how many patches the encoder makes. With rotary word positions (`pos_embed: rope`) the
  image positions are not rotated, for the same reason: the image tokens are a 2-D layout
  the encoder has already encoded, not a 1-D sequence before the first word, and a word's
  score against an image key depends on the word's position alone, as with learned ones.

Word positions are learned embeddings added to the words, or rotary (`pos_embed: rope`):
the self-attention's queries and keys turn by the word's index, applied before the keys are
cached, so a word decoded step by step gets the rotation it gets in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.core.models.blocks import Block, DecoderBlock, Reading
from captioner.core.models.cache import DecoderCache, LayerCache
from captioner.core.models.config import CaptionerConfig
from captioner.core.models.rotary import Rotation, rotation


@dataclass
class DecoderOutput:
    """Logits and, when asked, per-layer attention weights."""

    logits: torch.Tensor  # (B, T, vocab)
    self_attention: list[torch.Tensor] | None = None  # per layer (B, heads, T, T)
    image_attention: list[torch.Tensor] | None = None  # per image-reading layer (B, heads, T, S)


@dataclass
class DecoderFlops:
    """FLOPs of a decoder's attention products (Q K^T and weights x V) for one caption."""

    self_attention: int  # words over words
    image_reading: int  # every product with an image position as query or key


@dataclass
class DecoderStates:
    """The final normed states before the output projection, and the attention weights."""

    hidden: torch.Tensor  # (B, T, D)
    self_attention: list[torch.Tensor] | None = None
    image_attention: list[torch.Tensor] | None = None


class CaptionDecoder(nn.Module):
    """Word + position embeddings, a stack of blocks (the subclass's), final norm, output
    tied to the word embedding. Subclasses provide `_read`, `init_cache`, `image_layers` and
    `attention_flops`. `memory_dim` is the width of the image tokens it reads."""

    def __init__(self, config: CaptionerConfig, memory_dim: int) -> None:
        super().__init__()
        dim = config.decoder.dim
        self.max_len = config.max_len
        self.heads = config.decoder.heads
        self.token_embed = nn.Embedding(config.vocab_size, dim)
        rope = None
        if config.decoder.pos_embed == "rope":
            self.pos_embed = None
            positions = torch.arange(config.max_len)[:, None]  # (max_len, 1)
            rope = torch.stack(rotation(positions, dim // self.heads))  # (2, max_len, d)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.max_len, dim))
        self.register_buffer("rope", rope, persistent=False)  # cos, sin of word positions
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config.vocab_size, bias=False)
        self.head.weight = self.token_embed.weight  # tied: one matrix for words in and out

    @property
    def image_layers(self) -> int:
        """How many layers return image attention (the length of `image_attention`)."""
        raise NotImplementedError

    def features(self, tokens: torch.Tensor, reading: Reading) -> DecoderStates:
        """Word tokens (B, T) and what they read (`Reading`: the image tokens (B, S, Dimg),
        paddings, a cache) -> the normed states of the word positions (B, T, D), before the
        output projection.

        With a `reading.cache` (from `init_cache`), `tokens` are only the new positions, which
        follow the `cache.length` positions already decoded, and the image tokens are not
        needed. The cache rows may be beams: B is then a multiple of the number of images.
        """
        start = 0 if reading.cache is None else reading.cache.length
        words = self.embed(tokens, start)  # (B, T, D)
        rope = None
        if self.rope is not None:
            cos, sin = self.rope[:, start : start + words.shape[1]]
            rope = (cos, sin)
        hidden, self_weights, image_weights = self._read(words, reading, rope)
        if not reading.need_weights:
            return DecoderStates(hidden)
        return DecoderStates(hidden, self_weights, image_weights)

    def _read(
        self, words: torch.Tensor, reading: Reading, rope: Rotation | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The words' embeddings (B, T, D) through the blocks -> their normed states and, per
        layer, their attention over the words and over the image (when `need_weights`).
        `rope`: the rotation of the words' positions (T, d), or None for learned ones."""
        raise NotImplementedError

    def _cache_len(self, max_len: int | None) -> int:
        return self.max_len if max_len is None else min(max_len, self.max_len)

    def init_cache(self, memory: torch.Tensor, max_len: int | None = None) -> DecoderCache:
        """A cache for decoding captions of these images (B, S, Dimg), up to `max_len` tokens;
        what depends on the image alone is computed here, once per image."""
        raise NotImplementedError

    def attention_flops(self, image_tokens: int, words: int, cached: bool) -> DecoderFlops:
        """For a caption of `words` positions reading `image_tokens` tokens: decoded with the
        KV cache one position at a time (`cached`), or all at once as in training, where the
        attention kernels compute every product, masked or not."""
        raise NotImplementedError

    def _products(self, queries: int, keys: int) -> int:
        """FLOPs of one layer's Q K^T and weights x V, all heads together."""
        return 4 * queries * keys * self.token_embed.embedding_dim

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
        """`features`, then next-word logits (B, T, vocab); `last_only` computes the logits
        of the last position alone (B, 1, vocab), all that decoding needs."""
        reading = Reading(memory, token_padding_mask, memory_padding_mask, need_weights, cache)
        states = self.features(tokens, reading)
        if last_only:
            # (W h^T)^T: with few rows, BLAS runs faster with the vocabulary matrix on the
            # left, streamed, than on the right, where it is repacked at every step
            logits = torch.mm(self.head.weight, states.hidden[:, -1].T).T[:, None]  # (B, 1, V)
        else:
            logits = self.head(states.hidden)
        return DecoderOutput(logits, states.self_attention, states.image_attention)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Word (+ learned position) embeddings of `tokens` (B, T) at positions start.. ->
        (B, T, D)."""
        end = start + tokens.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"token sequence of length {end} exceeds model.max_len={self.max_len}."
            )
        words = self.token_embed(tokens)
        return words if self.pos_embed is None else words + self.pos_embed[:, start:end]


class CrossAttentionDecoder(CaptionDecoder):
    """Blocks of causal self-attention -> cross-attention to the image -> MLP."""

    def __init__(self, config: CaptionerConfig, memory_dim: int) -> None:
        super().__init__(config, memory_dim)
        every = config.decoder.cross_every
        self.blocks = nn.ModuleList(
            DecoderBlock(
                config.decoder.dim, config.decoder.heads, memory_dim,
                config.decoder.mlp_ratio, config.dropout, reads_image=i % every == 0,
                gated=every > 1, kv_heads=config.decoder.kv_heads,
            )
            for i in range(config.decoder.depth)
        )  # fmt: skip

    @property
    def image_layers(self) -> int:
        return sum(block.reads_image for block in self.blocks)

    def attention_flops(self, image_tokens: int, words: int, cached: bool) -> DecoderFlops:
        # causal self-attention: step t reads t positions with the cache; m x m without
        pairs = words * (words + 1) // 2 if cached else words * words
        return DecoderFlops(
            len(self.blocks) * self._products(pairs, 1),
            self.image_layers * self._products(words, image_tokens),
        )

    def init_cache(self, memory: torch.Tensor, max_len: int | None = None) -> DecoderCache:
        """The image's cross-attention keys and values are projected here, once per image
        and block; every later step (and every beam of the image) reads them."""
        max_len = self._cache_len(max_len)
        return DecoderCache([
            LayerCache(max_len, block.cross_attn.project_kv(memory) if block.reads_image else None)
            for block in self.blocks
        ])  # fmt: skip

    def _read(
        self, words: torch.Tensor, reading: Reading, rope: Rotation | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        x, self_weights, image_weights = words, [], []
        for i, block in enumerate(self.blocks):
            layer = None if reading.cache is None else reading.cache.layers[i]
            x, sw, cw = block(x, reading, layer, rope)
            self_weights.append(sw)
            if block.reads_image:
                image_weights.append(cw)
        return self.norm(x), self_weights, image_weights


class PrefixDecoder(CaptionDecoder):
    """Decoder-only: [image positions; word positions] through self-attention blocks under a
    prefix-LM mask."""

    def __init__(self, config: CaptionerConfig, memory_dim: int) -> None:
        super().__init__(config, memory_dim)
        dim = config.decoder.dim
        self.image_proj = nn.Linear(memory_dim, dim)
        self.blocks = nn.ModuleList(
            Block(
                dim, config.decoder.heads, config.decoder.mlp_ratio, config.dropout,
                config.decoder.kv_heads,
            )
            for _ in range(config.decoder.depth)
        )  # fmt: skip

    @property
    def image_layers(self) -> int:
        return len(self.blocks)

    def attention_flops(self, image_tokens: int, words: int, cached: bool) -> DecoderFlops:
        n, m, depth = image_tokens, words, len(self.blocks)
        if cached:  # the image among itself once, then step t reads n + t positions
            return DecoderFlops(
                depth * self._products(m * (m + 1) // 2, 1),
                depth * self._products(n, n + m),
            )
        # one masked (n + m)^2 product: n x m of it (image rows, word columns) is masked out
        return DecoderFlops(depth * self._products(m, m), depth * self._products(n, n + 2 * m))

    @staticmethod
    def prefix_mask(images: int, words: int, device: torch.device) -> torch.Tensor:
        """(n + m, n + m) True where a query may attend a key: image rows see the image
        columns only, word rows see the image and the words up to themselves."""
        size = images + words
        mask = torch.ones(size, size, dtype=torch.bool, device=device).tril()
        mask[:, :images] = True  # every position sees every image position
        mask[:images, images:] = False  # and an image position no word
        return mask

    def init_cache(self, memory: torch.Tensor, max_len: int | None = None) -> DecoderCache:
        """The image positions run through every block here, once per image: they never see
        a word, so their keys and values at each layer are final, and every later step (and
        every beam) reads them."""
        max_len = self._cache_len(max_len)
        x = self.image_proj(memory)  # (B, N, D)
        layers = []
        for block in self.blocks:
            layers.append(LayerCache(max_len, prefix_kv=block.attn.project_kv(block.norm1(x))))
            x, _ = block(x)  # image positions among themselves: no mask needed
        return DecoderCache(layers)

    def _read(
        self, words: torch.Tensor, reading: Reading, rope: Rotation | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        cache, memory = reading.cache, reading.memory
        if cache is not None:  # the words' new positions only; the image is in the cache
            x, images, mask = words, 0, None
        else:
            if memory is None:
                raise ValueError("the prefix decoder needs the image tokens or a cache")
            x = torch.cat([self.image_proj(memory), words], dim=1)  # (B, n + m, D)
            images = memory.shape[1]
            mask = _with_padding(
                self.prefix_mask(images, words.shape[1], words.device),
                _prefix_padding(reading, memory, words),
            )
            if rope is not None:  # the image positions unrotated: cos 1, sin 0
                cos, sin = rope
                rope = (F.pad(cos, (0, 0, images, 0), value=1.0), F.pad(sin, (0, 0, images, 0)))
        self_weights, image_weights = [], []
        for i, block in enumerate(self.blocks):
            x, weights = block(
                x, reading.need_weights, mask=mask,
                cache=None if cache is None else cache.layers[i], rope=rope,
            )  # fmt: skip
            if weights is not None:  # the word rows: over the image, over the words
                word_rows = weights[:, :, images:]  # (B, heads, m, n + m)
                cut = images if cache is None else cache.layers[i].image_positions
                image_weights.append(word_rows[..., :cut])
                self_weights.append(word_rows[..., cut:])
        return self.norm(x[:, images:]), self_weights, image_weights


def _prefix_padding(
    reading: Reading, memory: torch.Tensor, words: torch.Tensor
) -> torch.Tensor | None:
    """Key padding (B, n + m) of the joined sequence, or None when nothing is padded."""
    image, text = reading.memory_padding_mask, reading.token_padding_mask
    if image is None and text is None:
        return None
    batch = words.shape[0]
    if image is None:
        image = torch.zeros(batch, memory.shape[1], dtype=torch.bool, device=words.device)
    if text is None:
        text = torch.zeros(batch, words.shape[1], dtype=torch.bool, device=words.device)
    return torch.cat([image, text], dim=1)


def _with_padding(mask: torch.Tensor | None, padding: torch.Tensor | None) -> torch.Tensor | None:
    """The (n + m, n + m) mask with padded keys (B, n + m) removed: (B, 1, n + m, n + m)."""
    if padding is None or mask is None:
        return mask
    return mask & ~padding[:, None, None, :]
