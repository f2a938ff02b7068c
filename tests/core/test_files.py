"""The one atomic writer: a reader sees the old file or the new one, a planted link is never
followed, a file keeps its mode, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from captioner.core.checkpoint import export, load_checkpoint
from captioner.core.files import AtomicFile, atomic_write, hash_file, write_bytes, write_text
from captioner.data.features import FeatureStore


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_write_replaces_the_file_whole_and_keeps_its_mode(tmp_path: Path) -> None:
    path = write_text(tmp_path / "sub" / "a.json", "first")  # the folder is made
    assert path.read_text() == "first"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as open() makes a new file
    path.chmod(0o640)
    write_bytes(path, b"second")
    assert path.read_bytes() == b"second" and path.stat().st_mode & 0o777 == 0o640
    assert os.listdir(path.parent) == ["a.json"]  # no temporary left beside it


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError, match="killed"), atomic_write(path, binary=False) as file:
        file.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_a_link_at_the_target_is_replaced_never_written_through(tmp_path: Path) -> None:
    victim = write_text(tmp_path / "victim", "keep me")
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    write_text(link, "new")
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "new"
    assert link.stat().st_mode & 0o777 == 0o666 & ~_umask()  # a link's mode is not kept


def test_files_written_together_are_both_whole_before_either_replaces_the_old(
    tmp_path: Path,
) -> None:
    a, b = AtomicFile(tmp_path / "a"), AtomicFile(tmp_path / "b")
    files = [a.open(), b.open()]
    files[0].write(b"A")
    files[1].write(b"B")
    assert not (tmp_path / "a").exists()  # nothing is in place until committed
    a.commit(files[0])
    b.commit(files[1])
    assert (tmp_path / "a").read_bytes() == b"A" and (tmp_path / "b").read_bytes() == b"B"


def test_hash_file_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 << 20)  # over several read blocks
    path = write_bytes(tmp_path / "blob", data)
    assert hash_file(path).hexdigest() == hashlib.sha256(data).hexdigest()


def test_export_never_writes_through_a_planted_temporary(trained_run: Path, tmp_path: Path) -> None:
    """Earlier exports wrote to the fixed `.captioner.json.tmp` (and `.model.safetensors.tmp`)
    beside the target: a link planted there sent the write to any file the user could write."""
    folder = tmp_path / "export"
    folder.mkdir()
    victim = write_text(tmp_path / "victim", "keep me")
    for name in (".captioner.json.tmp", ".model.safetensors.tmp"):
        (folder / name).symlink_to(victim)
    export(load_checkpoint(trained_run), folder)
    assert victim.read_text() == "keep me"
    assert json.loads((folder / "captioner.json").read_text())["format_version"] == 1
    load_checkpoint(folder)  # the export is whole and readable


def test_a_feature_store_never_writes_through_a_planted_temporary(tmp_path: Path) -> None:
    """Earlier stores wrote `<file>.<pid>.tmp` beside each of their JSON files: a name anyone
    sharing the folder could guess and plant a link under."""
    folder = tmp_path / "store"
    folder.mkdir()
    victim = write_text(tmp_path / "victim", "keep me")
    for name in ("key.json", "progress.json", "complete"):
        (folder / f"{name}.{os.getpid()}.tmp").symlink_to(victim)
    store = FeatureStore(folder, {"encoder": "e"}, rows=3, tokens=2, dim=4)

    def encode(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(stop - start, 2, 4).numpy(), torch.ones(stop - start).bool().numpy()

    store.ensure(encode, chunk_rows=2)
    assert victim.read_text() == "keep me" and store.complete
    assert store.read([0, 2])[0].shape == (2, 2, 4)
