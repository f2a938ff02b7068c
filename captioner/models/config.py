"""The architecture of a captioner, as one plain dataclass saved in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from captioner.errors import ConfigError
from captioner.values import is_finite, is_int, key_name, short


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a `CaptionerModel` without Hydra.

    Field names are the keys under `model.` in the Hydra config, so an error can name them.
    """

    vocab_size: int  # size of the word vocabulary, taken from the tokenizer
    image_size: tuple[int, int] = (64, 64)  # (height, width) of the input image in pixels
    patch_size: int = 8  # side of a square patch; the image must tile exactly
    in_channels: int = 3  # colour channels of the input image
    pos_embed: str = "learned"  # encoder position embedding: "learned" or "sincos" (fixed 2-D)
    encoder_dim: int = 192  # width of the vision encoder
    encoder_depth: int = 12  # number of encoder blocks
    encoder_heads: int = 3  # attention heads per encoder block
    decoder_dim: int = 192  # width of the text decoder
    decoder_depth: int = 6  # number of decoder blocks (self -> cross -> MLP)
    decoder_heads: int = 3  # attention heads per decoder block
    mlp_ratio: float = 4.0  # hidden width of each MLP relative to the block width
    dropout: float = 0.0  # dropout after attention and in the MLP
    max_len: int = 32  # longest token sequence, <bos> and <eos> included

    def __post_init__(self) -> None:
        if is_int(self.image_size):
            self.image_size = (self.image_size, self.image_size)
        if not (
            isinstance(self.image_size, list | tuple)
            and len(self.image_size) == 2
            and all(is_int(s) for s in self.image_size)
        ):
            raise ConfigError(
                f"data.image_size must be a positive int or [height, width], got "
                f"{short(self.image_size)}."
            )
        self.image_size = tuple(self.image_size)  # type: ignore[assignment]
        self.validate()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns); row 0 is the top of the image."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    def validate(self) -> None:
        """Fail early, naming the key to change, instead of deep inside torch."""
        positive = (
            "vocab_size", "patch_size", "in_channels", "encoder_dim", "encoder_depth",
            "encoder_heads", "decoder_dim", "decoder_depth", "decoder_heads", "max_len",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {short(value)}.")
        for name in ("mlp_ratio", "dropout"):
            value = getattr(self, name)
            if not is_finite(value):
                raise ConfigError(f"model.{name} must be a finite number, got {short(value)}.")
        if min(self.image_size) <= 0:
            raise ConfigError(
                f"data.image_size must be a positive int or [height, width], got {self.image_size}."
            )
        for side, name in zip(self.image_size, ("height", "width"), strict=True):
            if side % self.patch_size:
                raise ConfigError(
                    f"image {name} {side} is not divisible by model.patch_size={self.patch_size}: "
                    f"choose a patch size that divides data.image_size={list(self.image_size)}."
                )
        for kind in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{kind}_dim"), getattr(self, f"{kind}_heads")
            if dim % heads:
                raise ConfigError(
                    f"model.{kind}_dim={dim} is not divisible by model.{kind}_heads={heads}: "
                    f"pick a head count that divides the width."
                )
        if self.pos_embed not in ("learned", "sincos"):
            raise ConfigError(
                f"model.pos_embed must be 'learned' or 'sincos', got {short(self.pos_embed)}."
            )
        if self.pos_embed == "sincos" and self.encoder_dim % 4:
            raise ConfigError(
                f"model.pos_embed=sincos needs model.encoder_dim divisible by 4, "
                f"got {self.encoder_dim}."
            )
        if self.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio must be positive, got {self.mlp_ratio}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with `weights_only=True`."""
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionerConfig:
        """Build from a mapping, rejecting unknown keys with the list of valid ones."""
        if not isinstance(values, dict):
            raise ConfigError(f"expected a mapping of model keys, got {type(values).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(key_name, set(values) - known))
        if unknown:
            raise ConfigError(
                f"unknown model key(s) {', '.join(f'model.{k}' for k in unknown[:5])}; "
                f"valid keys are: {', '.join(sorted(known - {'vocab_size'}))}."
            )
        if "vocab_size" not in values:
            raise ConfigError("model.vocab_size is missing.")
        return cls(**values)
