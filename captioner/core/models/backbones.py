"""Image encoders built by libraries: a torchvision ResNet's feature grid, a timm ViT, the
visual tower of an OpenCLIP model.

Each wraps the library's own module (`self.model`), so its weights load, save and freeze under
the library's parameter names; the wrapper says how its tokens map to the image (`grid_size`,
`patch_size`, `num_prefix_tokens`), what pixels the weights expect (`preprocessing`) and,
on request, returns the encoder's attention through forward hooks on the library's modules,
never by replacing its code. timm and open_clip are optional: `pip install -e ".[backbones]"`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captioner.core.errors import ConfigError, first_line
from captioner.core.models.config import BackboneEncoderConfig, ResNetEncoderConfig, check_tiling
from captioner.core.models.encoder import ImageEncoder

# torchvision's ImageNet statistics, which its ResNet weights were trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _library(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        package = {"open_clip": "open_clip_torch"}.get(name, name)
        raise ConfigError(
            f'model/encoder={name} needs the {package} package: pip install -e ".[backbones]".'
        ) from None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a tensors-only torch file (.pth / .bin, read
    with `weights_only=True`: loading it runs no code)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.encoder.weights={path}: no such file.")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"model.encoder.weights={path}: not a weights file this library reads "
            f"(safetensors, or a .pth/.bin state dict): {type(err).__name__}: {err}"
        ) from None
    for key in ("state_dict", "model", "module"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.encoder.weights={path}: holds no mapping of names to tensors.")
    return state


@contextmanager
def _named_weights(path: str | None, name: str) -> Iterator[None]:
    """A library error while loading `path` -> one `ConfigError` naming the file and model."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        where = f"model.encoder.weights={path}" if path else "the pretrained weights"
        hint = "" if path else " (no network? download them elsewhere and set weights=PATH)"
        raise ConfigError(
            f"{where} could not be loaded into {name}{hint}: "
            f"{first_line(err, with_type=True)[:320]}"
        ) from None


class _LibraryEncoder(ImageEncoder):
    """What the three share: the library's module is `self.model`, its init is kept."""

    from_scratch = False
    model: nn.Module

    def _check_grid(self, image_size: tuple[int, int]) -> None:
        check_tiling(image_size, self.patch_size, "the encoder's patch size")
        rows, cols = image_size[0] // self.patch_size, image_size[1] // self.patch_size
        self.grid_size = (rows, cols)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{name}" for name in names}


class ResNetEncoder(_LibraryEncoder):
    """A torchvision ResNet cut after `stages` residual stages: each cell of its last feature
    map is one token (B, rows * cols, channels), layer-normalised so that the decoder reads
    tokens on the scale a ViT's are. No attention of its own: `need_weights` returns []."""

    num_prefix_tokens = 0

    def __init__(self, config: ResNetEncoderConfig, dropout: float = 0.0) -> None:
        super().__init__()
        models = importlib.import_module("torchvision.models")
        if config.name not in models.list_models(module=models):
            raise ConfigError(f"model.encoder.name={config.name} is not a torchvision model.")
        with _named_weights(config.weights, config.name):
            net = models.get_model(config.name, weights="DEFAULT" if config.pretrained else None)
            if config.weights is not None:
                net.load_state_dict(read_weights(config.weights))
        self.model = nn.Sequential(
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
            *(getattr(net, f"layer{i}") for i in range(1, config.stages + 1)),
        )
        last = self.model[-1][-1]
        self.dim = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
        self.patch_size = 4 * 2 ** (config.stages - 1)
        self._check_grid(config.image_size)
        self.norm = nn.LayerNorm(self.dim)

    def forward(
        self, images: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        x = self.model(images)  # (B, C, rows, cols)
        return self.norm(x.flatten(2).transpose(1, 2)), ([] if need_weights else None)

    def stages(self) -> Sequence[nn.Module]:
        return list(self.model)[1:]

    def preprocessing(self) -> dict[str, Any]:
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}

    def attention_flops(self) -> int:
        return 0


class _HookedAttention:
    """Attention weights (B, heads, N, N) per layer, read from a library's modules by
    forward hooks while the library's explicit (unfused) path runs."""

    def __init__(self, modules: Sequence[nn.Module], hook: Callable[..., Any]) -> None:
        self.modules, self.hook, self.weights = modules, hook, []

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.weights = []
        handles = [self.hook(module, self.weights) for module in self.modules]
        try:
            yield self.weights
        finally:
            for handle in handles:
                handle.remove()


