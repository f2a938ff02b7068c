"""Hostile input: crafted images, annotation files and captions end in a clear error or a
logged skip, never a traceback from inside a library; the caption tokenizer, the annotation
readers, the image loader and the shard caption reader are fuzzed with hypothesis."""

from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.core.errors import DataError, ImageLoadError
from captioner.core.images import load_image
from captioner.core.tokenizer import MAX_CAPTION_CHARS, Tokenizer, one_line, split_words
from captioner.data.policy import BadSample
from captioner.data.records import Record, read_coco, read_flickr, read_karpathy, read_table
from captioner.data.shards import sample_captions
from captioner.metrics import caption_scores
from tests.helpers import coco, data_error, image_bytes, scenes, write_coco

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" or char in LINE_BREAKS


# --- Captions --------------------------------------------------------------------------------


@FUZZ
@given(st.text())
@example("a dog\r\nruns\x00 \x1b[31m fast\u2028 ")
@example("a lone \ud800 surrogate")
def test_a_caption_becomes_one_clean_line(text: str) -> None:
    line = one_line(text)
    assert not any(is_control(c) for c in line) and line == line.strip()
    assert "  " not in line and one_line(line) == line
    assert split_words(line) == split_words(text)  # only spacing changed, no word


def test_a_line_break_in_a_reference_does_not_shift_the_others_in_scoring() -> None:
    """The COCO scorer's tokenizer reads one caption a line: a raw carriage return in one
    reference used to move every later reference onto the wrong image."""
    predictions = {1: "a dog runs", 2: "a cat sits", 3: "a bird flies"}
    clean = caption_scores(predictions, {k: [v] for k, v in predictions.items()}, meteor=False)
    for breaker in "\r\x0b\x85\u2028":
        references = {1: [f"a dog{breaker}runs"], 2: ["a cat sits"], 3: ["a bird flies"]}
        assert caption_scores(predictions, references, meteor=False) == clean


@FUZZ
@given(st.lists(st.text(), max_size=6), st.text(), st.integers(3, 40))
@example(["\x00 \x1b dog"], "\x1b[1m dog \u2028 ' ( .", 5)
@example(["a \udfff dog"], "\ud800", 5)
def test_the_tokenizer_handles_any_text(captions: list[str], text: str, max_len: int) -> None:
    tokenizer = Tokenizer.build([*captions, "a dog"])
    assert not any(is_control(c) for word in tokenizer.itos for c in word)
    ids = tokenizer.encode(text, max_len)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and len(ids) <= max_len
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    assert all(0 <= i < len(tokenizer) and i not in specials for i in ids[1:-1])
    decoded = tokenizer.decode(ids)
    assert one_line(decoded) == decoded
    if tokenizer.unk_id not in ids:  # every word known: decoding and encoding again agree
        assert tokenizer.encode(decoded, max_len) == ids
    state = json.loads(json.dumps(tokenizer.to_dict()))
    assert Tokenizer.from_dict(state).itos == tokenizer.itos


# --- Annotation files --------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
ID = st.integers(0, 3) | JSON
TEXT = st.text(max_size=12) | JSON
COCO = st.fixed_dictionaries({
    "images": st.lists(st.fixed_dictionaries({"id": ID, "file_name": TEXT}), max_size=4),
    "annotations": st.lists(
        st.fixed_dictionaries({"image_id": ID, "caption": TEXT}), max_size=6
    ),
})  # fmt: skip
KARPATHY = st.fixed_dictionaries({
    "images": st.lists(
        st.fixed_dictionaries(
            {"split": st.sampled_from(["train", "val"]) | JSON, "filename": TEXT, "imgid": ID,
             "sentences": st.lists(st.fixed_dictionaries({"raw": TEXT}), max_size=3) | JSON},
        ),
        max_size=4,
    )
})  # fmt: skip
JSONL_ROW = st.fixed_dictionaries(
    {"image": TEXT, "caption": TEXT | st.lists(TEXT, max_size=3)}, optional={"id": ID}
)


