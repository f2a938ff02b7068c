"""The architecture of a captioner, as plain dataclasses saved in every checkpoint.

A captioner is an image encoder and a caption decoder; each part's config names its kind
(`kind: vit`, `kind: cross` | `prefix`), which `captioner.models.build` looks up, so a
checkpoint rebuilds any variant without Hydra and without naming code. Field names are the
keys under `model.`, `model.encoder.` and `model.decoder.` in the Hydra config, so an error
can name them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from captioner.errors import ConfigError
from captioner.values import is_finite, is_int, key_name, short

ENCODER_KINDS = ("vit",)
DECODER_KINDS = ("cross", "prefix")


@dataclass
class EncoderConfig:
    """The image encoder: `vit`, a ViT over non-overlapping patches."""

    kind: str = "vit"  # which encoder: vit
    image_size: tuple[int, int] = (64, 64)  # (height, width) of the input image in pixels
    patch_size: int = 8  # side of a square patch; the image must tile exactly
    in_channels: int = 3  # colour channels of the input image
    pos_embed: str = "learned"  # positions: "learned", "sincos" (fixed 2-D) or "rope" (2-D axial)
    dim: int = 192  # width of the tokens
    depth: int = 12  # number of blocks (self-attention -> MLP)
    heads: int = 3  # attention heads per block
    mlp_ratio: float = 4.0  # hidden width of each MLP relative to `dim`
    kv_heads: int | None = None  # key/value heads (None: `heads`; 1: multi-query)

    @property
    def label(self) -> str:
        """What differs from multi-head attention with added positions, for tables."""
        rope = ["2-D RoPE"] if self.pos_embed == "rope" else []
        return ", ".join(_grouping(self.heads, self.kv_heads) + rope)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns); row 0 is the top of the image."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)


@dataclass
class DecoderConfig:
    """The caption decoder, and how it reads the image.

    `cross`: every block is causal self-attention over the words, then cross-attention from
    the words to the image tokens, then an MLP; with `cross_every: k` > 1 only every k-th
    block (the first, the (k+1)-th, ...) reads the image, through a tanh gate that starts at 0
    (Flamingo). `prefix`: a decoder-only model: the image tokens, projected to `dim`, come
    first, then the words, through one stack of self-attention blocks under a prefix-LM mask.
    """

    kind: str = "cross"  # how the image comes in: cross or prefix
    dim: int = 192  # width of the word (and, for prefix, image) positions
    depth: int = 6  # number of blocks
    heads: int = 3  # attention heads per attention layer
    mlp_ratio: float = 4.0  # hidden width of each MLP relative to `dim`
    cross_every: int = 1  # cross only: every k-th block reads the image (k > 1: gated)
    kv_heads: int | None = None  # key/value heads of every attention (None: `heads`; 1: MQA)
    pos_embed: str = "learned"  # word positions: "learned" (added) or "rope" (rotary)

    @property
    def label(self) -> str:
        """How the words read the image and attend, for tables: `cross`,
        `cross, every 2 (gated)`, `prefix, MQA, RoPE`."""
        fusion = self.kind
        if self.cross_every > 1:
            fusion = f"{self.kind}, every {self.cross_every} (gated)"
        rope = ["RoPE"] if self.pos_embed == "rope" else []
        return ", ".join([fusion, *_grouping(self.heads, self.kv_heads), *rope])


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a `CaptionerModel` without Hydra."""

    vocab_size: int  # size of the word vocabulary, taken from the tokenizer
    max_len: int = 32  # longest token sequence, <bos> and <eos> included
    dropout: float = 0.0  # dropout after attention and in the MLPs, in both parts
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def image_size(self) -> tuple[int, int]:
        return self.encoder.image_size

    @property
    def label(self) -> str:
        """The decoder's label, then the encoder's where it is not plain multi-head."""
        encoder = self.encoder.label
        return f"{self.decoder.label} (encoder: {encoder})" if encoder else self.decoder.label

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    def validate(self) -> None:
        """Fail early, naming the key to change, instead of deep inside torch."""
        _positive(self, ("vocab_size", "max_len"), "model")
        if not is_finite(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {short(self.dropout)}.")
        _check_encoder(self.encoder)
        _check_decoder(self.decoder)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with `weights_only=True`."""
        out = asdict(self)
        out["encoder"]["image_size"] = list(self.encoder.image_size)
        return out

    @classmethod
    def from_dict(cls, values: Any) -> CaptionerConfig:
        """Build from a mapping (a checkpoint's, or the Hydra config's), rejecting unknown
        keys with the list of valid ones. The first checkpoint format's flat keys
        (`encoder_dim`, ...) are read as a ViT encoder and a cross-attention decoder."""
        if not isinstance(values, dict):
            raise ConfigError(f"expected a mapping of model keys, got {type(values).__name__}.")
        if "encoder" not in values and "decoder" not in values:
            values = _from_first_format(values)
        top = _known(values, cls, "model", nested=("encoder", "decoder"))
        if "vocab_size" not in top:
            raise ConfigError("model.vocab_size is missing.")
        parts = {}
        for name, part in (("encoder", EncoderConfig), ("decoder", DecoderConfig)):
            given = values.get(name, {})
            if not isinstance(given, dict):
                raise ConfigError(f"model.{name} must be a mapping, got {short(given)}.")
            parts[name] = part(**_known(given, part, f"model.{name}"))
        return cls(**top, **parts)


def _known(values: dict[str, Any], cls: type, prefix: str, nested: tuple = ()) -> dict:
    """`values` without `nested` keys, every key a field of `cls`, else a `ConfigError`."""
    known = {f.name for f in fields(cls)} - set(nested)
    unknown = sorted(map(key_name, set(values) - known - set(nested)))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown[:5])}; valid keys "
            f"are: {', '.join(sorted(known - {'vocab_size'}))}."
        )
    return {k: v for k, v in values.items() if k not in nested}


# The first checkpoint format: one flat mapping of a ViT encoder and a cross decoder.
_FIRST_FORMAT = {
    "image_size": ("encoder", "image_size"), "patch_size": ("encoder", "patch_size"),
    "in_channels": ("encoder", "in_channels"), "pos_embed": ("encoder", "pos_embed"),
    "encoder_dim": ("encoder", "dim"), "encoder_depth": ("encoder", "depth"),
    "encoder_heads": ("encoder", "heads"), "decoder_dim": ("decoder", "dim"),
    "decoder_depth": ("decoder", "depth"), "decoder_heads": ("decoder", "heads"),
}  # fmt: skip


def _from_first_format(values: dict[str, Any]) -> dict[str, Any]:
    converted: dict[str, Any] = {"encoder": {}, "decoder": {}}
    for key, value in values.items():
        if key in _FIRST_FORMAT:
            part, name = _FIRST_FORMAT[key]
            converted[part][name] = value
        elif key == "mlp_ratio":  # one ratio for both parts
            converted["encoder"]["mlp_ratio"] = converted["decoder"]["mlp_ratio"] = value
        else:
            converted[key] = value
    return converted


def _grouping(heads: int, kv_heads: int | None) -> list[str]:
    if kv_heads is None or kv_heads == heads:
        return []
    return ["MQA" if kv_heads == 1 else f"GQA {kv_heads}"]


def _positive(obj: Any, names: tuple[str, ...], prefix: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not is_int(value) or value <= 0:
            raise ConfigError(f"{prefix}.{name} must be a positive integer, got {short(value)}.")


def _check_width(obj: Any, prefix: str) -> None:
    """`dim`, `depth`, `heads` and `mlp_ratio` of a part: heads divide the width."""
    _positive(obj, ("dim", "depth", "heads"), prefix)
    if obj.dim % obj.heads:
        raise ConfigError(
            f"{prefix}.dim={obj.dim} is not divisible by {prefix}.heads={obj.heads}: pick a "
            "head count that divides the width."
        )
    if not is_finite(obj.mlp_ratio) or obj.mlp_ratio <= 0:
        raise ConfigError(
            f"{prefix}.mlp_ratio must be a positive number, got {short(obj.mlp_ratio)}."
        )
    if obj.kv_heads is not None:
        _positive(obj, ("kv_heads",), prefix)
        if obj.heads % obj.kv_heads:
            raise ConfigError(
                f"{prefix}.kv_heads={obj.kv_heads} does not divide {prefix}.heads={obj.heads}: "
                "each key/value head serves an equal group of query heads (null: one each)."
            )


def _check_rope(obj: Any, prefix: str, axes: int) -> None:
    """Rotary positions turn channel pairs, `axes` groups of them per head."""
    if (obj.dim // obj.heads) % (2 * axes):
        raise ConfigError(
            f"{prefix}.pos_embed=rope needs a head width ({prefix}.dim / {prefix}.heads = "
            f"{obj.dim // obj.heads}) divisible by {2 * axes}."
        )


def _one_of(value: Any, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {short(value)}.")


def _check_encoder(config: EncoderConfig) -> None:
    _one_of(config.kind, ENCODER_KINDS, "model.encoder.kind")
    size = config.image_size
    if is_int(size):
        config.image_size = size = (size, size)
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(map(is_int, size))):
        raise ConfigError(
            f"data.image_size must be a positive int or [height, width], got {short(size)}."
        )
    config.image_size = tuple(size)  # type: ignore[assignment]
    _positive(config, ("patch_size", "in_channels"), "model.encoder")
    _check_width(config, "model.encoder")
    if min(config.image_size) <= 0:
        raise ConfigError(f"data.image_size must be positive, got {list(config.image_size)}.")
    for side, name in zip(config.image_size, ("height", "width"), strict=True):
        if side % config.patch_size:
            raise ConfigError(
                f"image {name} {side} is not divisible by model.encoder.patch_size="
                f"{config.patch_size}: choose a patch size that divides data.image_size="
                f"{list(config.image_size)}."
            )
    _one_of(config.pos_embed, ("learned", "sincos", "rope"), "model.encoder.pos_embed")
    if config.pos_embed == "rope":
        _check_rope(config, "model.encoder", axes=2)
    if config.pos_embed == "sincos" and config.dim % 4:
        raise ConfigError(
            f"model.encoder.pos_embed=sincos needs model.encoder.dim divisible by 4, got "
            f"{config.dim}."
        )


def _check_decoder(config: DecoderConfig) -> None:
    _one_of(config.kind, DECODER_KINDS, "model.decoder.kind")
    _check_width(config, "model.decoder")
    _positive(config, ("cross_every",), "model.decoder")
    _one_of(config.pos_embed, ("learned", "rope"), "model.decoder.pos_embed")
    if config.pos_embed == "rope":
        _check_rope(config, "model.decoder", axes=1)
    if config.kind == "prefix" and config.cross_every != 1:
        raise ConfigError(
            "model.decoder.cross_every is for model/decoder=cross; the prefix decoder reads "
            "the image in every block."
        )
    if config.cross_every > config.depth:
        raise ConfigError(
            f"model.decoder.cross_every={config.cross_every} exceeds model.decoder.depth="
            f"{config.depth}: at most one block in every {config.depth} would read the image."
        )
