"""Plain PyTorch modules: no Lightning, no Hydra."""

from captioner.models.attention import Attention
from captioner.models.captioner import DECODERS, ENCODERS, CaptionerModel, CaptionerOutput
from captioner.models.config import CaptionerConfig, DecoderConfig, EncoderConfig
from captioner.models.decoder import CaptionDecoder, CrossAttentionDecoder, PrefixDecoder
from captioner.models.encoder import ImageEncoder, VisionEncoder

__all__ = [
    "DECODERS",
    "ENCODERS",
    "Attention",
    "CaptionDecoder",
    "CaptionerConfig",
    "CaptionerModel",
    "CaptionerOutput",
    "CrossAttentionDecoder",
    "DecoderConfig",
    "EncoderConfig",
    "ImageEncoder",
    "PrefixDecoder",
    "VisionEncoder",
]