def check_read(
    read: Callable[[Path, str], tuple[list[Record], list[BadSample]]],
    content: bytes,
    suffix: str = ".json",
) -> None:
    """`read` of a file holding `content`, under both policies: records whose captions are
    clean lines, or a `DataError`; nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / f"annotations{suffix}"
        file.write_bytes(content)
        for policy in ("skip", "error"):
            try:
                records, bad = read(file, policy)
            except DataError as err:
                assert str(file) in str(err)
                continue
            for record in records:
                assert record.captions and all(one_line(c) == c != "" for c in record.captions)
                assert all(len(c) <= MAX_CAPTION_CHARS for c in record.captions)
            assert all(b.source and b.reason for b in bad)
            assert policy == "skip" or not bad


def encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


@FUZZ
@given(COCO | JSON)
def test_coco_reader_fuzzed(content: Any) -> None:
    check_read(lambda file, policy: read_coco(file, "/images", policy), encoded(content))


@FUZZ
@given(KARPATHY | JSON)
def test_karpathy_reader_fuzzed(content: Any) -> None:
    read = lambda file, policy: read_karpathy(file, "/images", ["train"], policy)  # noqa: E731
    check_read(read, encoded(content))


@FUZZ
@given(st.lists(JSONL_ROW | JSON, max_size=5))
def test_jsonl_reader_fuzzed(rows: list[Any]) -> None:
    content = "\n".join(json.dumps(row) for row in rows).encode()
    check_read(lambda file, policy: read_table(file, None, policy), content, ".jsonl")


CELL = st.text(max_size=10) | st.sampled_from(["", '"', "a.jpg", "a dog\r\n", "\x00"])


@FUZZ
@given(st.lists(st.lists(CELL, max_size=4), max_size=5), st.sampled_from([",", "\t"]))
def test_csv_reader_fuzzed(rows: list[list[str]], sep: str) -> None:
    content = "\n".join(sep.join(row) for row in [["image", "caption"], *rows]).encode()
    suffix = ".csv" if sep == "," else ".tsv"
    check_read(lambda file, policy: read_table(file, None, policy), content, suffix)


LINE = st.text(max_size=30) | st.tuples(st.integers(0, 3), st.text(max_size=30)).map(
    lambda t: f"{t[0]}.jpg#0\t{t[1]}"
)


@FUZZ
@given(st.lists(LINE, max_size=6), st.sampled_from(["", "image,caption\n", "image_name| c| c\n"]))
def test_flickr_reader_fuzzed(lines: list[str], header: str) -> None:
    content = (header + "\n".join(lines)).encode()
    check_read(lambda file, policy: read_flickr(file, "/images", None, policy), content, ".txt")


@FUZZ
@given(st.binary(max_size=200))
@example(b"\xff\xfe{}")
def test_every_reader_takes_any_bytes(content: bytes) -> None:
    check_read(lambda file, policy: read_coco(file, "/images", policy), content)
    check_read(lambda file, policy: read_flickr(file, "/images", None, policy), content, ".txt")
    check_read(lambda file, policy: read_table(file, None, policy), content, ".csv")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"images": [{"id": ' + "1" * 5000 + "}]}", "number"),
    ],
    ids=["deep", "huge-number"],
)
def test_json_crafted_to_break_the_parser_is_a_data_error(
    content: str, fragment: str, tmp_path: Path
) -> None:
    file = tmp_path / "captions.json"
    file.write_text(content)
    data_error(lambda: read_coco(file, tmp_path, "skip"), str(file), fragment)


def test_a_csv_cell_beyond_the_csv_module_limit_is_a_data_error(tmp_path: Path) -> None:
    file = tmp_path / "captions.csv"
    file.write_text("image,caption\na.jpg," + "a" * 200_000 + "\n")
    data_error(lambda: read_table(file, None, "skip"), f"{file}:2", "larger than")


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_a_caption_of_100k_characters_is_a_bad_sample(policy: str, tmp_path: Path) -> None:
    huge = "x" * 100_000
    file = tmp_path / "captions.json"
    file.write_text(json.dumps(coco(annotations=[
        {"image_id": 9, "caption": "a dog"}, {"image_id": 3, "caption": huge},
        {"image_id": 3, "caption": "a cat\x00 on a\r\nmat"},
    ])))  # fmt: skip
    if policy == "error":
        data_error(lambda: read_coco(file, tmp_path, policy), "[annotations[1]]", "100000")
        return
    records, bad = read_coco(file, tmp_path, policy)
    assert [r.captions for r in records] == [("a dog",), ("a cat on a mat",)]
    assert len(bad) == 1 and "annotations[1]" in bad[0].source and "100000" in bad[0].reason


@FUZZ
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode), st.booleans())
@example(json.dumps({"caption": ["a\x00 dog\r", " "]}).encode(), True)
@example(b"[" * 100_000 + b"]" * 100_000, True)
@example(b'{"caption": "a", "n": ' + b"1" * 5000 + b"}", True)
@example(("x " * MAX_CAPTION_CHARS).encode(), False)
def test_shard_captions_fuzzed(content: bytes, as_json: bool) -> None:
    captions = sample_captions({"__url__": "s.tar", "__key__": "k", "json" if as_json else "txt":
                                content})  # fmt: skip
    if isinstance(captions, BadSample):
        assert captions.source.startswith("s.tar/k") and captions.reason
    else:
        assert captions and all(one_line(c) == c != "" for c in captions)
        assert all(len(c) <= MAX_CAPTION_CHARS for c in captions)


# --- Image files --------------------------------------------------------------------------------


def encodings() -> dict[str, bytes]:
    ((image, _),) = scenes("train", 1, size=24)
    return {fmt: image_bytes(image, fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")}


IMAGES_BY_FORMAT = encodings()


@FUZZ
@given(
    st.sampled_from(sorted(IMAGES_BY_FORMAT)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(1, 10_000),
)
def test_damaged_images_load_or_are_named(fmt: str, flips: list, keep: int) -> None:
    """Any format, bytes overwritten and cut short anywhere: an image, or an `ImageLoadError`
    naming the file, never another exception from inside PIL."""
    data = bytearray(IMAGES_BY_FORMAT[fmt])
    for where, value in flips:
        data[where % len(data)] = value
    try:
        image = load_image(bytes(data[:keep]), name="photo.jpg")
    except ImageLoadError as err:
        assert "photo.jpg" in str(err)
    else:
        assert image.mode == "RGB" and min(image.size) >= 1


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_load_or_are_named(data: bytes) -> None:
    try:
        load_image(data, name="photo.jpg")
    except ImageLoadError as err:
        assert "photo.jpg" in str(err)


@pytest.mark.parametrize(
    ("fmt", "lossless"),
    [("PNG", True), ("BMP", True), ("TIFF", True), ("GIF", False), ("WEBP", False)],
)
def test_an_image_named_with_the_wrong_extension_loads_as_what_it_is(
    fmt: str, lossless: bool, tmp_path: Path
) -> None:
    ((image, _),) = scenes("train", 1, size=24)
    path = tmp_path / "photo.jpg"
    path.write_bytes(image_bytes(image, fmt))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    if lossless:
        assert loaded.tobytes() == image.convert("RGB").tobytes()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"caption": "not an image"}', "not a readable image"),
        (b"", "not a readable image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a readable image"),
    ],
    ids=["json", "empty", "svg"],
)
def test_a_non_image_named_as_an_image_is_named_with_the_reason(
    content: bytes, reason: str, tmp_path: Path
) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_a_caption_with_a_lone_surrogate_can_be_scored() -> None:
    """JSON can hold "\\ud800"; the COCO scorer's tokenizer cannot encode it."""
    scores = caption_scores({1: "a dog \ud800"}, {1: ["a dog \udfff"]}, meteor=False)
    assert scores["BLEU-1"] > 0.99


