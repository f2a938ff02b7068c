"""Plain PyTorch modules: no Lightning, no Hydra."""

from captioner.models.attention import Attention
from captioner.models.captioner import CaptionerModel, CaptionerOutput
from captioner.models.config import CaptionerConfig
from captioner.models.decoder import TextDecoder
from captioner.models.encoder import VisionEncoder

__all__ = [
    "Attention",
    "CaptionerConfig",
    "CaptionerModel",
    "CaptionerOutput",
    "TextDecoder",
    "VisionEncoder",
]
