"""Hugging Face's `VisionEncoderDecoderModel` built to a `CaptionerConfig`, for speed comparisons.

A `ViTModel` encoder (no pooler: a captioner reads every patch) and a `BertLMHeadModel`
decoder with cross-attention, randomly initialised, with the same widths, depths, heads, MLP
size, patch size, vocabulary and caption length. `transformers` is the `benchmark` extra,
never needed to train or caption.
"""

from __future__ import annotations

from typing import Any

import torch

from captioner.core.errors import ConfigError
from captioner.core.models import CaptionerConfig


def hf_captioner(config: CaptionerConfig, bos_id: int, eos_id: int, pad_id: int) -> Any:
    """A `VisionEncoderDecoderModel` of the same architecture as `CaptionerModel(config)`:
    a ViT encoder and a cross-attention decoder (the only fusion it has), multi-head
    attention, added positions."""
    encoder_config, decoder_config = config.encoder, config.decoder
    if config.label != "cross":
        raise ConfigError(
            f"the Hugging Face baseline is a multi-head cross-attention captioner with added "
            f"positions, not {config.label}: benchmark model/decoder=cross without kv_heads or "
            "rope, or leave the baseline out with --no-hf."
        )
    try:
        from transformers import (
            BertConfig,
            BertLMHeadModel,
            GenerationConfig,
            VisionEncoderDecoderModel,
            ViTConfig,
            ViTModel,
        )
    except ImportError:
        raise ConfigError(
            "the Hugging Face baseline needs transformers: pip install -e '.[benchmark]', or "
            "leave it out with --no-hf."
        ) from None
    shared = {
        "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
    }  # fmt: skip
    encoder = ViTModel(
        ViTConfig(
            hidden_size=encoder_config.dim, num_hidden_layers=encoder_config.depth,
            num_attention_heads=encoder_config.heads,
            intermediate_size=int(encoder_config.dim * encoder_config.mlp_ratio),
            image_size=list(config.image_size), patch_size=encoder_config.patch_size,
            num_channels=encoder_config.in_channels, **shared,
        ),
        add_pooling_layer=False,
    )  # fmt: skip
    decoder = BertLMHeadModel(
        BertConfig(
            vocab_size=config.vocab_size, hidden_size=decoder_config.dim,
            num_hidden_layers=decoder_config.depth, num_attention_heads=decoder_config.heads,
            intermediate_size=int(decoder_config.dim * decoder_config.mlp_ratio),
            max_position_embeddings=config.max_len, is_decoder=True, add_cross_attention=True,
            pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, **shared,
        )
    )  # fmt: skip
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = bos_id
    model.config.pad_token_id = pad_id
    model.config.eos_token_id = eos_id
    model.generation_config = GenerationConfig(
        decoder_start_token_id=bos_id, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id,
    )  # fmt: skip
    return model


def hf_loss(model: Any, images: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The same teacher-forced loss as `teacher_forced_loss`, the Hugging Face way:
    padded targets are -100, padded inputs masked."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return model(
        pixel_values=images,
        decoder_input_ids=inputs,
        decoder_attention_mask=(inputs != pad_id).long(),
        labels=targets.masked_fill(targets == pad_id, -100),
    ).loss


def hf_generate(model: Any, images: torch.Tensor, new_tokens: int, beam_size: int) -> torch.Tensor:
    """Exactly `new_tokens` tokens per image with `generate()` and its KV cache."""
    with torch.no_grad():
        return model.generate(
            pixel_values=images, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            num_beams=beam_size, do_sample=False, use_cache=True,
        )  # fmt: skip
