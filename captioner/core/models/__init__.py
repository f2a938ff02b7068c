"""Plain PyTorch modules: no Lightning, no Hydra."""

from captioner.core.models.attention import Attention
from captioner.core.models.captioner import DECODERS, ENCODERS, CaptionerModel, CaptionerOutput
from captioner.core.models.config import CaptionerConfig, DecoderConfig, EncoderConfig
from captioner.core.models.decoder import CaptionDecoder, CrossAttentionDecoder, PrefixDecoder
from captioner.core.models.encoder import ImageEncoder, VisionEncoder

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
