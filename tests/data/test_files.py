"""Real-data formats end to end: tiny datasets written to disk, trained through `train(cfg)`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.core.errors import ConfigError, DataError
from captioner.training.tasks import train
from tests.helpers import (
    ROOT,
    TEST_ONLY_WORD,
    TINY,
    compose_train,
    data_overrides,
    write_coco,
    write_flickr,
    write_karpathy,
    write_table,
    write_webdataset,
)

WRITERS = {
    "coco": write_coco,
    "karpathy": write_karpathy,
    "flickr": write_flickr,
    "jsonl": write_table,
    "csv": lambda root: write_table(root, ".csv"),
    "webdataset": write_webdataset,
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.slow
def test_every_format_trains_and_tests(fmt: str, tmp_path: Path) -> None:
    paths = WRITERS[fmt](tmp_path / "data")
    cfg = compose_train(
        *data_overrides(fmt, paths), *TINY, "debug=fdr", output_dir=tmp_path / "run"
    )
    metrics, objects = train(cfg)
    assert metrics["test/CIDEr"] >= 0.0 and metrics["test/loss"] > 0.0
    tokenizer = objects["datamodule"].tokenizer
    assert "circle" in tokenizer.stoi or "square" in tokenizer.stoi
    assert TEST_ONLY_WORD not in tokenizer.stoi  # the vocabulary saw training captions only
    batch = next(iter(objects["datamodule"].test_dataloader()[0]))
    assert batch["images"].shape[1:] == (3, 32, 32)
    # every reference is kept: the test split's last caption of each image names the zebra
    assert [refs[-1].endswith(TEST_ONLY_WORD) for refs in batch["references"]] == [True] * 4
    assert sum(map(len, batch["references"])) == 9


# --- WebDataset shards: workers, ranks, epochs --------------------------------------------


# --- The vocabulary cache ------------------------------------------------------------------


# --- Images in every pixel format ----------------------------------------------------------


# --- Bad input: every case under both policies ---------------------------------------------


def break_first_training_image(paths: dict, case: str) -> str:
    """Damage the first training entry of a COCO dataset as `case` says; returns the text the
    error or log must name."""
    train = json.loads(paths["train_json"].read_text())
    image = paths["image_dir"] / train["images"][0]["file_name"]
    if case == "missing":
        image.unlink()
    elif case == "truncated":
        image.write_bytes(image.read_bytes()[:200])
    elif case == "corrupt":
        image.write_bytes(b"\xff\xd8 this is no JPEG at all" * 10)
    elif case == "bomb":  # a tiny PNG whose header claims 20,000 x 20,000 pixels
        Image.new("1", (20_000, 20_000)).save(image, format="PNG")
    elif case == "empty_caption":  # one of the image's captions; the others stay usable
        train["annotations"][0]["caption"] = "   "
        paths["train_json"].write_text(json.dumps(train))
        return f"{paths['train_json']}[annotations["
    return str(image)


BAD_CASES = ["missing", "truncated", "corrupt", "bomb", "empty_caption"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_sample_under_error_policy_stops_with_the_file_and_the_fix(
    case: str, tmp_path: Path
) -> None:
    paths = write_coco(tmp_path / "data")
    named = break_first_training_image(paths, case)
    cfg = compose_train(*data_overrides("coco", paths), *TINY, "data.batch_size=8", "debug=fdr",
                        output_dir=tmp_path / "run")  # fmt: skip
    with pytest.raises(DataError) as err:
        train(cfg)
    assert named in str(err.value) and "data.on_bad_sample=skip" in str(err.value)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_sample_under_skip_policy_is_dropped_counted_and_logged_once(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = write_coco(tmp_path / "data")
    named = break_first_training_image(paths, case)
    cfg = compose_train(
        *data_overrides("coco", paths), *TINY, "data.on_bad_sample=skip", "data.batch_size=7",
        "trainer.max_epochs=3", "trainer.limit_val_batches=1", "trainer.accelerator=cpu",
        "test=false", output_dir=tmp_path / "run",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="captioner"):
        metrics, objects = train(cfg)
    assert metrics["data/skipped_samples"] == 1.0
    logged = [r.getMessage() for r in caplog.records if "skipped bad sample" in r.getMessage()]
    assert len(logged) == 1 and named in logged[0]  # three epochs read it, one log line
    trainer = objects["trainer"]
    assert trainer.global_step == 3  # every epoch still trained on the 7 good images


# --- Start-up checks and scripts/validate_data.py ------------------------------------------


def test_wrong_image_folder_and_missing_keys_fail_at_start_up(tmp_path: Path) -> None:
    paths = write_coco(tmp_path / "data")
    wrong = {**paths, "image_dir": tmp_path / "nowhere"}
    cfg = compose_train(*data_overrides("coco", wrong), *TINY, output_dir=tmp_path / "a")
    with pytest.raises(DataError, match="check data.image_dir"):
        train(cfg)
    cfg = compose_train("data=coco", *TINY, output_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="data.image_dir is required"):
        train(cfg)


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / name
    return subprocess.run(
        [sys.executable, str(script), *args, f"hydra.run.dir={cwd / 'out'}"],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_validate_data_reports_every_bad_entry(tmp_path: Path) -> None:
    paths = write_coco(tmp_path / "data")
    args = data_overrides("coco", paths)
    clean = run_script("validate_data.py", *args, cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert "0 bad entries" in clean.stdout
    broken = [break_first_training_image(paths, case) for case in ("corrupt", "empty_caption")]
    val = json.loads(paths["val_json"].read_text())
    (paths["image_dir"] / val["images"][1]["file_name"]).unlink()
    result = run_script("validate_data.py", *args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sources = [entry["source"] for entry in report["bad"]]
    assert len(sources) == 3 and sources[0].startswith(broken[1])
    assert sources[1].startswith(broken[0])
    # the dropped caption counts too: the table's bad entries are the ones listed
    assert report["splits"]["train"] == {"samples": 8, "bad": 2, "long_captions": 0}
    assert report["splits"]["val"]["bad"] == 1 and report["splits"]["test"]["bad"] == 0
    assert sum(split["bad"] for split in report["splits"].values()) == len(sources)
    assert all(source in result.stdout for source in sources)
    assert f"(listed at {paths['train_json']}[images[0]])" in sources[1]  # where it is named
    assert "skipped" not in result.stdout + result.stderr  # on_bad_sample=error: nothing is
    paths["train_json"].write_text('{"images": [], "annotations": [{"image_id": 1}]')
    malformed = run_script("validate_data.py", *args, cwd=tmp_path)
    assert malformed.returncode == 2 and "Traceback" not in malformed.stderr
    assert str(paths["train_json"]) in malformed.stderr


def test_validate_data_names_the_jsonl_line_of_a_bad_image(tmp_path: Path) -> None:
    from captioner.training.tasks import validate_data

    paths = write_table(tmp_path / "data")
    second = json.loads(paths["train_file"].read_text().splitlines()[1])["image"]
    (tmp_path / "data" / second).write_bytes(b"not an image")
    cfg = compose_train(*data_overrides("jsonl", paths), output_dir=tmp_path / "out",
                        config_name="validate_data")  # fmt: skip
    report, _ = validate_data(cfg)
    (entry,) = report["bad"]
    assert entry["source"].endswith(f"{second} (listed at {paths['train_file']}:2)")


@pytest.mark.slow
def test_train_script_reports_a_bad_image_in_one_line(tmp_path: Path) -> None:
    paths = write_coco(tmp_path / "data")
    named = break_first_training_image(paths, "corrupt")
    result = run_script(
        "train.py", *data_overrides("coco", paths), *TINY, "data.batch_size=8", "debug=fdr",
        "data.num_workers=2", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("data error: ") and named in last and "on_bad_sample=skip" in last


def test_data_without_a_test_split_trains_and_eval_says_what_to_set(tmp_path: Path) -> None:
    from captioner.training.tasks import evaluate

    paths = write_coco(tmp_path / "data")
    del paths["test_json"]
    cfg = compose_train(*data_overrides("coco", paths), *TINY, "trainer.max_epochs=1",
                        "trainer.accelerator=cpu", output_dir=tmp_path / "run")  # fmt: skip
    metrics, _ = train(cfg)
    assert not any(name.startswith("test") for name in metrics)  # the test was skipped
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    eval_cfg = compose_train(f"ckpt_path={ckpt}", output_dir=tmp_path / "eval", config_name="eval")
    with pytest.raises(ConfigError, match="data.test_json"):
        evaluate(eval_cfg)


# --- Multi-process pitfalls ----------------------------------------------------------------


def test_bad_samples_survive_lightning_input_conversion(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import HalfPrecision

    from captioner.data.policy import BadSample, BadSampleLog

    batch = {"images": torch.zeros(1, 3, 4, 4), "bad_samples": [BadSample("x.jpg", "broken")]}
    converted = HalfPrecision("bf16-true").convert_input(batch)  # what bf16-true runs do
    assert converted["images"].dtype == torch.bfloat16
    with pytest.raises(DataError, match="x.jpg: broken"):
        BadSampleLog("error").report(converted["bad_samples"])


def test_evaluation_needs_the_test_data_only(tmp_path: Path) -> None:
    from captioner.training.tasks import evaluate

    paths = write_coco(tmp_path / "data")
    overrides = (*TINY, "trainer.max_epochs=1", "trainer.accelerator=cpu", "test=false")
    cfg = compose_train(*data_overrides("coco", paths), *overrides, output_dir=tmp_path / "run")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for name in ("train_json", "val_json"):  # e.g. evaluating on another machine
        paths[name].unlink()
    eval_cfg = compose_train(f"ckpt_path={ckpt}", output_dir=tmp_path / "eval", config_name="eval")
    metrics, _ = evaluate(eval_cfg)
    assert metrics["test/CIDEr"] >= 0.0 and metrics["test/loss"] > 0.0
