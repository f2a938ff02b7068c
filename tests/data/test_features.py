"""The feature store: it keeps what the encoder returned, reuses it only for the same key,
resumes a killed build without recomputing rows, lets other ranks wait, and pickles cheaply."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from captioner.data.features import FeatureStore

ROWS, TOKENS, DIM = 10, 3, 4
KEY = {"backbone": "tiny", "weights": "aaaa", "preprocess": {"size": 32}, "split": "val"}


class Encoder:
    """A stand-in encoder: fixed random features per row (seeded), row 3 a bad image, and a
    record of every row it was asked for. `fail_after` chunks, it raises, like a killed job."""

    def __init__(self, seed: int = 0, fail_after: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.features = rng.standard_normal((ROWS, TOKENS, DIM)).astype(np.float32)
        self.valid = np.ones(ROWS, dtype=bool)
        self.valid[3] = False
        self.fail_after = fail_after
        self.rows: list[int] = []
        self.calls = 0

    def __call__(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if self.fail_after is not None and self.calls == self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.rows.extend(range(start, stop))
        return self.features[start:stop], self.valid[start:stop]


def store(folder: Path, **key: str) -> FeatureStore:
    return FeatureStore(folder, {**KEY, **key}, ROWS, TOKENS, DIM)


def test_build_stores_what_encode_returned_and_is_reused(tmp_path: Path) -> None:
    encode = Encoder()
    features = store(tmp_path / "f")
    features.ensure(encode, chunk_rows=4)
    assert features.complete
    assert encode.rows == list(range(ROWS))  # every row once, in chunks of at most 4
    rows = [7, 0, 3, 7, 9, 1]  # out of order, repeated, with the bad image
    got, valid = features.read(rows)
    assert got.dtype == np.float16 and got.shape == (len(rows), TOKENS, DIM)
    np.testing.assert_array_equal(got, encode.features[rows].astype(np.float16))
    assert valid.dtype == np.bool_
    np.testing.assert_array_equal(valid, encode.valid[rows])
    assert features.nbytes_per_row() == TOKENS * DIM * 2 + 1

    again = Encoder()
    store(tmp_path / "f").ensure(again, chunk_rows=4)
    assert again.calls == 0


def test_a_new_key_rebuilds_every_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store(tmp_path, weights="aaaa").ensure(Encoder(seed=0), chunk_rows=4)
    new = Encoder(seed=1)
    rebuilt = store(tmp_path, weights="bbbb")
    assert not rebuilt.complete
    with caplog.at_level(logging.WARNING, logger="captioner.data.features"):
        rebuilt.ensure(new, chunk_rows=4)
    assert "'weights'" in caplog.text and "'backbone'" not in caplog.text  # names what changed
    assert new.rows == list(range(ROWS))
    got, _ = rebuilt.read(range(ROWS))
    np.testing.assert_array_equal(got, new.features.astype(np.float16))
    assert not store(tmp_path, weights="aaaa").complete  # the old key's store is gone


def test_a_new_shape_rebuilds(tmp_path: Path) -> None:
    store(tmp_path).ensure(Encoder(), chunk_rows=4)
    shorter = FeatureStore(tmp_path, KEY, ROWS - 2, TOKENS, DIM)
    assert not shorter.complete
    encode = Encoder()
    shorter.ensure(encode, chunk_rows=4)
    assert encode.rows == list(range(ROWS - 2))


def test_a_killed_build_resumes_without_recomputing(tmp_path: Path) -> None:
    killed = store(tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="killed"):
        killed.ensure(Encoder(fail_after=2), chunk_rows=3)
    assert not killed.complete
    with pytest.raises(RuntimeError, match="resumed"):
        killed.read([0])

    rest = Encoder()
    store(tmp_path / "resumed").ensure(rest, chunk_rows=3)
    assert rest.rows == list(range(6, ROWS))  # two chunks of 3 were done

    whole = store(tmp_path / "whole")
    whole.ensure(Encoder(), chunk_rows=ROWS)
    for name in ("features.f16", "valid.u8", "key.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (
            tmp_path / "whole" / name
        ).read_bytes()
    resumed_rows = store(tmp_path / "resumed").read(range(ROWS))
    whole_rows = whole.read(range(ROWS))
    for resumed_part, whole_part in zip(resumed_rows, whole_rows, strict=True):
        np.testing.assert_array_equal(resumed_part, whole_part)


def test_a_non_writer_waits_for_the_writer(tmp_path: Path) -> None:
    # a finished store for another key is there: the reader must wait for the rebuild
    store(tmp_path, weights="old").ensure(Encoder(seed=1), chunk_rows=ROWS)
    reader = store(tmp_path)
    reader_done = threading.Event()

    def wait() -> None:
        reader.ensure(Encoder(), writer=False, poll_seconds=0.01)
        reader_done.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive() and not reader_done.is_set()

    encode = Encoder()
    waited_during_build: list[bool] = []

    def writer_encode(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(0.02)  # several polls of the reader fall inside the build
        waited_during_build.append(not reader_done.is_set())
        return encode(start, stop)

    store(tmp_path).ensure(writer_encode, chunk_rows=4)
    assert waited_during_build == [True, True, True]
    thread.join(timeout=10)
    assert reader_done.is_set()
    got, _ = reader.read([2, 5])
    np.testing.assert_array_equal(got, encode.features[[2, 5]].astype(np.float16))


def test_the_store_pickles_without_its_memmaps(tmp_path: Path) -> None:
    features = store(tmp_path)
    features.ensure(Encoder(), chunk_rows=4)
    unopened = len(pickle.dumps(features))
    rows = [4, 4, 0, 3]
    before = features.read(rows)  # opens the memmaps
    blob = pickle.dumps(features)
    assert len(blob) == unopened  # the open memmaps (and their data) stay behind
    copy = pickle.loads(blob)
    after = copy.read(rows)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_use_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=str(tmp_path / "never")):
        store(tmp_path / "never").read([0])

    def wrong(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((stop - start, TOKENS, DIM + 1)), np.ones(stop - start, dtype=bool)

    with pytest.raises(ValueError, match=r"\(4, 3, 4\)"):
        store(tmp_path / "wrong").ensure(wrong, chunk_rows=4)

    def no_flags(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((stop - start, TOKENS, DIM)), np.ones(stop - start + 1, dtype=bool)

    with pytest.raises(ValueError, match=r"\(4,\)"):
        store(tmp_path / "flags").ensure(no_flags, chunk_rows=4)

    def overflow(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((stop - start, TOKENS, DIM), 1e6), np.ones(stop - start, dtype=bool)

    with pytest.raises(ValueError, match="non-finite"):
        store(tmp_path / "overflow").ensure(overflow, chunk_rows=4)

    for shape in ((0, TOKENS, DIM), (ROWS, 0, DIM), (ROWS, TOKENS, 0)):
        with pytest.raises(ValueError, match=">= 1"):
            FeatureStore(tmp_path, KEY, *shape)
