"""Figures written to files: any figure (`save_figure`), and a folder of attention figures per
captioned image (`scripts/caption.py --save-attention`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from captioner.core.errors import ConfigError
from captioner.core.files import atomic_write
from captioner.viz.gif import save_gif
from captioner.viz.matrices import attention_matrices
from captioner.viz.overlay import word_overlays

STEM_BYTES = 200  # a file name holds at most 255 bytes: room for "_matrices.png" and a hash
SUFFIXES = (".png", ".gif", "_matrices.png")  # the files written for one image
MAX_SIDE = 2048  # figures show an image no larger than this (a 8 x 10,000,000 strip is shrunk)


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """`figure` as a PNG at `path`, written atomically (`captioner.core.files`)."""
    with atomic_write(path) as file:
        figure.savefig(file, format="png", dpi=dpi)
    return Path(path)


class AttentionFolder:
    """Writes, per image, `<stem>.png` (the image under each word's attention over the image),
    `<stem>.gif` (the same word by word) and `<stem>_matrices.png` (the words x patches matrix
    beside the decoder's causal and the encoder's self-attention).

    The folder is made when this is built, so a wrong path fails before any captioning. A
    stem is the image's own, shortened with a hash when it is too long for a file name, with
    `_` added until none of its files is one already written (`a.png` and `a_matrices.png`
    in one folder both keep their figures).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"--save-attention {self.directory}: exists and is not a folder.")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"--save-attention {self.directory}: cannot make it ({err.strerror or err})."
            ) from None
        self.written: set[str] = set()

    def stem(self, path: Path) -> str:
        name = path.stem
        raw = name.encode(errors="surrogateescape")
        if len(raw) > STEM_BYTES:
            cut = raw[:STEM_BYTES].decode(errors="ignore")  # whole characters only
            name = f"{cut}-{hashlib.sha1(raw).hexdigest()[:8]}"
        while any(name + suffix in self.written for suffix in SUFFIXES):
            name += "_"
        self.written.update(name + suffix for suffix in SUFFIXES)
        return name

    def save(self, path: Path, image: Any, caption: Any, num_prefix_tokens: int) -> None:
        """The three figures of `caption` (a `Caption` with attention) of the image at `path`."""
        name, words = self.stem(path), caption.words
        if isinstance(image, Image.Image) and max(image.size) > MAX_SIDE:
            image = image.copy()
            image.thumbnail((MAX_SIDE, MAX_SIDE))
        overlays = word_overlays(image, caption.image_attention, words)
        save_figure(overlays, self.directory / f"{name}.png")
        save_gif(self.directory / f"{name}.gif", image, caption.image_attention, words)
        matrices = attention_matrices(
            words, caption.image_attention, caption.self_attention, caption.encoder_attention,
            num_prefix_tokens=num_prefix_tokens,
        )  # fmt: skip
        save_figure(matrices, self.directory / f"{name}_matrices.png")
