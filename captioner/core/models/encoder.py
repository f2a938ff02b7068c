"""Image encoders: what turns an image into tokens a caption decoder reads.

`ImageEncoder` is the interface everything else uses: its output tokens, how they map back
to the image (`grid_size`, `patch_size`, `num_prefix_tokens`), and what fine-tuning needs
(`stages`, `freeze`, `layer_ids`, `no_weight_decay`, `preprocessing`). `VisionEncoder` is the
ViT one, trained from scratch: patches (or a convolutional stem) -> bidirectional transformer
-> one token per patch. `captioner.core.models.backbones` holds the encoders built by libraries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from captioner.core.errors import ConfigError
from captioner.core.models.blocks import Block
from captioner.core.models.config import EncoderConfig
from captioner.core.models.rotary import Rotation, rotation


def sincos_2d(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (N, dim): half the channels per axis."""
    rows, cols = grid_size
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (D/4,)
    ys, xs = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )  # fmt: skip
    parts = []
    for coord in (ys.flatten(), xs.flatten()):  # row-major patch order
        angles = coord[:, None] * omega[None, :]  # (N, D/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # (N, D)


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a conv whose stride is the patch size."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images)  # (B, D, grid_h, grid_w)
        return x.flatten(2).transpose(1, 2)  # (B, grid_h * grid_w, D), row-major


