"""The whole captioner: image -> encoder -> image tokens -> decoder -> logits.

The parts are chosen by their config's `kind` from `ENCODERS` and `DECODERS`: adding a variant
is a module here and an entry in one of them (and a config file under `conf/model/`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from captioner.core.models.backbones import OpenClipEncoder, ResNetEncoder, TimmEncoder
from captioner.core.models.blocks import Reading
from captioner.core.models.config import CaptionerConfig
from captioner.core.models.decoder import (
    CaptionDecoder,
    CrossAttentionDecoder,
    DecoderStates,
    PrefixDecoder,
)
from captioner.core.models.encoder import ImageEncoder, VisionEncoder

ENCODERS: dict[str, type[ImageEncoder]] = {
    "vit": VisionEncoder, "resnet": ResNetEncoder, "timm": TimmEncoder,
    "open_clip": OpenClipEncoder,
}  # fmt: skip
DECODERS: dict[str, type[CaptionDecoder]] = {
    "cross": CrossAttentionDecoder, "prefix": PrefixDecoder,
}  # fmt: skip


@dataclass
class CaptionerOutput:
    """Logits and every attention map: one (B, heads, Tq, Tk) tensor per layer (the image
    attention: per layer that reads the image)."""

    logits: torch.Tensor
    encoder_attention: list[torch.Tensor]
    self_attention: list[torch.Tensor]
    image_attention: list[torch.Tensor]


class CaptionerModel(nn.Module):
    """An image encoder and a caption decoder. Returns logits (or the states before the
    output projection); loss and label shifting live outside.

    The decoder reads the encoder's patch tokens; its prefix tokens (CLS, registers) too only
    where the encoder says so (`reads_prefix`): `image_prefix_tokens` is how many lead the
    image attention. Our own initialisation covers the parts built here, never the weights a
    library encoder arrived with.
    """

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ENCODERS[config.encoder.kind](config.encoder, config.dropout)
        self.decoder = DECODERS[config.decoder.kind](config, self.encoder.dim)
        ours: list[nn.Module] = [self.decoder]
        if isinstance(self.encoder, VisionEncoder):
            ours.insert(0, self.encoder)
        for part in ours:
            part.apply(self._init_weights)
        # Scale residual output projections by depth (GPT-2), so deep stacks start stable.
        for part in ours:
            std = 0.02 / math.sqrt(2 * len(part.blocks))
            for name, param in part.blocks.named_parameters():
                if name.endswith(("out_proj.weight", "mlp.2.weight")):
                    nn.init.normal_(param, std=std)
        if isinstance(self.encoder, VisionEncoder):
            self.encoder.reset_stem()
        for part in ours:
            if isinstance(part.pos_embed, nn.Parameter):
                nn.init.trunc_normal_(part.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        token_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images (B, C, H, W) and input tokens (B, T) -> next-token logits (B, T, vocab)."""
        return self.decoder(tokens, self.encode(images)[0], token_padding_mask).logits

    @property
    def image_prefix_tokens(self) -> int:
        """Prefix tokens ahead of the patches in what the decoder reads (its image attention)."""
        return self.encoder.num_prefix_tokens if self.encoder.reads_prefix else 0

    @property
    def image_tokens(self) -> int:
        """Image tokens the decoder reads: the patches, after any prefix ones it reads."""
        rows, cols = self.encoder.grid_size
        return self.image_prefix_tokens + rows * cols

    def encode(
        self, images: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Images (B, C, H, W) -> the image tokens the decoder reads (B, S, Dimg) and, with
        `need_weights`, the encoder's own attention per layer."""
        memory, weights = self.encoder(images, need_weights=need_weights)
        cut = self.encoder.num_prefix_tokens - self.image_prefix_tokens
        return memory[:, cut:], weights

    def features(
        self,
        images: torch.Tensor | None,
        tokens: torch.Tensor,
        need_weights: bool = False,
        memory: torch.Tensor | None = None,
    ) -> DecoderStates:
        """The decoder's states (B, T, D) for input tokens (B, T) and, with `need_weights`,
        its attention: what a loss fused with the output projection (`output_weight`) takes.
        `memory`: image tokens already encoded (`encode`, or a feature store) instead of
        `images`."""
        if memory is None:
            assert images is not None
            memory = self.encode(images)[0]
        return self.decoder.features(tokens, Reading(memory, need_weights=need_weights))

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection (vocab, D), tied to the word embedding."""
        return self.decoder.head.weight

    def forward_with_attention(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        token_padding_mask: torch.Tensor | None = None,
    ) -> CaptionerOutput:
        """Same logits through the explicit attention path, with every attention map."""
        memory, enc_weights = self.encode(images, need_weights=True)
        out = self.decoder(tokens, memory, token_padding_mask, need_weights=True)
        assert enc_weights is not None and out.self_attention is not None
        assert out.image_attention is not None
        return CaptionerOutput(out.logits, enc_weights, out.self_attention, out.image_attention)

    def attention_flops(self, words: int, cached: bool = True) -> dict[str, int]:
        """FLOPs of every attention product for one image and a caption of `words` positions
        (see `CaptionDecoder.attention_flops`): the cost side of a fusion comparison."""
        decoder = self.decoder.attention_flops(self.image_tokens, words, cached)
        return {
            "encoder": self.encoder.attention_flops(),
            "decoder_self": decoder.self_attention,
            "image_reading": decoder.image_reading,
        }

    def num_parameters(self) -> int:
        """Trainable parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
