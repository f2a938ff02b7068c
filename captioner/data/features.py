"""A frozen image encoder's outputs for one data split, stored on disk once.

With a frozen encoder, every epoch decodes the same images and runs the same forward pass to
get the same patch tokens. Storing those tokens once lets training read features instead:
no JPEG decoding, no encoder on the GPU. The store is a folder of plain numpy memmaps, so any
number of DataLoader workers read it without copying it into memory.

The folder is tied to a key (backbone, encoder weights hash, preprocessing, split and size,
chosen by the caller): a store built for another key is rebuilt, never silently reused. A build
that is killed resumes where it stopped, because progress is recorded only after the rows it
counts are on disk. This module gets the encoder as a callable and never imports the models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner.core.files import write_text

log = logging.getLogger(__name__)

DTYPE = "float16"  # half the disk of fp32, and what the GPU reads under mixed precision anyway
KEY_FILE = "key.json"
FEATURES_FILE = "features.f16"
VALID_FILE = "valid.u8"
PROGRESS_FILE = "progress.json"
COMPLETE_FILE = "complete"
# `complete` goes first: once it is gone, no reader takes the folder for a finished store
_STORE_FILES = (COMPLETE_FILE, PROGRESS_FILE, FEATURES_FILE, VALID_FILE, KEY_FILE)

Encode = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def _canonical(value: Any) -> str:
    """One JSON text per value, so two keys compare equal exactly when their JSON does."""
    return json.dumps(value, sort_keys=True)


class FeatureStore:
    """The encoder features of one split: `rows` images, each `tokens` × `dim` float16 values
    and a flag saying whether the image could be read (a bad image keeps its row, flagged 0, so
    row numbers stay the dataset's indices).

    Rank 0 builds it with `ensure(encode)`, the other ranks wait with `ensure(..., writer=False)`,
    and datasets call `read(rows)`. The object pickles without its open memmaps, so it is cheap
    to send to DataLoader workers, which open the files again on their first read.
    """

    def __init__(
        self, folder: Path | str, key: dict[str, Any], rows: int, tokens: int, dim: int
    ) -> None:
        for name, value in (("rows", rows), ("tokens", tokens), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"FeatureStore {name} must be an integer >= 1, got {value!r}")
        self.folder = Path(folder)
        self.key = key
        self.rows, self.tokens, self.dim = int(rows), int(tokens), int(dim)
        # what key.json holds; json.dumps raises here, not mid-build, if the key is not JSON
        self._description = {
            "key": key,
            "rows": self.rows,
            "tokens": self.tokens,
            "dim": self.dim,
            "dtype": DTYPE,
        }
        self._canonical = _canonical(self._description)
        self._digest = hashlib.sha256(self._canonical.encode()).hexdigest()
        self._features: np.memmap | None = None
        self._valid: np.memmap | None = None

    def __repr__(self) -> str:
        shape = f"rows={self.rows}, tokens={self.tokens}, dim={self.dim}"
        return f"FeatureStore({str(self.folder)!r}, {shape})"

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the open memmaps: a worker process opens its own on its first read."""
        state = self.__dict__.copy()
        state["_features"] = None
        state["_valid"] = None
        return state

    # --- state on disk -----------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.folder / name

    def _stored_description(self) -> Any | None:
        """What key.json holds, or None when it is missing or unreadable."""
        try:
            return json.loads(self._path(KEY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _same_key(self) -> bool:
        stored = self._stored_description()
        return stored is not None and _canonical(stored) == self._canonical

    @property
    def complete(self) -> bool:
        """Whether the folder holds a finished store whose key.json equals this key.

        The `complete` marker holds a hash of the key it was written for, so a marker left by
        an older build never vouches for a key.json that a rebuild has since rewritten.
        """
        try:
            marker = self._path(COMPLETE_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            return False
        return marker == self._digest and self._same_key()

    def nbytes_per_row(self) -> int:
        """Disk bytes per image (features and valid flag), to size a store before building it."""
        return self.tokens * self.dim * np.dtype(DTYPE).itemsize + 1

    def _changes(self, stored: Any) -> list[str]:
        """The top-level entries (of the key, and the shape) in which `stored` differs."""
        if not isinstance(stored, dict):
            return ["key.json (unreadable)"]
        old_key = stored.get("key")
        if not isinstance(old_key, dict):
            changed = ["key"]
        else:
            changed = [
                f"key[{name!r}]"
                for name in sorted(set(old_key) | set(self.key), key=str)
                if _canonical(old_key.get(name)) != _canonical(self.key.get(name))
                or (name in old_key) != (name in self.key)
            ]
        for name in ("rows", "tokens", "dim", "dtype"):
            if stored.get(name) != self._description[name]:
                changed.append(name)
        return changed or ["key.json (formatting)"]

    def _delete(self) -> None:
        for name in _STORE_FILES:
            self._path(name).unlink(missing_ok=True)

    def _memmaps(self, mode: str) -> tuple[np.memmap, np.memmap]:
        features = np.memmap(
            self._path(FEATURES_FILE),
            dtype=DTYPE,
            mode=mode,
            shape=(self.rows, self.tokens, self.dim),
        )
        valid = np.memmap(self._path(VALID_FILE), dtype=np.uint8, mode=mode, shape=(self.rows,))
        return features, valid

    def _resume_point(self) -> int | None:
        """Rows already on disk for this key, or None when the partial build is unusable."""
        try:
            done = json.loads(self._path(PROGRESS_FILE).read_text(encoding="utf-8"))["rows_done"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        sizes = {
            FEATURES_FILE: self.rows * self.tokens * self.dim * np.dtype(DTYPE).itemsize,
            VALID_FILE: self.rows,
        }
        for name, size in sizes.items():
            path = self._path(name)
            if not path.is_file() or path.stat().st_size != size:
                return None
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= self.rows:
            return None
        return done

    # --- building ----------------------------------------------------------------------------

    def ensure(
        self,
        encode: Encode,
        chunk_rows: int = 256,
        writer: bool = True,
        poll_seconds: float = 1.0,
    ) -> None:
        """Make sure the folder holds this key's finished store.

        The writer (rank 0) reuses a finished store, resumes a partial one built for the same
        key, and rebuilds one built for another key. `encode(start, stop)` returns the features
        of rows start..stop-1 as a (stop-start, tokens, dim) float array and their valid flags
        as a (stop-start,) bool array. Other ranks pass `writer=False` and wait for the writer,
        also while the folder still holds a finished store for another key (it is being
        rebuilt).
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self._features = self._valid = None  # a rebuild invalidates what this object had open
        if not writer:
            self._wait(poll_seconds)
            return
        if self.complete:
            log.info("using cached features in %s", self.folder)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = self._stored_description()
        start = None
        if self._path(KEY_FILE).exists() and (
            stored is None or _canonical(stored) != self._canonical
        ):
            log.warning(
                "features in %s were built for another key (changed: %s): rebuilding",
                self.folder,
                ", ".join(self._changes(stored)),
            )
        elif stored is not None:
            start = self._resume_point()
            if start is not None:
                log.info("resuming features in %s from row %d of %d", self.folder, start, self.rows)
        if start is None:
            self._delete()
            write_text(self._path(KEY_FILE), json.dumps(self._description, indent=2))
            features, valid = self._memmaps("w+")
            start = 0
        else:
            self._path(COMPLETE_FILE).unlink(missing_ok=True)  # a marker for another key
            features, valid = self._memmaps("r+")
        try:
            self._build(encode, features, valid, start, chunk_rows)
        finally:
            del features, valid  # unmap before anyone reads the files
        write_text(self._path(COMPLETE_FILE), self._digest + "\n")
        log.info("features in %s complete", self.folder)

    def _build(
        self, encode: Encode, features: np.memmap, valid: np.memmap, start: int, chunk_rows: int
    ) -> None:
        if start == 0:
            log.info(
                "encoding %d rows into %s (%.2f GiB)",
                self.rows,
                self.folder,
                self.rows * self.nbytes_per_row() / 2**30,
            )
        began, first = time.monotonic(), start
        tenth = start * 10 // self.rows
        for lo in range(start, self.rows, chunk_rows):
            hi = min(lo + chunk_rows, self.rows)
            chunk, flags = self._checked(encode(lo, hi), lo, hi)
            features[lo:hi] = chunk
            valid[lo:hi] = flags
            features.flush()
            valid.flush()
            # only now, with the rows on disk, may progress count them
            write_text(self._path(PROGRESS_FILE), json.dumps({"rows_done": hi}))
            if hi * 10 // self.rows > tenth or hi == self.rows:
                tenth = hi * 10 // self.rows
                elapsed = time.monotonic() - began
                log.info(
                    "features %d/%d rows (%d%%), %.0f rows/s",
                    hi,
                    self.rows,
                    100 * hi // self.rows,
                    (hi - first) / elapsed if elapsed > 0 else float("inf"),
                )

    def _checked(self, output: Any, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """`encode`'s output for rows lo..hi-1 as float16 features and uint8 flags, or a
        ValueError that names the shape expected."""
        try:
            features, valid = output
        except (TypeError, ValueError):
            raise ValueError(
                f"encode({lo}, {hi}) must return (features, valid), got {type(output).__name__}"
            ) from None
        features, valid = np.asarray(features), np.asarray(valid)
        expected = (hi - lo, self.tokens, self.dim)
        if features.shape != expected:
            raise ValueError(
                f"encode({lo}, {hi}) returned features of shape {features.shape}, "
                f"expected {expected} (rows, tokens, dim)"
            )
        if features.dtype.kind != "f":
            raise ValueError(
                f"encode({lo}, {hi}) returned features of dtype {features.dtype}, expected floats"
            )
        if valid.shape != (hi - lo,):
            raise ValueError(
                f"encode({lo}, {hi}) returned valid flags of shape {valid.shape}, "
                f"expected {(hi - lo,)}"
            )
        with np.errstate(over="ignore"):  # overflow is reported below, naming the row
            half = features.astype(DTYPE)
        flags = valid.astype(bool)
        # fp16 overflows above 65504: an inf stored here would poison every epoch that reads it
        finite = np.isfinite(half).reshape(hi - lo, -1).all(axis=1)
        bad = np.flatnonzero(flags & ~finite)
        if bad.size:
            raise ValueError(
                f"encode({lo}, {hi}) returned non-finite features (after the cast to float16) "
                f"for row {lo + int(bad[0])}"
            )
        return half, flags.astype(np.uint8)

    def _wait(self, poll_seconds: float) -> None:
        """Sleep until the writer has finished this key's store."""
        waiting = False
        while not self.complete:
            if not waiting:
                log.info("waiting for rank 0 to build the features in %s", self.folder)
                waiting = True
            time.sleep(poll_seconds)
        if not waiting:
            log.info("using cached features in %s", self.folder)

    # --- reading -----------------------------------------------------------------------------

    def read(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The features, (n, tokens, dim) float16, and valid flags, (n,) bool, of `rows` (in
        that order, repeats allowed), copied out of the files, which each process opens
        read-only on its first call."""
        if self._features is None or self._valid is None:
            if not self.complete:
                raise RuntimeError(
                    f"the feature store in {self.folder} is not complete (or was built for "
                    "another key): call ensure() first"
                )
            self._features, self._valid = self._memmaps("r")
        index = np.asarray(rows, dtype=np.int64).reshape(-1)
        features = np.asarray(self._features[index])  # (n, tokens, dim), a copy: fancy indexing
        valid = self._valid[index].astype(bool)  # (n,)
        return features, valid