class ConvStem(nn.Module):
    """Early convolutions instead of one linear map per patch (Xiao et al., 2021): 3x3
    stride-2 convolutions with batch norm and ReLU, each halving the image and doubling the
    channels up to `dim`, then a 1x1 convolution to `dim`. Their locality is a prior a ViT
    otherwise has to learn from data, which small training sets do not hold."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        steps = int(math.log2(patch_size))
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(steps):
            width = max(16, dim >> (steps - 1 - i))
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers.append(nn.Conv2d(channels, dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images)  # (B, D, grid_h, grid_w)
        return x.flatten(2).transpose(1, 2)  # (B, grid_h * grid_w, D), row-major

    def reset_parameters(self) -> None:
        """He initialisation for the ReLU convolutions; LeCun for the last, linear one."""
        *convs, last = [m for m in self.proj if isinstance(m, nn.Conv2d)]
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.trunc_normal_(last.weight, std=last.weight[0].numel() ** -0.5)


def parse_freeze(value: Any) -> int | None:
    """`model.encoder.freeze`: "none" -> None (train everything), "all" -> 0 blocks trained,
    "last_n=N" (or "last_N", easier to type on a command line) -> the last N blocks trained."""
    if value in ("none", None, False):
        return None
    if value in ("all", True):
        return 0
    match = re.fullmatch(r"last_(?:n=)?(\d+)", str(value))
    if match is None or int(match[1]) < 1:
        raise ConfigError(
            f"model.encoder.freeze must be all, none or last_n=N (N >= 1; on a command line "
            f"also last_N), got {value!r}."
        )
    return int(match[1])


class ImageEncoder(nn.Module):
    """An image (B, C, H, W) -> tokens (B, num_prefix_tokens + grid_h * grid_w, dim): first the
    prefix tokens (CLS, registers), then one per patch in row-major order, row 0 at the top.

    `forward(images, need_weights)` returns the tokens and, when asked, the encoder's own
    attention per layer (B, heads, tokens, tokens); the grid, patch size and prefix count map
    any attention over the tokens back to pixels.
    """

    dim: int  # width of the tokens
    grid_size: tuple[int, int]  # patch rows, columns
    patch_size: int  # pixels a side of one patch
    num_prefix_tokens: int  # tokens before the patches
    from_scratch = True  # initialised by `CaptionerModel`; False: the library's weights stay
    reads_prefix = False  # whether the decoder reads the prefix tokens too

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def forward(
        self, images: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        raise NotImplementedError

    def attention_flops(self) -> int:
        """FLOPs of the attention products (Q K^T and weights x V) for one image: every block
        attends over every token."""
        return len(self.stages()) * 4 * self.num_tokens**2 * self.dim

    def stages(self) -> Sequence[nn.Module]:
        """The repeated blocks, input to output: what `freeze` and layer-wise learning-rate
        decay count."""
        raise NotImplementedError

    def preprocessing(self) -> dict[str, Any] | None:
        """The pixel statistics and interpolation the weights were trained with (`mean`,
        `std`, `interpolation`), or None where the data's own apply (trained from scratch)."""
        return None

    def no_weight_decay(self) -> set[str]:
        """Parameter names (within the encoder) never decayed besides vectors: positions and
        learned tokens, which weight decay would pull towards zero for no gain."""
        return {name for name, _ in self.named_parameters() if name.endswith("pos_embed")}

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's depth: 0 before the first block (embeddings, positions, prefix
        tokens), i + 1 in block i, len(stages) + 1 after the last (final norm); what
        `freeze` and layer-wise decay use. Parameters are registered input first, which
        places those outside the blocks."""
        owner = {id(p): i + 1 for i, stage in enumerate(self.stages()) for p in stage.parameters()}
        ids, seen_block = {}, 0
        for name, param in self.named_parameters():
            seen_block = owner.get(id(param), seen_block and len(self.stages()) + 1)
            ids[name] = seen_block
        return ids

    def freeze(self, spec: Any) -> None:
        """Stop gradients to all of the encoder (`all`), or all but its last N blocks and what
        follows them (`last_n=N`). Frozen parts also stay in eval mode (`train`): no dropout,
        no batch-norm statistics updated, so they compute exactly what they were given."""
        trained = parse_freeze(spec)
        if trained is None:
            return
        depth = len(self.stages())
        if trained > depth:
            raise ConfigError(
                f"model.encoder.freeze=last_n={trained}, but the encoder has {depth} blocks."
            )
        ids = self.layer_ids()
        for name, param in self.named_parameters():
            param.requires_grad_(trained > 0 and ids[name] > depth - trained)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if mode:
            for module in self.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self


class VisionEncoder(ImageEncoder):
    """The ViT encoder (`model/encoder=vit`): learned or fixed 2-D sin-cos positions added to
    the patches, or 2-D axial rotary positions in every attention (`rope`: half of each
    head's channels turn with the patch's row, half with its column); no prefix token (every
    output token is a patch). `stem: conv` embeds the patches with `ConvStem`."""

    num_prefix_tokens = 0

    def __init__(self, config: EncoderConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.grid_size = config.grid_size
        self.patch_size = config.patch_size
        self.dim = dim = config.dim
        stem = ConvStem if config.stem == "conv" else PatchEmbed
        self.patch_embed = stem(config.patch_size, config.in_channels, dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        rope = None
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        elif config.pos_embed == "sincos":
            self.register_buffer(
                "pos_embed", sincos_2d(self.grid_size, dim)[None], persistent=False
            )
        else:  # rope: (row, column) of each patch, row-major, instead of an added embedding
            self.pos_embed = None
            rows, cols = torch.meshgrid(
                torch.arange(self.grid_size[0]), torch.arange(self.grid_size[1]), indexing="ij"
            )
            coords = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (N, 2)
            rope = torch.stack(rotation(coords, dim // config.heads))  # (2, N, head_dim)
        self.register_buffer("rope", rope, persistent=False)  # cos, sin
        self.blocks = nn.ModuleList(
            Block(dim, config.heads, config.mlp_ratio, dropout, config.kv_heads)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, images: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Images (B, C, H, W) -> patch tokens (B, N, D) and, if asked, per-layer attention."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"expected images shaped (B, C, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(images.shape)}: resize them to data.image_size."
            )
        x = self.patch_embed(images)  # (B, N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rope: Rotation | None = None
        if self.rope is not None:
            cos, sin = self.rope
            rope = (cos, sin)
        weights = []
        for block in self.blocks:
            x, w = block(x, need_weights, rope=rope)
            weights.append(w)
        return self.norm(x), (weights if need_weights else None)

    def stages(self) -> Sequence[nn.Module]:
        return self.blocks

    def reset_stem(self) -> None:
        """Patch embedding: LeCun normal (JAX ViT), so pixel content starts on the same scale
        as the position embedding instead of far below a fixed sin-cos one."""
        if isinstance(self.patch_embed, ConvStem):
            self.patch_embed.reset_parameters()
        else:
            weight = self.patch_embed.proj.weight
            nn.init.trunc_normal_(weight, std=weight[0].numel() ** -0.5)
