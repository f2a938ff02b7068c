"""Annotation files of real caption datasets → one `Record` per image with all its references.

Two kinds of trouble are kept apart. A malformed annotation file (missing, invalid JSON, a
wrong key or type, a broken line) is a `DataError` at once whatever the policy, naming the
file and the line or key path, because nothing read from it could be trusted. Captions are
made one line (`one_line`); an empty or overlong one is a bad sample, handled by
`data.on_bad_sample`: `error` raises, `skip` drops it and returns a
`BadSample` for it (and for an image left with no caption), so nothing is lost silently.

Pure Python: images are neither opened nor stat'ed here; the datasets load them lazily.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from captioner.core.errors import DataError
from captioner.core.tokenizer import caption_problem, one_line
from captioner.core.values import DuplicateKey, loads_unique
from captioner.data.policy import BadSample, check_policy

_TOKEN_LINE = re.compile(r"(?P<image>[^\t]+)#\d+\t(?P<caption>.*)")  # `name.jpg#0<TAB>text`
# `name.jpg| 0| text`. The separator after the number may be spaces alone: the Kaggle
# Flickr30k results.csv has one row (2199200615.jpg) whose second pipe is missing.
_PIPE_LINE = re.compile(r"\s*(?P<image>[^|]+?)\s*\|\s*\d+(?:\s*\|\s*|\s+)(?P<caption>.*)")
_TOKEN_LAYOUT = (
    "'<image>#<n><TAB><caption>' (a token file; Kaggle files start with a header: "
    "'image,caption' or 'image_name| comment_number| comment')"
)
_PIPE_LAYOUT = "'<image>| <n>| <caption>'"
_TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_MISSING = object()  # what `_get` checks when the key is absent
_KINDS = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


@dataclass(frozen=True)
class Record:
    """One image and every reference caption for it: what training and evaluation consume."""

    image: Path  # the image file, root or folder already joined
    captions: tuple[str, ...]  # one line each (`one_line`), non-empty, in file order
    image_id: int | str  # the id evaluation reports under
    # where the annotation file names the image (`file:line`, `file[key]`), for messages
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class _At:
    """A place in an annotation file, for messages: `file[images[3].id]` or `file:12[caption]`."""

    file: Path
    line: int | None = None
    key: str = ""

    def __getitem__(self, part: str | int) -> _At:
        if isinstance(part, int):
            return replace(self, key=f"{self.key}[{part}]")
        return replace(self, key=f"{self.key}.{part}" if self.key else part)

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{place}[{self.key}]" if self.key else place


# A `read_table` row: where it stands, the image as written, its `id` if given, and each caption
# with where it stands.
_Row = tuple[_At, str, int | str | None, list[tuple[str, str]]]


@dataclass
class _Entry:
    """An image being read: where it was first named, and each caption with where it stands."""

    path: Path
    image_id: int | str
    source: str
    captions: list[tuple[str, str]] = field(default_factory=list)


def read_coco(
    annotation_file: str | Path, image_dir: str | Path, policy: str
) -> tuple[list[Record], list[BadSample]]:
    """COCO captions JSON (`captions_train2017.json`); records in the order of `images`."""
    check_policy(policy)
    data, at = _read_json(annotation_file)
    entries: dict[int, _Entry] = {}
    for i, image in _objects(data, "images", at):
        where = at["images"][i]
        image_id = _get(image, "id", (int,), where)
        if image_id in entries:
            raise DataError(
                f"{where['id']}: duplicate image id {image_id}, first at "
                f"{entries[image_id].source}; expected each image listed once."
            )
        path = Path(image_dir) / _get(image, "file_name", (str,), where)
        entries[image_id] = _Entry(path, image_id, str(where))
    for i, annotation in _objects(data, "annotations", at):
        where = at["annotations"][i]
        image_id = _get(annotation, "image_id", (int,), where)
        if image_id not in entries:
            raise DataError(
                f"{where['image_id']}: image id {image_id} is not in 'images'; "
                "expected the id of a listed image."
            )
        entries[image_id].captions.append((_get(annotation, "caption", (str,), where), str(where)))
    return _finish(entries.values(), policy)


def read_karpathy(
    split_file: str | Path, image_root: str | Path, splits: Sequence[str], policy: str
) -> tuple[list[Record], list[BadSample]]:
    """Karpathy's `dataset_{coco,flickr8k,flickr30k}.json`, keeping images whose split is in
    `splits` (e.g. ["train", "restval"]). Every entry is checked, not only the kept ones, so a
    broken test entry stops the training run before it starts, not hours later."""
    check_policy(policy)
    wanted = {splits} if isinstance(splits, str) else set(splits)
    data, at = _read_json(split_file)
    root = Path(image_root)
    kept: list[_Entry] = []
    present: set[str] = set()
    for i, image in _objects(data, "images", at):
        where = at["images"][i]
        split = _get(image, "split", (str,), where)
        folder = root
        if "filepath" in image:  # COCO only: "train2014" / "val2014"
            folder = root / _get(image, "filepath", (str,), where)
        image_id = _get(image, "cocoid" if "cocoid" in image else "imgid", (int,), where)
        entry = _Entry(folder / _get(image, "filename", (str,), where), image_id, str(where))
        for j, sentence in _objects(image, "sentences", where):
            place = where["sentences"][j]
            entry.captions.append((_sentence(sentence, place), str(place)))
        present.add(split)
        if split in wanted:
            kept.append(entry)
    if not wanted & present:  # Flickr files have no "restval": asking for it too is fine
        raise DataError(
            f"{at.file}: no image has split {sorted(wanted)}; "
            f"expected one of the splits present: {sorted(present)}."
        )
    return _finish(kept, policy)


def read_flickr(
    captions_file: str | Path,
    image_dir: str | Path,
    split_list: str | Path | None,
    policy: str,
) -> tuple[list[Record], list[BadSample]]:
    """Flickr8k/30k captions (token file, Kaggle results.csv or Kaggle captions.txt, told apart
    by their first line), restricted to the images named in `split_list` (None: all of them)."""
    check_policy(policy)
    text, at = _read_text(captions_file)
    entries: dict[str, _Entry] = {}
    for where, name, caption in _flickr_lines(text, at):
        entry = entries.setdefault(name, _Entry(Path(image_dir) / name, name, str(where)))
        entry.captions.append((caption, str(where)))
    if split_list is None:
        return _finish(entries.values(), policy)
    split_text, split_at = _read_text(split_list)
    order, listed = [], {}
    for line, written in _lines(split_text):
        if (name := written.strip()) not in entries:
            raise DataError(
                f"{split_at.file}:{line}: image {name!r} has no captions in "
                f"{at.file}; expected every listed image to have some."
            )
        if (first := listed.setdefault(name, line)) != line:
            raise DataError(
                f"{split_at.file}:{line}: image {name!r} is listed again (first at line "
                f"{first}); expected each image once, or it is trained on and scored twice."
            )
        order.append(entries[name])
    return _finish(order, policy)


def read_table(
    path: str | Path, image_root: str | Path | None, policy: str
) -> tuple[list[Record], list[BadSample]]:
    """Your own data: `.jsonl` lines `{"image", "caption": str | [str, ...], "id"?}` or a `.csv`
    / `.tsv` with `image` and `caption` columns (optional `id`). Rows naming the same image
    (as written) merge into one record; relative paths resolve against `image_root`, or the
    annotation file's folder when it is None. Paths are normalised first (`./a.png` is
    `a.png`), so one image is one record whichever way it is written."""
    check_policy(policy)
    suffix = Path(path).suffix.lower()
    if suffix != ".jsonl" and suffix not in _TABLE_DELIMITERS:
        raise DataError(
            f"{path}: unknown annotation format {suffix!r}; expected one of "
            f"{['.jsonl', *_TABLE_DELIMITERS]}."
        )
    text, at = _read_text(path)
    root = at.file.parent if image_root is None else Path(image_root)
    rows = _jsonl_rows(text, at) if suffix == ".jsonl" else _csv_table_rows(text, at, suffix)
    entries: dict[str, _Entry] = {}
    for where, image, image_id, captions in rows:
        if not image.strip():
            raise DataError(f"{where}: expected an image path, got an empty string.")
        image = os.path.normpath(image)  # `./a.png` is `a.png`: one image, one record
        image_id = image if image_id is None else image_id
        # An absolute `image` replaces `root` when joined.
        entry = entries.setdefault(image, _Entry(root / image, image_id, str(where)))
        if entry.image_id != image_id:
            raise DataError(
                f"{where}: image {image!r} has id {image_id!r} here but "
                f"{entry.image_id!r} at {entry.source}; expected one id per image "
                "(a row without 'id' uses the image path)."
            )
        entry.captions.extend(captions)
    return _finish(entries.values(), policy)


def _finish(entries: Iterable[_Entry], policy: str) -> tuple[list[Record], list[BadSample]]:
    """Records of one-line captions (`one_line`), with empty and overlong ones dropped; every
    drop is a `BadSample`, raised under `error` (the first one) and returned under `skip`.
    Two images under one id are a `DataError` whatever the policy: evaluation scores each
    image under its id, so one of them would silently go unscored."""
    records, bad = [], []
    ids: dict[int | str, _Entry] = {}
    files: dict[str, _Entry] = {}
    for entry in entries:
        first = ids.setdefault(entry.image_id, entry)
        if first is not entry:
            raise DataError(
                f"{entry.source}: image {entry.path} has id {entry.image_id!r}, already the id "
                f"of image {first.path} at {first.source}; expected one id per image."
            )
        first = files.setdefault(os.path.normpath(entry.path), entry)
        if first is not entry:
            raise DataError(
                f"{entry.source}: image {entry.path} is listed again (id {entry.image_id!r}), "
                f"first at {first.source} (id {first.image_id!r}); expected each image once, "
                "or it is scored twice."
            )
        captions = []
        for text, source in entry.captions:
            caption = one_line(text)
            if problem := caption_problem(caption):
                bad.append(BadSample(source, problem))
            else:
                captions.append(caption)
        if captions:
            records.append(Record(entry.path, tuple(captions), entry.image_id, entry.source))
        else:
            reason = "every caption of {} is empty" if entry.captions else "{} has no captions"
            bad.append(BadSample(entry.source, reason.format(f"image {entry.path}")))
    if bad and policy == "error":
        raise DataError(bad[0].message())
    return records, bad


def _read_text(path: str | Path) -> tuple[str, _At]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    try:
        return path.read_text(encoding="utf-8-sig"), _At(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start}).") from None


def _read_json(path: str | Path) -> tuple[dict[str, Any], _At]:
    text, at = _read_text(path)
    return _parse_object(text, at), at


def _parse_object(text: str, at: _At) -> dict[str, Any]:
    """`text` as a JSON object; invalid JSON names the file line (offset by `at.line`) and
    column."""
    try:
        value = loads_unique(text)
    except DuplicateKey as e:
        raise DataError(
            f"{at}: key {e.key!r:.60} appears twice in one object; expected each key "
            "once (a JSON reader would silently keep only the last)."
        ) from None
    except json.JSONDecodeError as e:
        line = (at.line or 1) + e.lineno - 1
        raise DataError(f"{at.file}:{line}:{e.colno}: invalid JSON ({e.msg}).") from None
    except RecursionError:
        raise DataError(f"{at}: JSON nested too deeply to read; expected annotations.") from None
    except ValueError as e:  # an integer of thousands of digits
        raise DataError(f"{at}: a number in it cannot be read ({e}).") from None
    return _check(value, (dict,), at)


def _check(value: Any, kinds: tuple[type, ...], at: _At) -> Any:
    if isinstance(value, bool) or not isinstance(value, kinds):
        got = "no such key" if value is _MISSING else f"{type(value).__name__} {value!r:.60}"
        raise DataError(f"{at}: expected {' or '.join(_KINDS[k] for k in kinds)}, got {got}.")
    return value


def _get(obj: dict[str, Any], key: str, kinds: tuple[type, ...], at: _At) -> Any:
    """`obj[key]` checked to be one of `kinds`; `at` is where `obj` stands."""
    return _check(obj.get(key, _MISSING), kinds, at[key])


def _objects(obj: dict[str, Any], key: str, at: _At) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, item in enumerate(_get(obj, key, (list,), at)):
        yield i, _check(item, (dict,), at[key][i])


def _strings(items: list[Any], at: _At) -> list[str]:
    return [_check(item, (str,), at[i]) for i, item in enumerate(items)]


def _sentence(sentence: dict[str, Any], at: _At) -> str:
    """A Karpathy sentence's `raw` text, or its tokens joined when `raw` is missing."""
    if "raw" in sentence or "tokens" not in sentence:
        return _get(sentence, "raw", (str,), at)
    return " ".join(_strings(_get(sentence, "tokens", (list,), at), at["tokens"]))


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its ending) for every non-blank line."""
    for number, line in enumerate(io.StringIO(text, newline=""), start=1):
        if line.strip():
            yield number, line.rstrip("\r\n")


def _csv_rows(
    text: str, at: _At, delimiter: str, required: Sequence[str]
) -> Iterator[tuple[_At, dict[str, str]]]:
    """Rows as {column: cell} after a header that must name `required`; blank lines skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    lines = _csv_lines(reader, at)
    header = [column.strip() for column in next(lines, [])]
    if repeated := sorted({column for column in header if header.count(column) > 1}):
        raise DataError(
            f"{at.file}:1: column(s) {repeated} appear twice in the header; expected each once "
            "(a reader would silently keep only the last)."
        )
    if missing := [column for column in required if column not in header]:
        raise DataError(
            f"{at.file}:1: header {header} lacks column(s) {missing}; expected a "
            f"header row naming {list(required)}, separated by {delimiter!r}."
        )
    for row in lines:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(
                f"{at.file}:{reader.line_num}: expected {len(header)} fields "
                f"separated by {delimiter!r} as in the header, got {len(row)}."
            )
        yield replace(at, line=reader.line_num), dict(zip(header, row, strict=True))


