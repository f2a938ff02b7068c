"""The whole captioner: image -> encoder -> patch tokens -> decoder -> logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from captioner.models.config import CaptionerConfig
from captioner.models.decoder import TextDecoder
from captioner.models.encoder import VisionEncoder
from captioner.models.loss import linear_cross_entropy


@dataclass
class CaptionerOutput:
    """Logits and every attention map; each list has one (B, heads, Tq, Tk) tensor per layer."""

    logits: torch.Tensor
    encoder_attention: list[torch.Tensor]
    self_attention: list[torch.Tensor]
    cross_attention: list[torch.Tensor]


class CaptionerModel(nn.Module):
    """Encoder-decoder captioner. Returns logits; loss and label shifting live outside."""

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = VisionEncoder(config)
        self.decoder = TextDecoder(config)
        self.apply(self._init_weights)
        # Scale residual output projections by depth (GPT-2), so deep stacks start stable.
        for stack, depth in (
            (self.encoder.blocks, config.encoder_depth),
            (self.decoder.blocks, config.decoder_depth),
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

    def caption_loss(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        pad_id: int,
        label_smoothing: float = 0.0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Teacher-forced next-word loss of captions `tokens` (B, T), <bos> first: inputs are
        tokens[:, :-1], targets tokens[:, 1:], padding ignored. Returns the mean loss and,
        with `need_weights`, the decoder's cross-attention per layer (B, heads, T - 1, S).

        The output projection and the loss are fused (`linear_cross_entropy`): the logits
        are never stored, and padded positions are never projected.
        """
        memory, _ = self.encoder(images)
        states = self.decoder.features(tokens[:, :-1], memory, need_weights=need_weights)
        loss = linear_cross_entropy(
            states.hidden, self.decoder.head.weight, tokens[:, 1:], pad_id, label_smoothing
        )
        return loss, states.cross_attention

    def forward_with_attention(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        token_padding_mask: torch.Tensor | None = None,
    ) -> CaptionerOutput:
        """Same logits through the explicit attention path, with every attention map."""
        memory, enc_weights = self.encoder(images, need_weights=True)
        out = self.decoder(tokens, memory, token_padding_mask, need_weights=True)
        return CaptionerOutput(out.logits, enc_weights, out.self_attention, out.cross_attention)

    def num_parameters(self) -> int:
        """Trainable parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