def test_an_eps_file_named_as_an_image_is_not_rendered(tmp_path: Path) -> None:
    """PIL renders EPS by running Ghostscript: no file named as a photo may start a program."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(ImageLoadError, match="photo.jpg: not a readable image"):
        load_image(path)


def test_an_unreadable_path_is_named_not_raised_from_the_os(tmp_path: Path) -> None:
    too_long = tmp_path / ("x" * 300 + ".jpg")
    with pytest.raises(ImageLoadError, match="File name too long"):
        load_image(too_long)


def test_a_pipe_named_as_an_image_is_refused_instead_of_read(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until something writes to it: a loader would hang."""
    pipe = tmp_path / "photo.jpg"
    os.mkfifo(pipe)
    with pytest.raises(ImageLoadError, match="photo.jpg: is a pipe, socket or device"):
        load_image(pipe)


def test_a_training_run_skips_a_mislabelled_file_and_keeps_a_mislabelled_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PNG saved as .jpg trains; a text file saved as .jpg is one logged skip."""
    from captioner.training.tasks import train
    from tests.helpers import TINY, compose_train, data_overrides

    paths = write_coco(tmp_path / "data")
    train_json = json.loads(paths["train_json"].read_text())
    first, second = (paths["image_dir"] / im["file_name"] for im in train_json["images"][:2])
    with Image.open(first) as picture:
        first.write_bytes(image_bytes(picture, "PNG"))
    second.write_text("caption: a text file, not a picture")
    cfg = compose_train(
        *data_overrides("coco", paths), *TINY, "data.on_bad_sample=skip", "data.batch_size=4",
        "trainer.max_epochs=1", "trainer.limit_val_batches=1", "test=false",
        output_dir=tmp_path / "run",
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="captioner"):
        metrics, _ = train(cfg)
    assert metrics["data/skipped_samples"] == 1.0
    skipped = [r.getMessage() for r in caplog.records if "skipped bad sample" in r.getMessage()]
    assert len(skipped) == 1 and str(second) in skipped[0] and "not a readable image" in skipped[0]
