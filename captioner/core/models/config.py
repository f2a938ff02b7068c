"""The architecture of a captioner, as plain dataclasses saved in every checkpoint.

A captioner is an image encoder and a caption decoder; each part's config names its kind
(`kind: vit` | `resnet` | `timm` | `open_clip`, `kind: cross` | `prefix`), which
`captioner.core.models.captioner` looks up, so a checkpoint rebuilds any variant without Hydra and
without naming code. Field names are the
keys under `model.`, `model.encoder.` and `model.decoder.` in the Hydra config, so an error
can name them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from captioner.core.errors import ConfigError
from captioner.core.values import is_finite, is_int, key_name, short

DECODER_KINDS = ("cross", "prefix")
# Keyword arguments a checkpoint may pass to a library's model constructor must not name a
# file, a download or compiled code: these words mark the ones that could.
_UNSAFE_KWARGS = ("pretrained", "checkpoint", "path", "file", "url", "cache", "jit", "hub")


@dataclass
class EncoderConfig:
    """The image encoder: `vit`, a ViT over non-overlapping patches, trained from scratch."""

    kind: str = "vit"  # which encoder: vit
    image_size: tuple[int, int] = (64, 64)  # (height, width) of the input image in pixels
    patch_size: int = 8  # side of a square patch; the image must tile exactly
    in_channels: int = 3  # colour channels of the input image
    stem: str = "patch"  # "patch": one linear map per patch; "conv": 3x3 stride-2 convolutions
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
        stem = ["conv stem"] if self.stem == "conv" else []
        return ", ".join(stem + _grouping(self.heads, self.kv_heads) + rope)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns); row 0 is the top of the image."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    def without_downloads(self) -> EncoderConfig:
        return self


@dataclass
class ResNetEncoderConfig:
    """`resnet`: a torchvision ResNet's last feature map, one token per cell (the grid
    features of Show, Attend and Tell); no download unless `pretrained` is set."""

    kind: str = "resnet"
    image_size: tuple[int, int] = (224, 224)  # (height, width) of the input image in pixels
    name: str = "resnet18"  # a torchvision ResNet: resnet18, resnet34, resnet50, ...
    stages: int = 4  # residual stages kept: 4 -> one token per 32 px; 3 -> per 16 px; 2 -> 8
    pretrained: bool = False  # torchvision's ImageNet weights (downloaded on first use)
    weights: str | None = None  # a local weights file (.pth, .bin or .safetensors) instead

    in_channels = 3

    @property
    def label(self) -> str:
        return f"{self.name} grid, {self.stages} stages"

    def without_downloads(self) -> ResNetEncoderConfig:
        """The architecture alone: what a checkpoint, holding every weight, rebuilds."""
        return replace(self, pretrained=False, weights=None)


@dataclass
class BackboneEncoderConfig:
    """`timm`: any timm ViT (`name`, e.g. vit_small_patch16_224.augreg_in21k); `open_clip`: the
    visual tower of an OpenCLIP model (`name`, e.g. ViT-B-16, with `pretrained` a tag such as
    openai). Either library builds the architecture; the weights come from the library
    (`pretrained`, a download), a local file (`weights`) or stay random."""

    kind: str = "timm"  # which library: timm or open_clip
    image_size: tuple[int, int] = (224, 224)  # (height, width) of the input image in pixels
    name: str = "vit_small_patch16_224"  # the library's model name
    pretrained: bool | str = False  # timm: true downloads; open_clip: a tag (openai, laion2b_...)
    weights: str | None = None  # a local weights file (.safetensors, .pth or .bin) instead
    read_prefix_tokens: bool = False  # the decoder reads the CLS/register tokens too
    kwargs: dict[str, Any] | None = None  # more arguments for the library's constructor

    in_channels = 3

    @property
    def label(self) -> str:
        library = {"timm": "timm", "open_clip": "OpenCLIP"}.get(self.kind, self.kind)
        return f"{library} {self.name}" + (", reads prefix tokens" * self.read_prefix_tokens)

    def without_downloads(self) -> BackboneEncoderConfig:
        """The architecture alone: what a checkpoint, holding every weight, rebuilds."""
        return replace(self, pretrained=False, weights=None)


AnyEncoderConfig = EncoderConfig | ResNetEncoderConfig | BackboneEncoderConfig
ENCODER_CONFIGS: dict[str, type[AnyEncoderConfig]] = {
    "vit": EncoderConfig, "resnet": ResNetEncoderConfig,
    "timm": BackboneEncoderConfig, "open_clip": BackboneEncoderConfig,
}  # fmt: skip
ENCODER_KINDS = tuple(ENCODER_CONFIGS)


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
    encoder: AnyEncoderConfig = field(default_factory=EncoderConfig)
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

    def without_downloads(self) -> CaptionerConfig:
        """This architecture with the encoder's pretrained weights switched off: what a
        checkpoint rebuilds offline before its own weights go in."""
        return replace(self, encoder=self.encoder.without_downloads())

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
        for name in ("encoder", "decoder"):
            given = values.get(name, {})
            if not isinstance(given, dict):
                raise ConfigError(f"model.{name} must be a mapping, got {short(given)}.")
            part: type = DecoderConfig
            if name == "encoder":
                kind = given.get("kind", "vit")
                _one_of(kind, ENCODER_KINDS, "model.encoder.kind")
                part = ENCODER_CONFIGS[kind]
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


def _check_encoder(config: AnyEncoderConfig) -> None:
    _one_of(config.kind, ENCODER_KINDS, "model.encoder.kind")
    size = config.image_size
    if is_int(size):
        config.image_size = size = (size, size)
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(map(is_int, size))):
        raise ConfigError(
            f"data.image_size must be a positive int or [height, width], got {short(size)}."
        )
    config.image_size = tuple(size)  # type: ignore[assignment]
    if min(config.image_size) <= 0:
        raise ConfigError(f"data.image_size must be positive, got {list(config.image_size)}.")
    if isinstance(config, ResNetEncoderConfig):
        _check_resnet(config)
    elif isinstance(config, BackboneEncoderConfig):
        _check_backbone(config)
    else:
        _check_vit(config)


def check_tiling(image_size: tuple[int, int], patch_size: int, key: str) -> None:
    """Every pixel in exactly one patch: attention over patches maps back to the image."""
    for side, name in zip(image_size, ("height", "width"), strict=True):
        if side % patch_size:
            raise ConfigError(
                f"image {name} {side} is not divisible by {key}={patch_size}: choose a data."
                f"image_size ({list(image_size)} now) that is a multiple of it."
            )


def _check_resnet(config: ResNetEncoderConfig) -> None:
    if not (isinstance(config.name, str) and re.fullmatch(r"(wide_)?res\w+", config.name)):
        raise ConfigError(
            f"model.encoder.name must name a torchvision ResNet (resnet18, resnet50, "
            f"wide_resnet50_2, resnext50_32x4d, ...), got {short(config.name)}."
        )
    if not (is_int(config.stages) and 1 <= config.stages <= 4):
        raise ConfigError(f"model.encoder.stages must be 1 to 4, got {short(config.stages)}.")
    check_tiling(config.image_size, 4 * 2 ** (config.stages - 1), "the ResNet's stride")
    _check_source(config)


def _check_backbone(config: BackboneEncoderConfig) -> None:
    if not (isinstance(config.name, str) and re.fullmatch(r"[\w.\-/]{1,200}", config.name)):
        raise ConfigError(f"model.encoder.name must be a model name, got {short(config.name)}.")
    if not isinstance(config.read_prefix_tokens, bool):
        raise ConfigError(
            f"model.encoder.read_prefix_tokens must be true or false, got "
            f"{short(config.read_prefix_tokens)}."
        )
    kwargs = config.kwargs = config.kwargs or {}
    if not isinstance(kwargs, dict) or not all(
        isinstance(k, str) and k.isidentifier() and _plain(v) for k, v in kwargs.items()
    ):
        raise ConfigError(
            "model.encoder.kwargs must map argument names to numbers (integers up to 65536), "
            f"strings, booleans or lists of them, got {short(kwargs)}."
        )
    unsafe = sorted(k for k in _keys(kwargs) if any(word in k.lower() for word in _UNSAFE_KWARGS))
    if unsafe:
        raise ConfigError(
            f"model.encoder.kwargs may not set {', '.join(unsafe)}: weights come from "
            "model.encoder.pretrained or model.encoder.weights."
        )
    _check_source(config)


def _plain(value: Any, depth: int = 0) -> bool:
    """Numbers, strings, booleans, and lists or mappings of them (a library's nested config);
    integers up to 65536, so that no value read from a checkpoint builds millions of blocks."""
    if depth > 4:
        return False
    if isinstance(value, dict):
        return len(value) <= 64 and all(
            isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return len(value) <= 64 and all(_plain(v, depth + 1) for v in value)
    if is_int(value) and not isinstance(value, bool):
        return abs(value) <= 1 << 16
    return value is None or isinstance(value, bool | str) or is_finite(value)


def _keys(mapping: dict[str, Any]) -> Iterator[str]:
    for key, value in mapping.items():
        yield key
        if isinstance(value, dict):
            yield from _keys(value)


def _check_source(config: ResNetEncoderConfig | BackboneEncoderConfig) -> None:
    """Where the starting weights come from: the library (`pretrained`) or a file."""
    tag = isinstance(config.pretrained, str) and config.kind == "open_clip"
    if not (isinstance(config.pretrained, bool) or tag):
        what = "a tag such as openai" if config.kind == "open_clip" else "true or false"
        raise ConfigError(
            f"model.encoder.pretrained must be {what}, got {short(config.pretrained)}."
        )
    if config.weights is not None and not isinstance(config.weights, str):
        raise ConfigError(
            f"model.encoder.weights must be a file path, got {short(config.weights)}."
        )
    if config.weights is not None and config.pretrained:
        raise ConfigError(
            "model.encoder.pretrained and model.encoder.weights both name starting weights: "
            "keep one (weights=PATH for a local file)."
        )


def _check_vit(config: EncoderConfig) -> None:
    _positive(config, ("patch_size", "in_channels"), "model.encoder")
    _check_width(config, "model.encoder")
    _one_of(config.stem, ("patch", "conv"), "model.encoder.stem")
    if config.stem == "conv" and config.patch_size & (config.patch_size - 1):
        raise ConfigError(
            f"model.encoder.stem=conv halves the image per convolution: model.encoder."
            f"patch_size must be a power of 2, got {config.patch_size}."
        )
    check_tiling(config.image_size, config.patch_size, "model.encoder.patch_size")
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
