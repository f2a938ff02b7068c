"""The public API: `Captioner.from_checkpoint(path).caption(images)`.

```python
from captioner.core.inference import Captioner

captioner = Captioner.from_checkpoint("logs/train/runs/<run>/checkpoints/last.ckpt")
for result in captioner.caption(["cat.jpg", "dog.png"], beam_size=3, return_attention=True):
    print(result.text, result.image_attention.shape)  # (layers, heads, tokens, grid_h, grid_w)
```
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captioner.core.checkpoint import CheckpointContents, load_checkpoint
from captioner.core.errors import ConfigError, ImageLoadError
from captioner.core.generation import DecodingOptions, Generated, generate
from captioner.core.images import ImagePreprocess, load_image
from captioner.core.models import CaptionerModel
from captioner.core.tokenizer import Tokenizer

ImageInput = Image.Image | torch.Tensor | str | Path


@dataclass
class Caption:
    """One image's caption, its tokens, their log-probabilities and, if asked, attention.

    Token i's attention is what the decoder looked at while choosing it. Patch grids read as
    the image does: row 0 is the top, column 0 the left.
    """

    text: str
    tokens: list[int]  # generated ids, <eos> included when it was generated
    words: list[str]  # the tokens as words ("<eos>" for the end)
    token_logprobs: torch.Tensor  # (T,) log p(token | image, tokens before it)
    image_attention: torch.Tensor | None = None  # (layers, heads, T, grid_h, grid_w)
    self_attention: torch.Tensor | None = None  # (layers, heads, T, T): keys <bos>, tokens[:-1]
    encoder_attention: torch.Tensor | None = None  # (layers, heads, patches, patches)
    # beam search: every hypothesis that ended, best first (this caption first), with the sum
    # of its log-probabilities
    alternatives: list[tuple[str, float]] | None = None

    @property
    def logprob(self) -> float:
        """Log-probability of the whole caption under the model."""
        return float(self.token_logprobs.sum())


class Captioner:
    """A trained model with its tokenizer and image preprocessing, ready to caption images."""

    def __init__(
        self,
        model: CaptionerModel,
        tokenizer: Tokenizer,
        preprocess: ImagePreprocess,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
    ) -> None:
        """`dtype`: the weights' (and images') type while captioning: bf16 halves the bytes
        that batch-1 decoding reads per token; scores stay float32."""
        self.device = usable_device(device)
        self.dtype = weight_dtype(dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
    ) -> Captioner:
        """Load a `.ckpt` or a run folder (its `checkpoints/last.ckpt`) from `scripts/train.py`
        or a folder from `scripts/export.py`, its weights cast to `dtype` (torch.bfloat16 or
        "bf16" for fast decoding).

        Nothing stored in the file is executed: see `captioner.core.checkpoint`.
        """
        return cls.from_contents(load_checkpoint(path), device, dtype)

    @classmethod
    def from_contents(
        cls,
        contents: CheckpointContents,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
    ) -> Captioner:
        """The captioner of a checkpoint already read (`load_checkpoint`), for callers that
        want its other parts too (the data config)."""
        return cls(
            contents.build_model(),
            Tokenizer.from_dict(contents.tokenizer),
            ImagePreprocess.from_dict(contents.preprocess),
            device,
            dtype,
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the image-attention maps."""
        return self.model.encoder.grid_size

    def images_to_batch(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Load and preprocess images into one normalised batch (B, C, H, W) on the device."""
        pixels = [
            self.preprocess(self.load(image) if isinstance(image, str | Path) else image)
            for image in images
        ]
        return torch.stack(pixels).to(self.device, self.dtype)

    def load(self, path: str | Path) -> Image.Image:
        """An image file, shrunk while decoded to no less than twice the model's input, as
        training and evaluation read it."""
        return load_image(path, at_least=self.preprocess.image_size)

    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        return_attention: bool = False,
        return_encoder_attention: bool = False,
        batch_size: int = 32,
        seed: int | None = None,
        **decoding: Any,
    ) -> list[Caption]:
        """Caption PIL images, (C, H, W) or (B, C, H, W) tensors (uint8, or floats in [0, 1])
        or file paths, `batch_size` at a time; one `Caption` per image, in order.

        `decoding` takes the fields of `DecodingOptions`: `beam_size=3`, `max_length=20`,
        `length_penalty`, `do_sample=True` with `temperature`, `top_k`, `top_p`, ... `seed`
        makes sampling reproducible.
        """
        try:
            options = DecodingOptions(**decoding)
        except TypeError as err:
            raise ConfigError(f"unknown decoding option: {err}") from None
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if seed is not None and not 0 <= seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {seed}.")
        items = _as_list(images)
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        results: list[Caption] = []
        for start in range(0, len(items), batch_size):
            batch = self.images_to_batch(items[start : start + batch_size])
            results += self._caption_batch(
                batch, options, return_attention, return_encoder_attention, generator
            )
        return results

    def _caption_batch(
        self,
        batch: torch.Tensor,
        options: DecodingOptions,
        return_attention: bool,
        return_encoder_attention: bool,
        generator: torch.Generator | None,
    ) -> list[Caption]:
        tok = self.tokenizer
        out = generate(
            self.model, batch, tok.bos_id, tok.eos_id, tok.pad_id, options,
            need_weights=return_attention, generator=generator,
        )  # fmt: skip
        encoder_attention = None
        if return_encoder_attention:
            with torch.no_grad():
                _, weights = self.model.encoder(batch, need_weights=True)
            assert weights is not None
            if weights:  # a convolutional encoder has no attention of its own
                encoder_attention = torch.stack(weights, dim=1).float().cpu()  # (B, L, H, N, N)
        results = to_captions(out, tok, self.model)
        if encoder_attention is not None:
            for caption, weights in zip(results, encoder_attention, strict=True):
                caption.encoder_attention = weights
        return results

    def caption_files(
        self, paths: Iterable[Path], batch_size: int = 16, **options: Any
    ) -> Iterator[tuple[Path, Caption | ImageLoadError, Image.Image | None]]:
        """Caption files as they come, `batch_size` at a time, without stopping at bad ones.

        Yields (path, caption, image) for each readable image and (path, error, None) for each
        file that is not one, in the order given.
        """
        pending: list[tuple[Path, Image.Image]] = []

        def flush() -> Iterator[tuple[Path, Caption, Image.Image]]:
            captions = self.caption([image for _, image in pending], **options)
            yield from ((p, c, image) for (p, image), c in zip(pending, captions, strict=True))
            pending.clear()

        for path in paths:
            try:
                pending.append((path, self.load(path)))
            except ImageLoadError as err:
                yield path, err, None
            if len(pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()


def to_captions(out: Generated, tokenizer: Tokenizer, model: CaptionerModel) -> list[Caption]:
    """One `Caption` per row of a `generate` result, its attention (if recorded) cut to the
    caption's length and its patches laid out on the encoder's grid, prefix tokens dropped."""
    prefix, grid = model.image_prefix_tokens, model.encoder.grid_size
    results = []
    for i in range(out.tokens.shape[0]):
        length = int(out.lengths[i])
        ids = out.tokens[i, :length].tolist()
        caption = Caption(
            text=tokenizer.decode(ids),
            tokens=ids,
            words=[tokenizer.itos[j] for j in ids],
            token_logprobs=out.token_logprobs[i, :length].cpu(),
        )
        if out.image_attention is not None and out.self_attention is not None:
            cross = out.image_attention[i, :, :, :length, prefix:]  # (L, H, T, patches)
            caption.image_attention = cross.unflatten(-1, grid).cpu()
            caption.self_attention = out.self_attention[i, :, :, :length, :length].cpu()
        if out.beam_tokens is not None and out.beam_logprobs is not None:
            beams = zip(out.beam_tokens[i].tolist(), out.beam_logprobs[i].tolist(), strict=True)
            caption.alternatives = [(tokenizer.decode(t), lp) for t, lp in beams if lp > -math.inf]
        results.append(caption)
    return results


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or many -> a list of single images."""
    if isinstance(images, torch.Tensor):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Image.Image | str | Path):
        return [images]
    return list(images)


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named, and every non-hidden entry under folders named but the folders
    themselves, in sorted order. Whether an entry is an image is decided by reading it, not by
    its name, so a broken link, a pipe or a link to a folder (not followed) is named as
    such when it is read instead of being left out without a word."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(_walk(item))
        else:
            found.append(item)  # a missing file is reported when it is read
    return found


def _walk(root: Path) -> Iterator[Path]:
    """Every entry below `root` but folders and dot-entries, going into real folders only (not
    links to them), without recursion, so no nesting depth can exhaust the stack."""
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                else:
                    yield Path(entry.path)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating type given by name (`DTYPES`) or as itself, or a `ConfigError` naming it."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ConfigError(f"dtype {dtype!r:.40} is not one of {', '.join(DTYPES)}.")


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device that exists on this machine, or a `ConfigError` naming it."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device {device!r:.40} is not a device name; expected cpu, cuda, cuda:N or mps."
        ) from None
    backends = {"cpu": torch.cpu, "cuda": torch.cuda, "mps": torch.backends.mps}
    if resolved.type not in backends:
        raise ConfigError(f"device {device}: captioner runs on cpu, cuda or mps.")
    if not backends[resolved.type].is_available():
        raise ConfigError(f"device {device}: this machine has no {resolved.type}; use cpu.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    return resolved
