"""Annotation readers: every layout, every malformed-file error (naming file and line or key),
and empty captions under both policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from captioner.core.errors import ConfigError
from captioner.data.policy import BadSample
from captioner.data.records import Record, read_coco, read_flickr, read_karpathy, read_table
from tests.helpers import coco, data_error


def write(path: Path, content: str | Any) -> Path:
    """`content` as is when a string, else as JSON."""
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


# --- COCO -----------------------------------------------------------------------------------


def test_coco_records_follow_images_with_every_caption(tmp_path: Path) -> None:
    file = write(tmp_path / "captions.json", coco())
    records, bad = read_coco(file, tmp_path / "img", "error")
    assert records == [
        Record(tmp_path / "img/a.jpg", ("A dog.",), 9),
        Record(tmp_path / "img/b.jpg", ("A cat.", "A cat sits."), 3),
    ]
    assert bad == []


def test_coco_image_without_annotations_is_reported(tmp_path: Path) -> None:
    images = [{"id": 9, "file_name": "a.jpg"}, {"id": 4, "file_name": "c.jpg"}]
    file = write(tmp_path / "c.json", coco(images, [{"image_id": 9, "caption": "x"}]))
    records, bad = read_coco(str(file), str(tmp_path), "skip")
    assert [r.image_id for r in records] == [9]
    assert bad == [BadSample(f"{file}[images[1]]", f"image {tmp_path / 'c.jpg'} has no captions")]
    data_error(lambda: read_coco(file, tmp_path, "error"), f"{file}[images[1]]", "no captions")


def test_coco_empty_caption_skip_reports_it_and_the_emptied_image(tmp_path: Path) -> None:
    annotations = [
        {"image_id": 9, "caption": "A dog."},
        {"image_id": 9, "caption": " \t "},
        {"image_id": 3, "caption": ""},
    ]
    file = write(tmp_path / "c.json", coco(annotations=annotations))
    records, bad = read_coco(file, tmp_path, "skip")
    assert records == [Record(tmp_path / "a.jpg", ("A dog.",), 9)]
    assert bad == [
        BadSample(f"{file}[annotations[1]]", "empty caption"),
        BadSample(f"{file}[annotations[2]]", "empty caption"),
        BadSample(f"{file}[images[1]]", f"every caption of image {tmp_path / 'b.jpg'} is empty"),
    ]


def test_coco_empty_caption_error_names_the_annotation(tmp_path: Path) -> None:
    annotations = [{"image_id": 9, "caption": "A dog."}, {"image_id": 3, "caption": "  "}]
    file = write(tmp_path / "c.json", coco(annotations=annotations))
    message = data_error(lambda: read_coco(file, tmp_path, "error"), f"{file}[annotations[1]]")
    assert "empty caption" in message and "data.on_bad_sample=skip" in message


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"images": [\n  {"id": 1,, }]}', [":2:", "invalid JSON"]),
        ([coco()], ["expected an object, got list"]),
        ({"images": []}, ["[annotations]", "expected a list, got no such key"]),
        (coco(images=[{"id": 9}]), ["[images[0].file_name]", "expected a string"]),
        (coco(images=["a.jpg"]), ["[images[0]]", "expected an object, got str"]),
        (coco(images=[{"id": "9", "file_name": "a"}]), ["[images[0].id]", "integer, got str"]),
        (coco(images=[{"id": True, "file_name": "a"}]), ["[images[0].id]", "integer, got bool"]),
        (
            coco(annotations=[{"image_id": 9, "caption": "x"}, {"image_id": 9, "caption": 7}]),
            ["[annotations[1].caption]", "expected a string, got int 7"],
        ),
        (coco(annotations=[{"caption": "x"}]), ["[annotations[0].image_id]", "no such key"]),
        (
            coco(annotations=[{"image_id": 5, "caption": "x"}]),
            ["[annotations[0].image_id]", "image id 5 is not in 'images'"],
        ),
        (
            coco(images=[{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}]),
            ["[images[1].id]", "duplicate image id 1", "[images[0]]"],
        ),
    ],
)
def test_coco_malformed_file_fails_naming_the_place(
    tmp_path: Path, content: Any, fragments: list[str]
) -> None:
    file = write(tmp_path / "captions.json", content)
    for policy in ("skip", "error"):
        data_error(lambda p=policy: read_coco(file, tmp_path, p), str(file), *fragments)


def test_missing_files_and_bad_policy(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    data_error(lambda: read_coco(missing, tmp_path, "skip"), f"{missing}: no such file")
    data_error(lambda: read_karpathy(missing, tmp_path, ["test"], "skip"), str(missing))
    data_error(lambda: read_flickr(missing, tmp_path, None, "skip"), str(missing))
    data_error(lambda: read_table(tmp_path / "x.csv", None, "skip"), "x.csv: no such file")
    with pytest.raises(ConfigError, match="on_bad_sample"):
        read_coco(missing, tmp_path, "ignore")


def test_undecodable_file_is_a_data_error(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_bytes(b'{"images": "\xff"}')
    data_error(lambda: read_coco(file, tmp_path, "skip"), str(file), "not UTF-8")


# --- Karpathy -------------------------------------------------------------------------------


def karpathy_coco() -> dict[str, Any]:
    def image(split: str, name: str, cocoid: int, *raws: str) -> dict[str, Any]:
        sentences = [{"raw": raw, "tokens": raw.lower().split()} for raw in raws]
        return {
            "filepath": "val2014",
            "filename": name,
            "split": split,
            "imgid": cocoid - 100,
            "cocoid": cocoid,
            "sentences": sentences,
        }

    images = [
        image("train", "t.jpg", 101, "A train. "),
        image("test", "x.jpg", 102, "A test."),
        image("restval", "r.jpg", 103, "A restval one.", "Another."),
        image("val", "v.jpg", 104, "A val."),
    ]
    return {"images": images, "dataset": "coco"}


def test_karpathy_coco_joins_filepath_and_keeps_restval(tmp_path: Path) -> None:
    file = write(tmp_path / "dataset_coco.json", karpathy_coco())
    records, bad = read_karpathy(file, tmp_path, ["train", "restval"], "error")
    assert records == [
        Record(tmp_path / "val2014/t.jpg", ("A train.",), 101),
        Record(tmp_path / "val2014/r.jpg", ("A restval one.", "Another."), 103),
    ]
    assert bad == []
    test, _ = read_karpathy(file, str(tmp_path), "test", "error")  # one split as a string
    assert [(r.image.name, r.image_id) for r in test] == [("x.jpg", 102)]


def test_karpathy_flickr_has_no_filepath_and_uses_imgid(tmp_path: Path) -> None:
    sentences = [{"tokens": ["two", "dogs"]}, {"raw": "Two .", "tokens": ["ignored"]}]
    images = [
        {"filename": "1.jpg", "split": "val", "imgid": 0, "sentences": [{"raw": "One ."}]},
        {"filename": "2.jpg", "split": "val", "imgid": 1, "sentences": sentences},
    ]
    file = write(tmp_path / "dataset_flickr8k.json", {"images": images, "dataset": "flickr8k"})
    records, _ = read_karpathy(file, tmp_path / "Flicker8k_Dataset", ["val"], "skip")
    assert records == [
        Record(tmp_path / "Flicker8k_Dataset/1.jpg", ("One .",), 0),
        Record(tmp_path / "Flicker8k_Dataset/2.jpg", ("two dogs", "Two ."), 1),
    ]


def test_karpathy_unknown_split_lists_the_present_ones(tmp_path: Path) -> None:
    file = write(tmp_path / "d.json", karpathy_coco())
    data_error(
        lambda: read_karpathy(file, tmp_path, ["dev", "testing"], "skip"),
        str(file),
        "['dev', 'testing']",
        "['restval', 'test', 'train', 'val']",
    )
    # one present split is enough: Flickr files have no "restval", the default asks for it too
    records, _ = read_karpathy(file, tmp_path, ["val", "testing"], "skip")
    assert [r.image_id for r in records] == [104]


def test_karpathy_empty_sentence_under_both_policies(tmp_path: Path) -> None:
    content = karpathy_coco()
    content["images"][2]["sentences"][1]["raw"] = "   "
    file = write(tmp_path / "d.json", content)
    records, bad = read_karpathy(file, tmp_path, ["restval"], "skip")
    assert records == [Record(tmp_path / "val2014/r.jpg", ("A restval one.",), 103)]
    assert bad == [BadSample(f"{file}[images[2].sentences[1]]", "empty caption")]
    data_error(
        lambda: read_karpathy(file, tmp_path, ["restval"], "error"),
        f"{file}[images[2].sentences[1]]: empty caption",
    )
    assert read_karpathy(file, tmp_path, ["train"], "error")[1] == []  # not in the kept split


@pytest.mark.parametrize(
    ("index", "change", "fragment"),
    [
        (1, {"split": None}, "[images[1].split]: expected a string, got NoneType"),
        (3, {"filename": 4}, "[images[3].filename]: expected a string, got int"),
        (1, {"cocoid": "102"}, "[images[1].cocoid]: expected an integer"),
        (2, {"sentences": [{"tokens": ["a", 1]}]}, "[images[2].sentences[0].tokens[1]]"),
        (2, {"sentences": [{}]}, "[images[2].sentences[0].raw]: expected a string, got no such"),
        (0, {"sentences": "A train."}, "[images[0].sentences]: expected a list"),
    ],
)
def test_karpathy_malformed_entry_fails_even_outside_the_kept_splits(
    tmp_path: Path, index: int, change: dict[str, Any], fragment: str
) -> None:
    content = karpathy_coco()
    content["images"][index].update(change)
    file = write(tmp_path / "d.json", content)
    data_error(lambda: read_karpathy(file, tmp_path, ["val"], "skip"), f"{file}{fragment}")


def test_karpathy_missing_images_key(tmp_path: Path) -> None:
    file = write(tmp_path / "d.json", {"dataset": "coco"})
    data_error(lambda: read_karpathy(file, tmp_path, ["val"], "skip"), f"{file}[images]")


# --- Flickr ---------------------------------------------------------------------------------

TOKEN = (
    "1000_a.jpg#0\tA child in a pink dress .\n"
    "1000_a.jpg#1\tA girl going into a building .\n"
    "\n"
    "2000_b.jpg#0\tA black dog .\r\n"
    "3000_c.jpg#0\tTwo dogs .\n"
)


def test_flickr_token_file_in_split_order(tmp_path: Path) -> None:
    captions = write(tmp_path / "Flickr8k.token.txt", TOKEN)
    split = write(tmp_path / "Flickr_8k.trainImages.txt", "3000_c.jpg\n\n1000_a.jpg\n")
    records, bad = read_flickr(captions, tmp_path / "images", split, "error")
    assert records == [
        Record(tmp_path / "images/3000_c.jpg", ("Two dogs .",), "3000_c.jpg"),
        Record(
            tmp_path / "images/1000_a.jpg",
            ("A child in a pink dress .", "A girl going into a building ."),
            "1000_a.jpg",
        ),
    ]
    assert bad == []


def test_flickr_without_split_list_keeps_every_image_in_file_order(tmp_path: Path) -> None:
    captions = write(tmp_path / "results_20130124.token", TOKEN)
    records, _ = read_flickr(str(captions), str(tmp_path), None, "skip")
    assert [r.image_id for r in records] == ["1000_a.jpg", "2000_b.jpg", "3000_c.jpg"]
    assert records[1].captions == ("A black dog .",)


def test_flickr30k_kaggle_results_csv(tmp_path: Path) -> None:
    captions = write(
        tmp_path / "results.csv",
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair .\n"
        '1000092795.jpg| 1|Two friends , "one" | in a yard .\n'
        "2199200615.jpg| 4   A dog runs across the grass .\n",  # the real file's missing pipe
    )
    records, bad = read_flickr(captions, tmp_path, None, "error")
    assert bad == []
    assert records == [
        Record(
            tmp_path / "1000092795.jpg",
            ("Two young guys with shaggy hair .", 'Two friends , "one" | in a yard .'),
            "1000092795.jpg",
        ),
        Record(tmp_path / "2199200615.jpg", ("A dog runs across the grass .",), "2199200615.jpg"),
    ]


def test_flickr8k_kaggle_captions_txt(tmp_path: Path) -> None:
    captions = write(
        tmp_path / "captions.txt",
        'image,caption\n1000_a.jpg,"A child , in pink ."\n2000_b.jpg,A dog .\n1000_a.jpg,A girl\n',
    )
    split = write(tmp_path / "split.txt", "2000_b.jpg\n1000_a.jpg\n")
    records, _ = read_flickr(captions, tmp_path, split, "error")
    assert [(r.image_id, r.captions) for r in records] == [
        ("2000_b.jpg", ("A dog .",)),
        ("1000_a.jpg", ("A child , in pink .", "A girl")),
    ]


def test_flickr_split_name_without_captions_names_split_file_and_line(tmp_path: Path) -> None:
    captions = write(tmp_path / "Flickr8k.token.txt", TOKEN)
    split = write(tmp_path / "split.txt", "1000_a.jpg\n\n9999_z.jpg\n")
    for policy in ("skip", "error"):
        data_error(
            lambda p=policy: read_flickr(captions, tmp_path, split, p),
            f"{split}:3",
            "'9999_z.jpg'",
            str(captions),
        )
    data_error(lambda: read_flickr(captions, tmp_path, tmp_path / "no.txt", "skip"), "no such")


READERS = {
    "flickr": lambda path, root: read_flickr(path, root, None, "skip"),
    "table": lambda path, root: read_table(path, None, "skip"),
}


@pytest.mark.parametrize(
    ("reader", "name", "content", "fragment"),
    [
        (
            "flickr",
            "token.txt",
            "a.jpg#0\tA dog .\na.jpg#1 A cat .\n",
            ":2: expected '<image>#<n><TAB>",
        ),
        (
            "flickr",
            "token.txt",
            "a.jpg#0\tA dog .\n\nb.jpg\tA cat .\n",
            ":3: expected '<image>#<n><TAB>",
        ),
        (
            "flickr",
            "results.csv",
            "image_name| comment_number| comment\na.jpg| A dog\n",
            ":2: expected '",
        ),
        ("flickr", "captions.txt", "image,caption\na.jpg,A dog\nb.jpg\n", ":3: expected 2 fields"),
        ("table", "a.jsonl", '{"image": "a", "caption": "x"}\n{"image": "b",\n', ":2:"),
        ("table", "a.jsonl", '["a.jpg", "A dog"]\n', ":1: expected an object, got list"),
        (
            "table",
            "a.jsonl",
            '{"image": "a", "caption": 3}\n',
            ":1[caption]: expected a string or a list",
        ),
        (
            "table",
            "a.jsonl",
            '{"image": "a", "caption": ["x", 3]}\n',
            ":1[caption[1]]: expected a string",
        ),
        (
            "table",
            "a.jsonl",
            '{"image": "a", "caption": "x"}\n{"image": 5, "caption": "x"}',
            ":2[image]",
        ),
        ("table", "a.jsonl", '{"caption": "x"}\n', ":1[image]: expected a string, got no such key"),
        (
            "table",
            "a.jsonl",
            '{"image": "a", "caption": "x", "id": 1.5}\n',
            ":1[id]: expected an integer",
        ),
        ("table", "a.jsonl", '{"image": " ", "caption": "x"}\n', ":1: expected an image path"),
        (
            "table",
            "a.jsonl",
            '{"image": "a", "caption": "x", "id": 1}\n{"image": "a", "caption": "y"}',
            ":2",
        ),
        (
            "table",
            "a.csv",
            "file,caption\na.jpg,x\n",
            ":1: header ['file', 'caption'] lacks column(s)",
        ),
        ("table", "a.tsv", "image,caption\na.jpg,x\n", ":1: header ['image,caption']"),
        ("table", "a.csv", "image,caption\na.jpg,x\nb.jpg,y,z\n", ":3: expected 2 fields"),
        (
            "table",
            "a.json",
            "[]",
            ": unknown annotation format '.json'; expected one of ['.jsonl', ",
        ),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, reader: str, name: str, content: str, fragment: str
) -> None:
    file = write(tmp_path / name, content)
    data_error(lambda: READERS[reader](file, tmp_path), f"{file}{fragment}")


def test_flickr_empty_caption_under_both_policies(tmp_path: Path) -> None:
    captions = write(tmp_path / "t.txt", "a.jpg#0\tA dog .\na.jpg#1\t  \nb.jpg#0\t\nc.jpg#0\t\n")
    split = write(tmp_path / "split.txt", "a.jpg\nb.jpg\n")
    records, bad = read_flickr(captions, tmp_path, split, "skip")
    assert records == [Record(tmp_path / "a.jpg", ("A dog .",), "a.jpg")]
    assert bad == [  # c.jpg is outside the split, so its empty caption is not this split's loss
        BadSample(f"{captions}:2", "empty caption"),
        BadSample(f"{captions}:3", "empty caption"),
        BadSample(f"{captions}:3", f"every caption of image {tmp_path / 'b.jpg'} is empty"),
    ]
    data_error(lambda: read_flickr(captions, tmp_path, split, "error"), f"{captions}:2: empty")


# --- your own table -------------------------------------------------------------------------


def test_jsonl_merges_lines_and_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere/z.png"
    (tmp_path / "data").mkdir()
    file = write(
        tmp_path / "data/ann.jsonl",
        '{"image": "imgs/a.jpg", "caption": ["A dog .", " Brown dog "]}\n'
        "\n"
        f'{{"image": "{absolute}", "caption": "Far away", "id": 7}}\n'
        '{"image": "imgs/a.jpg", "caption": "Third"}\n',
    )
    records, bad = read_table(file, None, "error")
    assert records == [
        Record(tmp_path / "data/imgs/a.jpg", ("A dog .", "Brown dog", "Third"), "imgs/a.jpg"),
        Record(absolute, ("Far away",), 7),
    ]
    assert bad == []
    rooted, _ = read_table(str(file), tmp_path / "root", "error")
    assert [r.image for r in rooted] == [tmp_path / "root/imgs/a.jpg", absolute]


def test_csv_and_tsv_merge_rows_and_ignore_extra_columns(tmp_path: Path) -> None:
    csv_file = write(
        tmp_path / "ann.csv",
        'split,image,caption,id\ntrain,a.jpg,"A dog, running",img-1\ntrain,b.jpg,Cat,\n'
        "\ntrain,a.jpg,Second,img-1\n",
    )
    tsv_file = write(tmp_path / "ann.TSV", "\ufeffimage\tcaption\na.jpg\tA dog\na.jpg\tTwo\n")
    records, _ = read_table(csv_file, tmp_path / "r", "error")
    assert records == [
        Record(tmp_path / "r/a.jpg", ("A dog, running", "Second"), "img-1"),
        Record(tmp_path / "r/b.jpg", ("Cat",), "b.jpg"),
    ]
    assert read_table(tsv_file, None, "error")[0] == [
        Record(tmp_path / "a.jpg", ("A dog", "Two"), "a.jpg")
    ]


def test_table_empty_captions_under_both_policies(tmp_path: Path) -> None:
    file = write(
        tmp_path / "a.jsonl",
        '{"image": "a.jpg", "caption": ["A dog", " "]}\n{"image": "b.jpg", "caption": []}\n',
    )
    records, bad = read_table(file, None, "skip")
    assert records == [Record(tmp_path / "a.jpg", ("A dog",), "a.jpg")]
    assert bad == [
        BadSample(f"{file}:1[caption[1]]", "empty caption"),
        BadSample(f"{file}:2", f"image {tmp_path / 'b.jpg'} has no captions"),
    ]
    data_error(lambda: read_table(file, None, "error"), f"{file}:1[caption[1]]: empty caption")
    csv_file = write(tmp_path / "a.csv", "image,caption\na.jpg,A dog\na.jpg,\n")
    assert read_table(csv_file, None, "skip")[1] == [BadSample(f"{csv_file}:3", "empty caption")]
    data_error(lambda: read_table(csv_file, None, "error"), f"{csv_file}:3: empty caption")
