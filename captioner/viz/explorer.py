"""An attention explorer: one self-contained HTML page where hovering a word of a caption lights
up the patches that word's cross-attention read, for any number of images.

Everything the page needs is inside it (images as PNG, attention, the script): it opens from
disk with no network. Attention is stored as 8-bit levels, each map (a word's attention in one
layer and head, an encoder query's row) scaled by its own maximum, which the page multiplies
back before averaging layers or heads, and deflated (the browser inflates it with Compression
Streams): a map's shape is kept to 1/255 of its peak in a tenth of float32's bytes or less.
The page (`explorer.html`) offers the layer and head or their mean, the raw maps or
rollout-adjusted ones (the word's attention carried back through the encoder's attention
rollout to the input patches), a play button stepping through the caption, the encoder's
self-attention from a clicked patch, and the beam hypotheses.
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from captioner.core.files import write_text
from captioner.core.inference import Caption
from captioner.viz.overlay import ALPHA, ImageLike, as_rgb, heat_colormap
from captioner.viz.rollout import attention_rollout


@dataclass
class ExplorerImage:
    """One image on the page: a name (its file), the image as the model saw it (resized whole
    to the model's input) and its caption with `image_attention` (and, for the encoder views,
    `encoder_attention`)."""

    name: str
    image: ImageLike
    caption: Caption


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _levels(maps: torch.Tensor) -> dict[str, Any]:
    """Maps (..., values) -> 8-bit levels of each map over its maximum, deflated (a trained
    model's attention is peaked: mostly zeros), and the maxima."""
    maps = maps.detach().float().cpu().clamp_min(0.0)
    peak = maps.amax(dim=-1, keepdim=True)
    levels = torch.round(maps / peak.clamp_min(1e-30) * 255).to(torch.uint8)
    return {
        "q": base64.b64encode(zlib.compress(levels.numpy().tobytes(), 9)).decode("ascii"),
        "scale": _b64(peak.squeeze(-1).numpy().astype("<f4")),
        "shape": list(maps.shape),
    }


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _item(entry: ExplorerImage, num_prefix_tokens: int) -> dict[str, Any]:
    caption = entry.caption
    if caption.image_attention is None:
        raise ValueError(
            f"{entry.name}: its caption has no attention; caption with return_attention=True."
        )
    layers, heads, words, rows, cols = caption.image_attention.shape
    patches = rows * cols
    encoder = rollout = None
    if caption.encoder_attention is not None:  # (layers, heads, N, N), prefix tokens first
        weights = caption.encoder_attention.float()
        cut = slice(num_prefix_tokens, num_prefix_tokens + patches)
        encoder = _levels(weights.mean(dim=1)[:, cut, cut])  # (layers, patches, patches)
        flow = attention_rollout(weights, num_prefix_tokens=num_prefix_tokens)[cut, cut]
        rollout = _levels(flow)  # row j: how much each input patch reaches output token j
    pixels = (as_rgb(entry.image) * 255).round().astype(np.uint8)  # (H, W, 3)
    return {
        "name": entry.name,
        "image": _png(pixels),
        "size": list(pixels.shape[:2]),
        "grid": [rows, cols],
        "words": caption.words,
        "probs": caption.token_logprobs.float().exp().tolist(),
        "cross": _levels(caption.image_attention.reshape(layers, heads, words, patches)),
        "encoder": encoder,
        "rollout": rollout,
        "beams": caption.alternatives or [],
    }


def explorer_html(
    images: Sequence[ExplorerImage],
    *,
    num_prefix_tokens: int = 0,
    title: str = "captioner: where each word looks",
) -> str:
    """The page for `images` (every caption from one model), as a string.

    `num_prefix_tokens`: the encoder's CLS and register tokens, first in its attention, which
    the patch views leave out (`ImageEncoder.num_prefix_tokens`).
    """
    if not images:
        raise ValueError("the explorer needs at least one captioned image")
    items = [_item(entry, num_prefix_tokens) for entry in images]
    layers, heads = items[0]["cross"]["shape"][:2]
    lut = (heat_colormap(ALPHA)(np.linspace(0.0, 1.0, 256)) * 255).round().astype(np.uint8)
    data = {"layers": layers, "heads": heads, "lut": _b64(lut), "items": items}
    # "<" escaped, so no caption or file name can close the script element it sits in
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    template = resources.files("captioner.viz").joinpath("explorer.html").read_text("utf-8")
    safe_title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return template.replace("__TITLE__", safe_title).replace("__DATA__", payload)


def explorer(
    images: Sequence[ExplorerImage],
    path: str | Path,
    *,
    num_prefix_tokens: int = 0,
    title: str = "captioner: where each word looks",
) -> Path:
    """Write the page for `images` to `path` (`explorer_html`); returns the path."""
    html = explorer_html(images, num_prefix_tokens=num_prefix_tokens, title=title)
    return write_text(path, html)