class TimmEncoder(_LibraryEncoder):
    """A timm ViT (`model/encoder=timm`): `forward_features` gives [prefix tokens; patches]
    after its final norm. Attention weights come from its own softmax: with `fused_attn` off,
    timm's `Attention` passes the weights through `attn_drop`, whose input a hook records."""

    def __init__(self, config: BackboneEncoderConfig, dropout: float = 0.0) -> None:
        super().__init__()
        timm = _library("timm")
        if not timm.is_model(config.name.split(".")[0]):
            raise ConfigError(
                f"model.encoder.name={config.name} is not a timm model (timm.list_models())."
            )
        weights = config.weights
        state = None if weights is None else read_weights(weights)
        with _named_weights(weights, f"timm model {config.name}"):
            self.model = model = timm.create_model(
                config.name, pretrained=bool(config.pretrained), num_classes=0,
                img_size=tuple(config.image_size), **config.kwargs,
            )  # fmt: skip
            if state is not None:
                model.load_state_dict(_for_timm(model, state))
        if not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
            raise ConfigError(
                f"model.encoder.name={config.name} is not a ViT (no patch_embed and blocks): "
                "timm encoders here are ViTs; for a CNN use model/encoder=resnet."
            )
        patch = tuple(model.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ConfigError(f"{config.name} has non-square patches {patch}.")
        self.dim, self.patch_size = model.embed_dim, patch[0]
        self.num_prefix_tokens = model.num_prefix_tokens
        self.reads_prefix = config.read_prefix_tokens
        self._check_grid(config.image_size)
        assert tuple(model.patch_embed.grid_size) == self.grid_size
        attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
        self._attention = _HookedAttention(attention, self._hook)

    @staticmethod
    def _hook(module: nn.Module, into: list[torch.Tensor]) -> Any:
        return module.attn_drop.register_forward_hook(lambda _m, args, _out: into.append(args[0]))

    def forward(
        self, images: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        if not need_weights:
            return self.model.forward_features(images), None
        modules = self._attention.modules
        fused = [m.fused_attn for m in modules]
        try:
            for m in modules:
                m.fused_attn = False
            with self._attention.recording() as weights:
                tokens = self.model.forward_features(images)
        finally:
            for m, was in zip(modules, fused, strict=True):
                m.fused_attn = was
        return tokens, list(weights)

    def stages(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    def preprocessing(self) -> dict[str, Any]:
        return _statistics(self.model.pretrained_cfg)


def _for_timm(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm checkpoint fitted to `model` by the model family's own filter (which resamples
    position embeddings to the image size and renames old layouts), its classifier dropped."""
    family = importlib.import_module(type(model).__module__)
    fit = getattr(family, "checkpoint_filter_fn", None)
    state = fit(state, model) if fit is not None else state
    classifier = model.pretrained_cfg.get("classifier", "head")
    return {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}


class OpenClipEncoder(_LibraryEncoder):
    """The visual tower of an OpenCLIP model (`model/encoder=open_clip`), without its
    projection to the joint embedding: the decoder reads [CLS; patches] after `ln_post`, at
    the tower's width. Attention weights: a forward hook on each `nn.MultiheadAttention`
    asks the same module again for its per-head weights."""

    def __init__(self, config: BackboneEncoderConfig, dropout: float = 0.0) -> None:
        super().__init__()
        open_clip = _library("open_clip")
        if config.name not in open_clip.list_models():
            raise ConfigError(
                f"model.encoder.name={config.name} is not an OpenCLIP model "
                "(open_clip.list_models())."
            )
        weights = config.weights
        if weights is not None:
            read_weights(weights)
        source = weights or (config.pretrained if isinstance(config.pretrained, str) else None)
        size, kwargs = tuple(config.image_size), dict(config.kwargs)
        if "vision_cfg" in kwargs:  # replaces the named model's, image size included
            kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": size}
        with _named_weights(weights, f"OpenCLIP model {config.name}"):
            clip = open_clip.create_model(  # on the device being built on (meta: checks)
                config.name, pretrained=source, force_image_size=size,
                device=torch.empty(0).device, **kwargs,
            )  # fmt: skip
        visual = clip.visual
        plain = getattr(visual, "pool_type", None) == "tok" and visual.attn_pool is None
        if not (hasattr(visual, "conv1") and plain and not visual.final_ln_after_pool):
            raise ConfigError(
                f"{config.name}'s visual tower is not a plain OpenCLIP ViT (CLS token, no "
                "attentional pooling): use its timm name with model/encoder=timm, or "
                "model/encoder=resnet."
            )
        visual.proj = None  # the joint-embedding projection: the decoder reads the tokens
        visual.output_tokens = True
        self.model, self.dim = visual, visual.transformer.width
        self._preprocess = dict(getattr(visual, "preprocess_cfg", {}))
        self.patch_size = visual.conv1.kernel_size[0]
        self.num_prefix_tokens = 1
        self.reads_prefix = config.read_prefix_tokens
        self._check_grid(config.image_size)
        attention = [block.attn for block in visual.transformer.resblocks]
        self._attention = _HookedAttention(attention, self._hook)

    @staticmethod
    def _hook(module: nn.Module, into: list[torch.Tensor]) -> Any:
        def record(mod: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            options = {**kwargs, "need_weights": True, "average_attn_weights": False}
            into.append(mod.forward(*args, **options)[1])  # (B, heads, N, N), no hooks

        return module.register_forward_hook(record, with_kwargs=True)

    def forward(
        self, images: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        if not need_weights:
            pooled, patches = self.model(images)
            return torch.cat([pooled[:, None], patches], dim=1), None
        with self._attention.recording() as weights:
            pooled, patches = self.model(images)
        return torch.cat([pooled[:, None], patches], dim=1), list(weights)

    def stages(self) -> Sequence[nn.Module]:
        return list(self.model.transformer.resblocks)

    def preprocessing(self) -> dict[str, Any]:
        return _statistics(self._preprocess)


def _statistics(cfg: dict[str, Any]) -> dict[str, Any]:
    """Mean, std and interpolation from a library's preprocessing config (whole-image resize
    here, never the centre crop some of them evaluate with: a caption describes all of it)."""
    interpolation = cfg.get("interpolation", "bicubic")
    return {
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)), "std": tuple(cfg.get("std", IMAGENET_STD)),
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bicubic",
    }  # fmt: skip
