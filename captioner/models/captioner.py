"""The whole captioner: image -> encoder -> image tokens -> decoder -> logits.

The parts are chosen by their config's `kind` from `ENCODERS` and `DECODERS`: adding a variant
is a module here and an entry in one of them (and a config file under `conf/model/`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from captioner.models.blocks import Reading
from captioner.models.config import CaptionerConfig
from captioner.models.decoder import (
    CaptionDecoder,
    CrossAttentionDecoder,
    DecoderStates,
    PrefixDecoder,
)
from captioner.models.encoder import ImageEncoder, VisionEncoder

ENCODERS: dict[str, type[ImageEncoder]] = {"vit": VisionEncoder}
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
    output projection); loss and label shifting live outside."""

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ENCODERS[config.encoder.kind](config.encoder, config.dropout)
        self.decoder = DECODERS[config.decoder.kind](config)
        self.apply(self._init_weights)
        # Scale residual output projections by depth (GPT-2), so deep stacks start stable.
        for stack, depth in (
            (self.encoder.blocks, config.encoder.depth),
            (self.decoder.blocks, config.decoder.depth),
        ):
            std = 0.02 / math.sqrt(2 * depth)
            for name, param in stack.named_parameters():
                if name.endswith(("out_proj.weight", "mlp.2.weight")):
                    nn.init.normal_(param, std=std)
        # Patch embedding: LeCun normal (JAX ViT), so pixel content starts on the same scale as
        # the position embedding instead of far below a fixed sin-cos one.
        patch = self.encoder.patch_embed.proj.weight
        nn.init.trunc_normal_(patch, std=patch[0].numel() ** -0.5)
        for pos in (self.encoder.pos_embed, self.decoder.pos_embed):
            if isinstance(pos, nn.Parameter):
                nn.init.trunc_normal_(pos, std=0.02)

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
        memory, _ = self.encoder(images)
        return self.decoder(tokens, memory, token_padding_mask).logits

    def features(
        self, images: torch.Tensor, tokens: torch.Tensor, need_weights: bool = False
    ) -> DecoderStates:
        """The decoder's states (B, T, D) for input tokens (B, T) and, with `need_weights`,
        its attention: what a loss fused with the output projection (`output_weight`) takes."""
        memory, _ = self.encoder(images)
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
        memory, enc_weights = self.encoder(images, need_weights=True)
        out = self.decoder(tokens, memory, token_padding_mask, need_weights=True)
        assert enc_weights is not None and out.self_attention is not None
        assert out.image_attention is not None
        return CaptionerOutput(out.logits, enc_weights, out.self_attention, out.image_attention)

    def attention_flops(self, words: int, cached: bool = True) -> dict[str, int]:
        """FLOPs of every attention product for one image and a caption of `words` positions
        (see `CaptionDecoder.attention_flops`): the cost side of a fusion comparison."""
        decoder = self.decoder.attention_flops(self.encoder.num_tokens, words, cached)
        return {
            "encoder": self.encoder.attention_flops(),
            "decoder_self": decoder.self_attention,
            "image_reading": decoder.image_reading,
        }

    def num_parameters(self) -> int:
        """Trainable parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
