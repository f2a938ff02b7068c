"""Writing a file so that no reader ever sees half of it and nothing planted beside it is used.

Every file captioner writes goes through `AtomicFile`: the bytes go to a temporary file created
exclusively beside the target (a fresh random name, `O_EXCL | O_NOFOLLOW`, so a link planted
under a name the writer would use is never followed or overwritten), are flushed and synced,
get the mode of the file they replace (a new file gets the umask's usual 0o666 & ~umask, never
`mkstemp`'s 0600), and are renamed over the target in one step, the rename synced too. A write
that fails or is killed leaves the old file whole and, at worst, a `.<name>.<random>.tmp`
beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMPORARY_SUFFIX = ".tmp"  # a file being written: `.<name>.<random>.tmp` beside it


class AtomicFile:
    """A file being written in place of `path`: `open()` it, write, then `commit()` (rename it
    over `path`) or `discard()` it. Several can be committed together, so two files that
    belong together (weights and their description) are both whole before either replaces
    the old one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.temporary: Path | None = None

    def open(self, binary: bool = True) -> IO[Any]:
        """The temporary file, opened for writing; the target's folder is created if needed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TEMPORARY_SUFFIX
        )
        self.temporary = Path(name)
        return os.fdopen(
            handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        )

    def commit(self, file: IO[Any]) -> Path:
        """Sync and close `file`, give it the target's mode and rename it over the target."""
        assert self.temporary is not None, "open() first"
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.chmod(self.temporary, _mode_for(self.path))
        os.replace(self.temporary, self.path)
        self.temporary = None
        _sync_folder(self.path.parent)
        return self.path

    def discard(self) -> None:
        if self.temporary is not None:
            self.temporary.unlink(missing_ok=True)
            self.temporary = None


@contextlib.contextmanager
def atomic_write(path: str | Path, binary: bool = True) -> Iterator[IO[Any]]:
    """`with atomic_write(path) as file: ...`: `path` holds what was written once the block
    ends, or, if it raises, what it held before."""
    target = AtomicFile(path)
    file = target.open(binary)
    try:
        yield file
        target.commit(file)
    finally:
        file.close()
        target.discard()


def write_text(path: str | Path, text: str) -> Path:
    """`path` atomically holding `text` (UTF-8); returns `path`."""
    with atomic_write(path, binary=False) as file:
        file.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """`path` atomically holding `data`; returns `path`."""
    with atomic_write(path) as file:
        file.write(data)
    return Path(path)


def hash_file(path: str | Path, digest: Any = None) -> Any:
    """`digest` (a new sha256 by default) fed the file's bytes, read in blocks: checkpoints and
    annotation files can be gigabytes."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest


def _mode_for(path: Path) -> int:
    """The permission bits of the regular file at `path` (a link there is replaced, never
    followed), else those `open()` gives a new file: 0o666 less the umask."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    if found is not None and stat.S_ISREG(found.st_mode):
        return stat.S_IMODE(found.st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _sync_folder(folder: Path) -> None:
    """The rename itself survives a power cut (where the system lets a folder be synced)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