def _csv_lines(reader: Any, at: _At) -> Iterator[list[str]]:
    """The reader's rows; what the csv module cannot read is a `DataError` naming the line."""
    try:
        yield from reader
    except csv.Error as e:
        raise DataError(f"{at.file}:{reader.line_num}: unreadable CSV ({e}).") from None


def _flickr_lines(text: str, at: _At) -> Iterator[tuple[_At, str, str]]:
    """(place, image name, caption) from any of the three Flickr captions layouts."""
    first = text.split("\n", 1)[0].replace(" ", "").strip().lower()
    if first == "image,caption":  # Kaggle Flickr8k captions.txt
        for where, row in _csv_rows(text, at, ",", ("image", "caption")):
            yield where, row["image"].strip(), row["caption"]
        return
    header = first.startswith("image_name|")  # Kaggle Flickr30k results.csv
    pattern, layout = (_PIPE_LINE, _PIPE_LAYOUT) if header else (_TOKEN_LINE, _TOKEN_LAYOUT)
    for number, line in _lines(text):
        if header and number == 1:
            continue
        if not (match := pattern.fullmatch(line)):
            raise DataError(f"{at.file}:{number}: expected {layout}, got {line!r:.80}.")
        yield replace(at, line=number), match["image"].strip(), match["caption"]


def _jsonl_rows(text: str, at: _At) -> Iterator[_Row]:
    for number, line in _lines(text):
        where = replace(at, line=number)
        obj = _parse_object(line, where)
        caption = _get(obj, "caption", (str, list), where)
        if isinstance(caption, str):
            captions = [(caption, str(where))]
        else:
            texts = _strings(caption, where["caption"])
            captions = [(t, str(where["caption"][k])) for k, t in enumerate(texts)]
        image_id = _get(obj, "id", (int, str), where) if "id" in obj else None
        yield where, _get(obj, "image", (str,), where), image_id, captions


def _csv_table_rows(text: str, at: _At, suffix: str) -> Iterator[_Row]:
    for where, row in _csv_rows(text, at, _TABLE_DELIMITERS[suffix], ("image", "caption")):
        image_id = row.get("id", "").strip() or None
        yield where, row["image"].strip(), image_id, [(row["caption"], str(where))]
