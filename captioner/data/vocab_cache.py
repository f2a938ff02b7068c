"""The training vocabulary, cached next to the data it was built from.

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
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from captioner.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def data_key(sources: Sequence[Path], settings: dict[str, Any], read_contents: bool) -> str:
    """A hex key for these files and settings.

    With `read_contents` the files' bytes are hashed (annotation files: any edit changes the
    key); otherwise their size and modification time are (tar shards: too big to read twice).
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in sources:
        digest.update(str(path.resolve()).encode())
        if read_contents:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        else:
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_tokenizer(build: Callable[[], Tokenizer], cache_file: Path) -> Tokenizer:
    """The tokenizer stored in `cache_file`, or `build()` and store it there.

    An unreadable cache is rebuilt; a folder that cannot be written only costs the cache.
    """
    if cache_file.is_file():
        try:
            tokenizer = Tokenizer.from_dict(json.loads(cache_file.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable vocabulary cache %s (%s): rebuilding", cache_file, err)
        else:
            log.info("vocabulary of %d words read from %s", len(tokenizer), cache_file)
            return tokenizer
    tokenizer = build()
    tmp = None
    try:  # write then rename, so a concurrent reader never sees half a file
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(tokenizer.to_dict(), handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable by whoever shares the data, as files usually are
        os.replace(tmp, cache_file)
        log.info("vocabulary of %d words cached in %s", len(tokenizer), cache_file)
    except OSError as err:
        log.warning("could not cache the vocabulary next to the data (%s): continuing", err)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return tokenizer
