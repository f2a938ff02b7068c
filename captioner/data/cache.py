"""What is built from the training data (the vocabulary, CIDEr-D statistics), cached next to
the data it was built from, under a key of the data's content (`data_key`, which the feature
stores' key holds too).

Building it means reading every training caption (for web-scale shards, a pass over every
tar file), so it is done once and stored beside the data in a file whose name carries a key.
The key hashes the tokenizer settings and the identity of the training data, so editing an
annotation file, adding a shard or changing `data.min_freq` builds a new vocabulary instead of
silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from captioner.core.files import hash_file, write_text
from captioner.core.tokenizer import Tokenizer

log = logging.getLogger(__name__)

T = TypeVar("T")


def data_key(sources: Sequence[Path], settings: dict[str, Any], read_contents: bool) -> str:
    """A hex key for these files and settings.

    With `read_contents` the files' bytes are hashed (annotation files: any edit changes the
    key); otherwise their size and modification time are (tar shards: too big to read twice).
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in sources:
        digest.update(str(path.resolve()).encode())
        if read_contents:
            hash_file(path, digest)
        else:
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_json(
    build: Callable[[], T],
    cache_file: Path,
    to_dict: Callable[[T], Any],
    from_dict: Callable[[Any], T],
    describe: Callable[[T], str],
) -> T:
    """The value stored in `cache_file`, or `build()` and store it there (as JSON).

    An unreadable cache is rebuilt; a folder that cannot be written only costs the cache.
    `describe` names the value in the log lines.
    """
    if cache_file.is_file():
        try:
            value = from_dict(json.loads(cache_file.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable cache %s (%s): rebuilding", cache_file, err)
        else:
            log.info("%s read from %s", describe(value), cache_file)
            return value
    value = build()
    try:  # a concurrent reader sees the old file or the new one, never half of one
        write_text(cache_file, json.dumps(to_dict(value)))
        log.info("%s cached in %s", describe(value), cache_file)
    except OSError as err:
        log.warning("could not cache %s next to the data (%s): continuing", describe(value), err)
    return value


def cached_tokenizer(build: Callable[[], Tokenizer], cache_file: Path) -> Tokenizer:
    """The tokenizer stored in `cache_file`, or `build()` and store it there."""
    return cached_json(
        build, cache_file, Tokenizer.to_dict, Tokenizer.from_dict,
        lambda tokenizer: f"vocabulary of {len(tokenizer)} words",
    )  # fmt: skip
