"""A folder of attention figures per captioned image (`scripts/caption.py --save-attention`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from captioner.errors import ConfigError
from captioner.viz.gif import save_gif
from captioner.viz.matrices import attention_matrices
from captioner.viz.overlay import word_overlays

STEM_BYTES = 200  # a file name holds at most 255 bytes: room for "_matrices.png" and a hash


class AttentionFolder:
    """Writes, per image, `<stem>.png` (the image under each word's cross-attention),
    `<stem>.gif` (the same word by word) and `<stem>_matrices.png` (the words x patches matrix
    beside the decoder's causal and the encoder's self-attention).

    The folder is made when this is built, so a wrong path fails before any captioning. A
    stem is the image's own, shortened with a hash when it is too long for a file name, and
    `_` is added when two images share one.
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
        self.used: set[str] = set()

    def stem(self, path: Path) -> str:
        name = path.stem
        raw = name.encode(errors="surrogateescape")
        if len(raw) > STEM_BYTES:
            cut = raw[:STEM_BYTES].decode(errors="ignore")  # whole characters only
            name = f"{cut}-{hashlib.sha1(raw).hexdigest()[:8]}"
        while name in self.used:
            name += "_"
        self.used.add(name)
        return name

    def save(self, path: Path, image: Any, caption: Any, num_prefix_tokens: int) -> None:
        """The three figures of `caption` (a `Caption` with attention) of the image at `path`."""
        name, words = self.stem(path), caption.words
        overlays = word_overlays(image, caption.cross_attention, words)
        overlays.savefig(self.directory / f"{name}.png", dpi=100)
        save_gif(self.directory / f"{name}.gif", image, caption.cross_attention, words)
        matrices = attention_matrices(
            words, caption.cross_attention, caption.self_attention, caption.encoder_attention,
            num_prefix_tokens=num_prefix_tokens,
        )  # fmt: skip
        matrices.savefig(self.directory / f"{name}_matrices.png", dpi=100)
