"""Reading and exporting checkpoints: a checkpoint is data, and nothing in it ever runs.

Two formats hold everything a captioner needs (weights, architecture, vocabulary, image
preprocessing and the data config it was trained on):
- a Lightning `.ckpt` from `scripts/train.py`, read with `torch.load(weights_only=True)`, which
  refuses any pickled object other than tensors and plain values;
- an export folder from `scripts/export.py`: `model.safetensors` (tensors only, no pickle) and
  `captioner.json`.

Whatever the format, every part is checked before anything is built from it: the file is a
checkpoint at all, the architecture's values have their types and fit the weights' shapes
(checked on a model built on the `meta` device, so a forged size allocates nothing), weights
are finite floating-point tensors, the vocabulary and preprocessing are well formed, and the
recorded data config names a known data kind with typed fields (`captioner.data.stored`).
Every failure is a `CheckpointError` naming the file and the field.

Wherever a checkpoint is expected, a training run folder stands for its `checkpoints/last.ckpt`
(`resolve_checkpoint`), and the file read is named, since a folder does not say which it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.data.datamodule import CaptionDataModule
from captioner.data.records import loads_unique
from captioner.data.stored import check_data_config, datamodule_from_record
from captioner.data.tokenizer import Tokenizer
from captioner.data.transforms import ImagePreprocess
from captioner.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from captioner.models import CaptionerConfig, CaptionerModel
from captioner.values import is_int, short

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "captioner.json"
FORMAT_VERSION = 1
LAST = Path("checkpoints", "last.ckpt")  # in a training run folder: the checkpoint to resume
REQUIRED = ("config", "tokenizer", "preprocess")
TEMPORARY_SUFFIX = ".tmp"  # a checkpoint being written: `.<name>.ckpt.<random>.tmp`
_PATH_KEYS = ("best_model_path", "last_model_path", "kth_best_model_path")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OBJECTIVES = ("cross_entropy", "self_critical")  # what a checkpoint was trained on
MAX_NESTING = 100  # levels of containers in a checkpoint's pickle (Lightning's: about ten)
MAX_PICKLE_BYTES = 1 << 30  # the pickle of a checkpoint (not its tensors): far below this
_HELP = "use a .ckpt written by scripts/train.py or a folder written by scripts/export.py"
# Leading bytes of files that get named `.ckpt` by mistake, to say what the file is instead.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP, WAV, AVI)"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x7fELF", "a program (ELF)"),
)


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
    objective: str = "cross_entropy"  # or "self_critical" (`captioner.scst`)

    def build_model(self) -> CaptionerModel:
        """The model with these weights, in eval mode; a library encoder's architecture only
        is built, its pretrained weights never fetched: every weight is here."""
        return self.load_into(CaptionerModel(self.config.without_downloads())).eval()

    def load_into(self, model: CaptionerModel) -> CaptionerModel:
        """Copy these weights into a model built from `self.config`; returns it."""
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        missing = sorted(set(missing) - _tied_names(model))  # tied weights are stored once
        if missing or unexpected:
            raise CheckpointError(
                f"{self.source}: its weights do not fit the model they are loaded into "
                f"(missing: {missing[:5]}, unexpected: {sorted(unexpected)[:5]}); {_HELP}."
            )
        return model

    def datamodule(self, **changes: Any) -> CaptionDataModule:
        """The data it was trained on, rebuilt from the recorded config (never instantiated
        from it), with `changes` applied."""
        if self.data is None:
            raise ConfigError(
                f"{self.source} does not record its data config: name one, e.g. data=shapes."
            )
        try:
            return datamodule_from_record(self.data, **changes)
        except ConfigError as err:
            raise CheckpointError(f"{self.source}: its recorded {err}") from None

    def metadata(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able values."""
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer,
            "preprocess": self.preprocess,
            "data": self.data,
            "objective": self.objective,
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
            f"{source}: not a captioner checkpoint (it lacks {', '.join(REQUIRED)}); {_HELP}."
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
        _field(source, "data", lambda: check_data_config(data))
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
            f"({_first_line(err)}); the checkpoint is inconsistent."
        ) from None
    tied = _tied_names(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - tied)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: its weights do not fit the architecture it records (missing: "
            f"{missing[:5]}, unexpected: {unexpected[:5]}); {_HELP}."
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


def _first_line(err: BaseException) -> str:
    line = next((line for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _what_is(path: Path) -> str | None:
    """What a file that cannot be a checkpoint is; None for a zip archive or a pickle (what
    `torch.save` writes) and for safetensors."""
    with path.open("rb") as file:
        head = file.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or _is_safetensors(head):
        return None
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a character cut at the end of `head` is still text
        text = head[: err.start].decode("utf-8") if err.start >= len(head) - 3 else "\0"
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return "a binary file of an unknown kind"
    return "JSON text" if text.lstrip()[:1] in ("{", "[") else "a text file"


def _is_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 9 and head[8:10] in (b'{"', b"{ ")


def read_torch_checkpoint(path: str | Path) -> dict[str, Any]:
    """A `.ckpt` as `torch.load(weights_only=True)` reads it: tensors and plain values only.

    Anything that is not such a checkpoint is a `CheckpointError` saying what the file is;
    a pickle that would import code is an `UnsafeCheckpointError` naming what it imports.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    if (kind := _what_is(path)) is not None:
        raise CheckpointError(f"{path}: not a checkpoint: it is {kind}; {_HELP}.")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        if not names:
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({_first_line(err)})."
            ) from None
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it would import {', '.join(names)}, and unpickling such "
            "objects can run any code. Checkpoints from scripts/train.py hold only tensors and "
            "plain values. Only if you trust where the file came from: python scripts/export.py "
            f"--ckpt {path} --out DIR --trust-pickle rewrites it as a pickle-free export folder."
        ) from None
    except Exception as err:  # a damaged file fails anywhere inside the unpickler
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(err)}); is the file complete?"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(ckpt).__name__}).")
    _check_callback_paths(ckpt, path)
    return ckpt


def _check_archive(path: Path) -> None:
    """A checkpoint is a zip archive (what `torch.save` and Lightning write), whose pickles
    nest their containers at most `MAX_NESTING` deep.

    The legacy format (a bare pickle) is refused: a zip archive appended to one makes a file
    that `torch.load` reads as the pickle and Lightning's loader for sharded strategies
    (which does not go through `SafeCheckpointIO`) reads as the archive, with an unsafe
    unpickler. The nesting is read from the pickle's opcodes without running them: torch's
    safe unpickler hashes nested tuples recursively in C, and a pickle nested a million deep
    crashes the process instead of raising an error.
    """
    if _head(path)[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: written in PyTorch's legacy format, which captioner does not read (a file "
            "can hide a second checkpoint behind it); re-save it in the current format: "
            "torch.save(torch.load(path, weights_only=True), new_path)."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".pkl"):
                    continue
                if info.file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError(f"{path}: {info.filename} is implausibly large.")
                depth = _nesting(archive.read(info))
                if depth > MAX_NESTING:
                    raise CheckpointError(
                        f"{path}: {info.filename} nests values over {MAX_NESTING} deep; a "
                        "checkpoint from scripts/train.py nests about ten."
                    )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(err)}); is the file complete?"
        ) from None


def _nesting(data: bytes) -> int:
    """How deep the containers a pickle builds nest, from its opcodes (never run), stopping
    as soon as it exceeds `MAX_NESTING`."""
    mark = -1  # on the stack: where a MARK opcode stands
    stack: list[int] = []  # the depth of each value the pickle would have built so far
    memo: dict[Any, int] = {}
    deepest = 0
    for opcode, arg, _ in pickletools.genops(data):
        name, before = opcode.name, opcode.stack_before
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else 1
            continue
        if name in ("GET", "BINGET", "LONG_BINGET", "MARK"):
            stack.append(memo.get(arg, 1) if name != "MARK" else mark)
            continue
        items = []
        if pickletools.markobject in before:  # pops everything above the last mark
            while stack and stack[-1] != mark:
                items.append(stack.pop())
            if stack:
                stack.pop()
            below = before.index(pickletools.markobject)
        else:
            below = len(before)
        under = [stack.pop() for _ in range(min(below, len(stack)))]
        if name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD") and under:
            container, items = under[-1], items + under[:-1]  # filled in place
            stack.append(max(container, 1 + max(items, default=0)))
        else:
            depth = 1 + max(items + under, default=0)
            stack.extend([depth] * len(opcode.stack_after))
        deepest = max(deepest, stack[-1] if stack else 0)
        if deepest > MAX_NESTING:
            break
    return deepest


def _from_lightning(ckpt: dict[str, Any], path: Path) -> CheckpointContents:
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict); {_HELP}.")
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
        raise CheckpointError(f"{config}: not valid JSON ({_first_line(err)}).") from None
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
    if path.suffix == ".safetensors" or (path.is_file() and _is_safetensors(_head(path))):
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
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(err)}).") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(ckpt).__name__}).")
    return _from_lightning(ckpt, path)


def _readable_as_usual(path: str | Path) -> None:
    """Give a file written through a private temporary the mode `open()` gives a new file
    (0o666 less the umask), so that whoever shares the folder can read it as any other."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _head(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(16)


def export(contents: CheckpointContents, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `model.safetensors` and `captioner.json` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    model = contents.build_model()
    tied = _tied_names(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    weights, config = out_dir / WEIGHTS_NAME, out_dir / CONFIG_NAME
    # both files written in full beside their places first, then renamed into them: a failed
    # write never leaves new weights beside an old vocabulary
    written = {p: p.with_name(f".{p.name}{TEMPORARY_SUFFIX}") for p in (weights, config)}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, written[weights], metadata={"format": "pt"})
        written[config].write_text(json.dumps(contents.metadata(), indent=2) + "\n")
        for path, temporary in written.items():
            _readable_as_usual(temporary)  # meant for sharing: safetensors writes 0600
            os.replace(temporary, path)
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"{out_dir}: the export cannot be written there ({err}).") from None
    finally:
        for temporary in written.values():
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
    return weights, config


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer, made safe.

    Reading (resuming, testing the best checkpoint) always goes through
    `read_torch_checkpoint`, whatever `weights_only` Lightning passes, and refuses a
    checkpoint whose callback state names files outside its own folder (Lightning deletes
    such recorded files when it replaces them).

    Writing is crash-safe: a checkpoint is written to a temporary file beside its destination,
    flushed to disk, then renamed over it in one step. A run killed mid-write (pre-emption, out
    of memory) leaves the previous `last.ckpt` whole, never a truncated file in its place, and
    a temporary file that `remove_stale_temporaries` clears at the next start. Lightning's own
    writer goes through the system's temporary folder, whose final move is a copy, not an
    atomic rename, when that folder is on another file system.
    """

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_torch_checkpoint(path)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX
        )
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            _readable_as_usual(temporary)  # not mkstemp's 0600
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)


def _check_callback_paths(checkpoint: dict[str, Any], source: Path) -> None:
    """Lightning's ModelCheckpoint restores the paths its state records when the state's
    `dirpath` (its own, when none is recorded) is its folder, and later deletes them, through
    fsspec when they name another file system: a state that records a path must record its
    folder, and each path must be a local file inside it."""
    callbacks = checkpoint.get("callbacks", {})
    if not isinstance(callbacks, dict):
        raise CheckpointError(f"{source}: its callback states are not a mapping.")
    for name, state in callbacks.items():
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{source}: the state of callback {short(name)} is not a mapping."
            )
        best = state.get("best_k_models") or {}
        if not isinstance(best, dict):
            raise CheckpointError(
                f"{source}: callback {short(name)}: best_k_models is not a mapping."
            )
        paths = [state.get(key) for key in _PATH_KEYS] + list(best)
        folder = state.get("dirpath")
        for path in paths:
            if path is None or path == "":  # nothing recorded
                continue
            if not (isinstance(folder, str) and isinstance(path, str) and _inside(path, folder)):
                raise CheckpointError(
                    f"{source}: the state of callback {short(name)} names {short(path)} outside "
                    f"its checkpoint folder {short(folder)}; the file was not written by training "
                    "as it is."
                )


def _inside(path: str, folder: str) -> bool:
    """`path` is a local file below `folder` (no fsspec protocol: `s3://`, `local://`, `a::b`),
    links followed (a link in the folder to elsewhere is elsewhere)."""
    local = all("://" not in p and "::" not in p for p in (path, folder))
    return local and Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what a writer killed mid-write left in `folder` (`.<name>.ckpt.*.tmp`);
    returns what was removed. Call before anything writes checkpoints there."""
    stale = sorted(folder.glob(f".*.ckpt.*{TEMPORARY_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
