"""Exporting a checkpoint as `model.safetensors` (tensors, no pickle) and `captioner.json` (the
architecture, vocabulary, preprocessing and data record): a pair anyone can read safely."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save

from captioner.core.checkpoint.contents import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointContents,
    tied_names,
)
from captioner.core.errors import ConfigError
from captioner.core.files import AtomicFile


def export(contents: CheckpointContents, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `model.safetensors` and `captioner.json` into `out_dir`; returns their paths.

    Both files are written in full beside their places first, then renamed into them: a failed
    write never leaves new weights beside an old vocabulary."""
    out_dir = Path(out_dir)
    model = contents.build_model()
    tied = tied_names(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    weights, config = AtomicFile(out_dir / WEIGHTS_NAME), AtomicFile(out_dir / CONFIG_NAME)
    files = []
    try:
        files = [weights.open(), config.open()]
        files[0].write(save(state, metadata={"format": "pt"}))
        files[1].write((json.dumps(contents.metadata(), indent=2) + "\n").encode())
        for target, file in zip((weights, config), files, strict=True):
            target.commit(file)
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"{out_dir}: the export cannot be written there ({err}).") from None
    finally:
        for file in files:
            file.close()
        weights.discard()
        config.discard()
    return weights.path, config.path
