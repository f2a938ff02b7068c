"""What is built from the training data is cached beside it, under a key of its content: read
back while the data is the same, rebuilt when it changes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from captioner.core.tokenizer import Tokenizer
from captioner.data import CocoDataModule
from tests.helpers import (
    write_coco,
)


def coco_module(paths: dict, **changes) -> CocoDataModule:
    values = dict(image_size=32, batch_size=4, num_workers=0, min_freq=1)
    values.update(changes)
    return CocoDataModule(**{k: str(v) for k, v in paths.items()}, **values)


def test_vocabulary_is_cached_next_to_the_data_and_rebuilt_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_coco(tmp_path)
    built = coco_module(paths).tokenizer
    caches = sorted(tmp_path.glob("captions_train.json.vocab-*.json"))
    assert len(caches) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("the cached vocabulary should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(Tokenizer, "build", no_build)
        assert coco_module(paths).tokenizer.itos == built.itos  # read back, not rebuilt
    assert coco_module(paths, min_freq=2).tokenizer.itos != built.itos  # tokenizer settings
    train = json.loads(paths["train_json"].read_text())
    train["annotations"][0]["caption"] = "an ostrich"
    paths["train_json"].write_text(json.dumps(train))
    assert "ostrich" in coco_module(paths).tokenizer.stoi  # the data changed: a new key
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(caches[0].stat().st_mode) == 0o666 & ~umask  # others may read it
    assert len(list(tmp_path.glob("captions_train.json.vocab-*.json"))) == 3
    latest = max(tmp_path.glob("captions_train.json.vocab-*.json"), key=lambda p: p.stat().st_mtime)
    expected = coco_module(paths).tokenizer.itos
    latest.write_text("{not json")  # damaged: rebuilt and rewritten, not fatal
    assert coco_module(paths).tokenizer.itos == expected
    assert json.loads(latest.read_text())["itos"] == expected
