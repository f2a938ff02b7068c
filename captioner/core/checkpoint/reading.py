"""Reading a `.ckpt` without running anything in it.

`torch.load(weights_only=True)` refuses any pickled object other than tensors and plain values;
around it, a file is first told apart from an image or a document named `.ckpt` by mistake,
its archive and the nesting of its pickles are checked (read from the opcodes, never run), and
the callback state Lightning would act on (files it later deletes) must stay inside the
checkpoint's own folder. `captioner.training.checkpoint_io` reads resumed checkpoints through
`read_torch_checkpoint` too.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from captioner.core.errors import CheckpointError, UnsafeCheckpointError, first_line
from captioner.core.values import short

HELP = "use a .ckpt written by scripts/train.py or a folder written by scripts/export.py"
_PATH_KEYS = ("best_model_path", "last_model_path", "kth_best_model_path")
MAX_NESTING = 100  # levels of containers in a checkpoint's pickle (Lightning's: about ten)
MAX_PICKLE_BYTES = 1 << 30  # the pickle of a checkpoint (not its tensors): far below this
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


def _what_is(path: Path) -> str | None:
    """What a file that cannot be a checkpoint is; None for a zip archive or a pickle (what
    `torch.save` writes) and for safetensors."""
    with path.open("rb") as file:
        head = file.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or is_safetensors(head):
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


def is_safetensors(head: bytes) -> bool:
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
        raise CheckpointError(f"{path}: not a checkpoint: it is {kind}; {HELP}.")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        if not names:
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({first_line(err, with_type=True)})."
            ) from None
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it would import {', '.join(names)}, and unpickling such "
            "objects can run any code. Checkpoints from scripts/train.py hold only tensors and "
            "plain values. Only if you trust where the file came from: python scripts/export.py "
            f"--ckpt {path} --out DIR --trust-pickle rewrites it as a pickle-free export folder."
        ) from None
    except Exception as err:  # a damaged file fails anywhere inside the unpickler
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({first_line(err, with_type=True)}); "
            "is the file complete?"
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
    if head_bytes(path)[:1] == b"\x80":
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
            f"{path}: not a readable PyTorch checkpoint ({first_line(err, with_type=True)}); "
            "is the file complete?"
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


def head_bytes(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(16)


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
