"""Reading and exporting checkpoints, without ever running code stored in a file.

Two formats hold everything a captioner needs (weights, architecture, vocabulary, image
preprocessing and the data config it was trained on):
- a Lightning `.ckpt` from `scripts/train.py`, read with `torch.load(weights_only=True)`, which
  refuses any pickled object other than tensors and plain values;
- an export folder from `scripts/export.py`: `model.safetensors` (tensors only, no pickle) and
  `captioner.json`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from captioner.models import CaptionerConfig, CaptionerModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "captioner.json"
FORMAT_VERSION = 1
REQUIRED = ("config", "tokenizer", "preprocess")
_HELP = "use a .ckpt written by scripts/train.py or a folder written by scripts/export.py"


@dataclass
class CheckpointContents:
    """A checkpoint's parts, as plain types and tensors."""

    source: Path  # the file it was read from, named in every error
    config: CaptionerConfig
    tokenizer: dict[str, Any]  # `Tokenizer.to_dict()`
    preprocess: dict[str, Any]  # `ImagePreprocess.to_dict()`
    state_dict: dict[str, torch.Tensor]  # `CaptionerModel` weights
    data: dict[str, Any] | None = None  # the data config it was trained on

    def build_model(self) -> CaptionerModel:
        """The model with these weights, in eval mode."""
        return self.load_into(CaptionerModel(self.config)).eval()

    def load_into(self, model: CaptionerModel) -> CaptionerModel:
        """Copy these weights into a model built from `self.config`; returns it."""
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        missing = sorted(set(missing) - _tied_names(model))  # tied weights are stored once
        if missing or unexpected:
            raise CheckpointError(
                f"{self.source}: its weights do not fit the architecture it records "
                f"(missing: {missing[:5]}, unexpected: {sorted(unexpected)[:5]}); {_HELP}."
            )
        return model

    def metadata(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able values."""
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer,
            "preprocess": self.preprocess,
            "data": self.data,
        }


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (tied embeddings)."""
    seen: set[int] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def _contents(meta: Any, state: dict[str, torch.Tensor], source: Path) -> CheckpointContents:
    if not isinstance(meta, dict) or any(key not in meta for key in REQUIRED):
        raise CheckpointError(
            f"{source}: not a captioner checkpoint (it lacks {', '.join(REQUIRED)}); {_HELP}."
        )
    try:
        config = CaptionerConfig.from_dict(meta["config"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{source}: its model config is not valid: {err}") from None
    return CheckpointContents(
        source, config, meta["tokenizer"], meta["preprocess"], state, meta.get("data")
    )


def _load_lightning(path: Path) -> CheckpointContents:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err)))) or ["unknown objects"]
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it would import {', '.join(names)}, and unpickling such "
            "objects can run any code. Checkpoints from scripts/train.py hold only tensors and "
            "plain values. Only if you trust where the file came from: load it with "
            "torch.load(path, weights_only=False) and torch.save its 'state_dict' and "
            "'captioner' entries alone."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]}); is the "
            "file complete?"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict); {_HELP}.")
    state = {
        name.removeprefix("net."): tensor
        for name, tensor in ckpt["state_dict"].items()
        if name.startswith("net.")
    }
    return _contents(ckpt.get("captioner"), state, path)


def _load_export(weights: Path) -> CheckpointContents:
    config = weights.with_name(CONFIG_NAME)
    for needed in (weights, config):
        if not needed.is_file():
            raise CheckpointError(
                f"{needed}: missing; an export folder holds {WEIGHTS_NAME} and {CONFIG_NAME}."
            )
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config}: not valid JSON ({err}).") from None
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err}).") from None
    return _contents(meta, state, weights)


def load_checkpoint(path: str | Path) -> CheckpointContents:
    """Read a `.ckpt` file, an export folder or its `model.safetensors`; nothing in it runs."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or export folder.")
    if path.is_dir():
        return _load_export(path / WEIGHTS_NAME)
    if path.suffix == ".safetensors":
        return _load_export(path)
    return _load_lightning(path)


def export(contents: CheckpointContents, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `model.safetensors` and `captioner.json` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = contents.build_model()  # checks that the weights fit before anything is written
    tied = _tied_names(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    weights, config = out_dir / WEIGHTS_NAME, out_dir / CONFIG_NAME
    save_file(state, weights, metadata={"format": "pt"})
    config.write_text(json.dumps(contents.metadata(), indent=2) + "\n")
    return weights, config


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made crash-safe: a checkpoint is written to a temporary
    file beside its destination, flushed to disk, then renamed over it in one step.

    A run killed mid-write (pre-emption, out of memory) leaves the previous `last.ckpt` whole,
    never a truncated file in its place. Lightning's own writer goes through the system's
    temporary folder, whose final move is a copy, not an atomic rename, when that folder is on
    another file system.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)  # what open() would have given, not mkstemp's 0600
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
