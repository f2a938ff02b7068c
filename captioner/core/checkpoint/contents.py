"""A checkpoint's contents, every part checked before anything is built from it.

Two formats hold everything a captioner needs (weights, architecture, vocabulary, image
preprocessing and the data config it was trained on):
- a Lightning `.ckpt` from `scripts/train.py`, read without running code (`reading`);
- an export folder from `scripts/export.py`: `model.safetensors` (tensors only, no pickle) and
  `captioner.json` (`export`).

Whatever the format, the file is a checkpoint at all, the architecture's values have their
types and fit the weights' shapes (checked on a model built on the `meta` device, so a forged
size allocates nothing), weights are finite floating-point tensors, the vocabulary and
preprocessing are well formed, and the recorded data config is plain data (`record`). Every
failure is a `CheckpointError` naming the file and the field.

Wherever a checkpoint is expected, a training run folder stands for its `checkpoints/last.ckpt`
(`resolve_checkpoint`), and the file read is named, since a folder does not say which it is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from captioner.core.checkpoint.reading import (
    HELP,
    head_bytes,
    is_safetensors,
    read_torch_checkpoint,
)
from captioner.core.checkpoint.record import check_record
from captioner.core.errors import CheckpointError, first_line
from captioner.core.images import ImagePreprocess
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.core.tokenizer import Tokenizer
from captioner.core.values import is_int, loads_unique, short

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "captioner.json"
FORMAT_VERSION = 1
LAST = Path("checkpoints", "last.ckpt")  # in a training run folder: the checkpoint to resume
REQUIRED = ("config", "tokenizer", "preprocess")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OBJECTIVES = ("cross_entropy", "self_critical")  # what a checkpoint was trained on


@dataclass
class CheckpointContents:
    """A checkpoint's parts, as plain types and tensors, every one already checked."""

    source: Path  # the file it was read from, named in every error
    kind: str  # "lightning" (a .ckpt: can resume training) or "export" (weights only)
    config: CaptionerConfig
    tokenizer: dict[str, Any]  # `Tokenizer.to_dict()`
    preprocess: dict[str, Any]  # `ImagePreprocess.to_dict()`
    state_dict: dict[str, torch.Tensor]  # `CaptionerModel` weights
    data: dict[str, Any] | None = None  # the data config it was trained on
    objective: str = "cross_entropy"  # or "self_critical" (`captioner.training.scst`)

    def build_model(self) -> CaptionerModel:
        """The model with these weights, in eval mode; a library encoder's architecture only
        is built, its pretrained weights never fetched: every weight is here."""
        return self.load_into(CaptionerModel(self.config.without_downloads())).eval()

    def load_into(self, model: CaptionerModel) -> CaptionerModel:
        """Copy these weights into a model built from `self.config`; returns it."""
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        missing = sorted(set(missing) - tied_names(model))  # tied weights are stored once
        if missing or unexpected:
            raise CheckpointError(
                f"{self.source}: its weights do not fit the model they are loaded into "
                f"(missing: {missing[:5]}, unexpected: {sorted(unexpected)[:5]}); {HELP}."
            )
        return model

    def metadata(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able values: what an export's JSON holds."""
        return {
            "format_version": FORMAT_VERSION,
            **checkpoint_record(
                self.config, self.tokenizer, self.preprocess, self.data, self.objective
            ),
        }


def checkpoint_record(
    config: CaptionerConfig,
    tokenizer: dict[str, Any],
    preprocess: dict[str, Any],
    data: dict[str, Any] | None,
    objective: str,
) -> dict[str, Any]:
    """What every checkpoint keeps beside its weights (a Lightning `.ckpt` under its
    "captioner" key, an export in its JSON): enough to rebuild the captioner without Hydra."""
    return {
        "config": config.to_dict(),
        "tokenizer": tokenizer,
        "preprocess": preprocess,
        "data": data,
        "objective": objective,
    }


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (tied embeddings)."""
    seen: set[int] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def _field(source: Path, name: str, read: Callable[[], Any]) -> Any:
    """`read()`, with whatever is wrong with the value a `CheckpointError` naming the field."""
    try:
        return read()
    except (ValueError, TypeError, KeyError) as err:  # ConfigError is a ValueError
        raise CheckpointError(f"{source}: field {name!r} is not valid: {err}") from None


def _contents(meta: Any, state: Any, source: Path, kind: str) -> CheckpointContents:
    """Check every part of a checkpoint, cheapest first, before anything is built from it."""
    if not isinstance(meta, dict) or any(key not in meta for key in REQUIRED):
        raise CheckpointError(
            f"{source}: not a captioner checkpoint (it lacks {', '.join(REQUIRED)}); {HELP}."
        )
    # the architecture alone: every weight is in the file, nothing is downloaded or read
    config = _field(
        source, "config", lambda: CaptionerConfig.from_dict(meta["config"]).without_downloads()
    )
    tokenizer = _field(source, "tokenizer", lambda: Tokenizer.from_dict(meta["tokenizer"]))
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(
            f"{source}: field 'tokenizer' holds {len(tokenizer)} words but config.vocab_size is "
            f"{config.vocab_size}; the checkpoint is inconsistent."
        )
    preprocess = _field(source, "preprocess", lambda: ImagePreprocess.from_dict(meta["preprocess"]))
    channels = config.encoder.in_channels
    if preprocess.image_size != config.image_size or len(preprocess.mean) != channels:
        raise CheckpointError(
            f"{source}: field 'preprocess' ({list(preprocess.image_size)} px, "
            f"{len(preprocess.mean)} channels) does not match the encoder's image_size "
            f"{list(config.image_size)} and in_channels {channels}."
        )
    data = meta.get("data")
    if data is not None:
        _field(source, "data", lambda: check_record(data))
    objective = meta.get("objective", "cross_entropy")  # older checkpoints: cross-entropy
    if objective not in OBJECTIVES:
        raise CheckpointError(
            f"{source}: field 'objective' must be one of {', '.join(OBJECTIVES)}, got "
            f"{short(objective)}."
        )
    _check_weights(config, state, source)
    return CheckpointContents(
        source, kind, config, tokenizer.to_dict(), preprocess.to_dict(), state, data, objective
    )


def _check_weights(config: CaptionerConfig, state: Any, source: Path) -> None:
    """The weights fit the architecture the checkpoint records, every one a finite float.

    The model is built on the `meta` device, which allocates nothing, after the block counts
    are checked against the stored names (a forged depth would build millions of modules):
    a checkpoint cannot make loading allocate more than it stores.
    """
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{source}: its weights are not a mapping of names to tensors.")
    for stack in ("encoder", "decoder") if config.encoder.kind == "vit" else ("decoder",):
        found = {int(m[1]) for k in state if (m := re.match(rf"{stack}\.blocks\.(\d{{1,9}})\.", k))}
        depth = getattr(config, stack).depth
        if found != set(range(depth)):
            raise CheckpointError(
                f"{source}: field 'config': {stack}.depth is {depth} but the weights hold "
                f"{len(found)} {stack} blocks; the checkpoint is inconsistent."
            )
    for name, tensor in state.items():
        counter = name.endswith(".num_batches_tracked") and tensor.dtype == torch.int64
        if (tensor.dtype not in WEIGHT_DTYPES and not counter) or tensor.layout != torch.strided:
            raise CheckpointError(
                f"{source}: weight {name} holds {tensor.dtype} values ({tensor.layout}); "
                f"weights are dense floats ({', '.join(map(str, WEIGHT_DTYPES))}), batch-norm "
                "counters int64."
            )
        if tensor.device.type != "cpu":  # a meta tensor holds no values
            raise CheckpointError(f"{source}: weight {name} holds no values ({tensor.device}).")
        if tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
            raise CheckpointError(  # an expanded view: a few bytes claiming gigabytes
                f"{source}: weight {name} stores fewer values than its shape "
                f"{list(tensor.shape)} holds."
            )
    try:
        with torch.device("meta"):
            model = CaptionerModel(config)
    except (RuntimeError, TypeError, ValueError, OverflowError) as err:  # sizes beyond int64
        raise CheckpointError(
            f"{source}: field 'config' describes a model that cannot be built "
            f"({first_line(err, with_type=True)}); the checkpoint is inconsistent."
        ) from None
    tied = tied_names(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - tied)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: its weights do not fit the architecture it records (missing: "
            f"{missing[:5]}, unexpected: {unexpected[:5]}); {HELP}."
        )
    for name, tensor in state.items():
        want = expected.get(name, model.get_parameter(name) if name in tied else None)
        if want is not None and tensor.shape != want.shape:
            raise CheckpointError(
                f"{source}: weight {name} has shape {list(tensor.shape)} but the architecture "
                f"it records needs {list(want.shape)} (field 'config' and the weights disagree)."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{source}: weight {name} holds NaN or infinite values: the model diverged or "
                "the file is damaged; use an earlier checkpoint."
            )
    stored = sum(t.numel() for t in state.values())
    derived = sum(b.numel() for k, b in model.named_buffers() if k not in expected)
    if derived > max(stored, 1 << 20):
        raise CheckpointError(
            f"{source}: field 'config': image_size {list(config.image_size)} with the "
            f"encoder's patch size {model.encoder.patch_size} would allocate {derived:,} values "
            f"beside {stored:,} stored."
        )


def _from_lightning(ckpt: dict[str, Any], path: Path) -> CheckpointContents:
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict); {HELP}.")
    weights = {
        name.removeprefix("net."): tensor
        for name, tensor in state.items()
        if isinstance(name, str) and name.startswith("net.")
    }
    return _contents(ckpt.get("captioner"), weights, path, "lightning")


def _load_export(weights: Path) -> CheckpointContents:
    config = weights.with_name(CONFIG_NAME)
    for needed in (weights, config):
        if not needed.is_file():
            raise CheckpointError(
                f"{needed}: missing; an export folder holds {WEIGHTS_NAME} and {CONFIG_NAME}."
            )
    try:  # a key named twice is refused, not read last-wins
        meta = loads_unique(config.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # invalid JSON or UTF-8, huge numbers, depth
        raise CheckpointError(
            f"{config}: not valid JSON ({first_line(err, with_type=True)})."
        ) from None
    version = meta.get("format_version") if isinstance(meta, dict) else FORMAT_VERSION
    if is_int(version) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config}: format_version {version} was written by a newer captioner (this one "
            f"reads {FORMAT_VERSION}): upgrade captioner."
        )
    if version != FORMAT_VERSION or not is_int(version):
        raise CheckpointError(
            f"{config}: field 'format_version' must be {FORMAT_VERSION}, got {short(version)}."
        )
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err}).") from None
    return _contents(meta, state, weights, "export")


def resolve_checkpoint(path: str | Path) -> tuple[Path, str | None]:
    """The file or export folder that `path` stands for, and a one-line note naming the file
    read when that is not `path` itself (else None), for the caller to show: a training run
    folder, or its `checkpoints/` folder, stands for its `last.ckpt`, the checkpoint training
    resumes from. Anything else is returned as given, for the reader to judge; a folder that is
    neither an export nor a run is a `CheckpointError` naming what was looked for."""
    path = Path(path)
    if not path.is_dir() or any((path / name).exists() for name in (WEIGHTS_NAME, CONFIG_NAME)):
        return path, None  # a file, a missing path or an export folder: read as it is
    for last, kind in ((path / LAST, "training run"), (path / LAST.name, "checkpoint")):
        if last.is_file():
            return last, f"{path} is a {kind} folder: reading {last}"
    held = sorted(p.relative_to(path) for p in (*path.glob("*.ckpt"), *path.glob("*/*.ckpt")))
    found = f" (it holds {', '.join(map(str, held[:3]))}: give one as a file)" if held else ""
    raise CheckpointError(
        f"{path}: neither a training run folder (no {LAST}) nor an export folder (no "
        f"{WEIGHTS_NAME}){found}; give a run folder or .ckpt of scripts/train.py, or a folder "
        "of scripts/export.py."
    )


def load_checkpoint(path: str | Path) -> CheckpointContents:
    """Read a `.ckpt` file, a training run folder (its `checkpoints/last.ckpt`, logged), an
    export folder or its `model.safetensors`; nothing in it runs."""
    path, note = resolve_checkpoint(path)
    if note is not None:
        log.info(note)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file, run folder or export folder.")
    if path.is_dir():
        return _load_export(path / WEIGHTS_NAME)
    if path.suffix == ".safetensors" or (path.is_file() and is_safetensors(head_bytes(path))):
        return _load_export(path)
    return _from_lightning(read_torch_checkpoint(path), path)


def load_trusted_pickle(path: str | Path) -> CheckpointContents:
    """The one place that unpickles arbitrary objects (a load not limited to weights): for a `.ckpt`
    that a safe load refuses and that the user trusts, e.g. one of their own written by other
    code. Unpickling it can run any code it holds. What it yields is checked as any
    checkpoint is, so that `export` can rewrite it in the pickle-free format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({first_line(err, with_type=True)})."
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(ckpt).__name__}).")
    return _from_lightning(ckpt, path)
