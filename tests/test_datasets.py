"""Real-data formats end to end: tiny datasets written to disk, trained through `train(cfg)`."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builders import (
    TEST_ONLY_WORD,
    TINY_IMAGE_MODEL,
    image_bytes,
    scenes,
    write_coco,
    write_flickr,
    write_karpathy,
    write_shards,
    write_table,
    write_tar,
    write_webdataset,
)
from conftest import compose_train
from PIL import Image

from captioner.data import CocoDataModule, ImagePreprocess, load_image
from captioner.data.tokenizer import Tokenizer
from captioner.data.transforms import TrainAugment
from captioner.errors import ConfigError, DataError
from captioner.tasks import train

# A model small enough that a few steps take a second; every run writes under tmp_path.
TINY = (
    *TINY_IMAGE_MODEL, "data.batch_size=4", "data.num_workers=0", "~logger",
    "callbacks.lr_monitor=null", "callbacks.rich_progress_bar=null",
    "callbacks.attention_samples=null",
)  # fmt: skip

WRITERS = {
    "coco": write_coco,
    "karpathy": write_karpathy,
    "flickr": write_flickr,
    "jsonl": write_table,
    "csv": lambda root: write_table(root, ".csv"),
    "webdataset": write_webdataset,
}


def data_overrides(fmt: str, paths: dict) -> list[str]:
    config = "jsonl" if fmt == "csv" else fmt
    # quoted, as on a shell command line: brace patterns are Hydra syntax otherwise
    return [f"data={config}", *(f"data.{key}='{value}'" for key, value in paths.items())]


@pytest.mark.parametrize("fmt", sorted(WRITERS))
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


def shard_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["image_ids"]]


def test_shards_each_sample_once_per_epoch_with_two_workers(tmp_path: Path) -> None:
    from captioner.data import WebDataModule

    train = write_shards(tmp_path, "train", shards=5, per_shard=4)
    val = write_shards(tmp_path, "val", shards=2, per_shard=3)
    dm = WebDataModule(train, val, image_size=32, batch_size=2, num_workers=2, min_freq=1,
                       shuffle_buffer=4, augment=False)  # fmt: skip
    loader = dm.train_dataloader()
    epochs = [shard_keys(loader) for _ in range(3)]
    expected = sorted(f"{s:05d}{k:04d}" for s in range(5) for k in range(4))
    for keys in epochs:
        assert sorted(keys) == expected  # every sample once, none twice, across both workers
    assert len({tuple(keys) for keys in epochs}) == 3  # a new order each epoch
    val_loader = dm.val_dataloader()
    assert shard_keys(val_loader) == shard_keys(val_loader)  # validation: fixed order
    assert sorted(shard_keys(val_loader)) == sorted(
        f"{s:05d}{k:04d}" for s in range(2) for k in range(3)
    )


def test_shards_are_split_across_ranks_then_workers(tmp_path: Path) -> None:
    from captioner.data.shards import assign_shards

    shards = [f"s{i}" for i in range(10)]
    parts = [assign_shards(shards, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(s for part in parts for s in part) == sorted(shards)
    assert parts[0] == ["s0", "s4", "s8"] and parts[3] == ["s3", "s7"]


def test_epoch_samples_gives_every_rank_the_same_number_of_batches(tmp_path: Path) -> None:
    from captioner.data import WebDataModule

    train = write_shards(tmp_path, "train", shards=3, per_shard=4)  # ranks get 8 and 4 samples
    counts = []
    for rank in range(2):
        dm = WebDataModule(train, train, image_size=32, batch_size=2, num_workers=0,
                           min_freq=1, epoch_samples=16)  # fmt: skip
        dm.split("train").rank, dm.split("train").world_size = rank, 2
        loader = dm.train_dataloader()
        counts.append([len(loader), len(list(loader))])
    assert counts == [[4, 4], [4, 4]]  # 16 samples / 2 ranks / batch 2, shards repeated as needed


# --- The vocabulary cache ------------------------------------------------------------------


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


# --- Images in every pixel format ----------------------------------------------------------


def exif_rotated_jpeg(path: Path) -> None:
    """Pixels stored sideways (tall), with EXIF orientation 6: shown upright as 40 wide, 20 tall,
    red on the left half."""
    upright = Image.new("RGB", (40, 20), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 20, 20))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # displayed after turning 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


def transparent_key(image: Image.Image) -> Image.Image:
    """An RGB PNG whose black is marked transparent (a tRNS colour key)."""
    image.info["transparency"] = (0, 0, 0)
    return image


@pytest.mark.parametrize(
    "mode, make, expected",
    [
        ("L", lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
        ("P", lambda: Image.new("RGB", (8, 8), (200, 40, 40)).quantize(4), (200, 40, 40)),
        ("RGBA", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        ("LA", lambda: Image.new("LA", (8, 8), (0, 128)), (128, 128, 128)),
        ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        ("I;16", lambda: Image.fromarray(np.full((8, 8), 51400, np.uint16)), (200, 200, 200)),
        ("RGB", lambda: transparent_key(Image.new("RGB", (8, 8), (0, 0, 0))), (255, 255, 255)),
    ],
)
def test_images_in_every_pixel_format_load_as_what_they_show(
    mode: str, make, expected: tuple, tmp_path: Path
) -> None:
    image = make()
    assert image.mode == mode
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - expected).max() <= 3, pixels[0, 0]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif_rotated_jpeg(tmp_path / "phone.jpg")
    pixels = np.asarray(load_image(tmp_path / "phone.jpg")).astype(int)
    assert pixels.shape == (20, 40, 3)
    assert pixels[10, 5, 0] > 200 and pixels[10, 35, 2] > 200  # red left, blue right


def test_evaluation_sees_the_whole_image_whatever_its_shape() -> None:
    """A wide image keeps its left and right edges (no centre crop cuts them away)."""
    wide = Image.new("RGB", (96, 24), (0, 0, 0))
    wide.paste((255, 0, 0), (0, 0, 8, 24))
    wide.paste((0, 255, 0), (88, 0, 96, 24))
    pixels = ImagePreprocess((32, 32)).resize(wide)
    assert pixels.shape == (3, 32, 32)
    assert pixels[0, 16, 0] > 200 and pixels[1, 16, -1] > 200
    augment = TrainAugment(ImagePreprocess((32, 32)), min_area=0.8)
    crops = torch.stack([augment(wide) for _ in range(20)]).float()
    assert crops.shape == (20, 3, 32, 32)
    assert (crops[:, :, 16, 16] == 0).all()  # the centre is always kept
    assert crops.std(0).mean() > 0  # and the crops differ


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


def bad_shard(root: Path, case: str) -> tuple[str, str]:
    """One good sample, then a sample broken as `case` says, in a shard; returns (shard
    pattern, the text that names the bad one)."""
    (image, captions), _ = scenes("train", 2)
    good = [("good.jpg", image_bytes(image)), ("good.txt", captions[0].encode())]
    broken = {
        "corrupt": [("bad.jpg", b"not an image"), ("bad.txt", b"a caption")],
        "empty_caption": [("bad.jpg", image_bytes(image)), ("bad.txt", b"  \n")],
        "no_caption": [("bad.jpg", image_bytes(image))],
        "bomb": [("bad.png", image_bytes(Image.new("1", (20_000, 20_000)), "PNG")),
                 ("bad.txt", b"a caption")],
    }[case]  # fmt: skip
    shard = write_tar(root / "bad-00000.tar", good + broken)
    return str(shard), f"{shard}/bad"


@pytest.mark.parametrize("case", ["corrupt", "empty_caption", "no_caption", "bomb", "cut_short"])
def test_bad_samples_in_shards_under_both_policies(case: str, tmp_path: Path) -> None:
    from captioner.data import WebDataModule

    if case == "cut_short":  # a shard that ends in the middle of a member
        full = Path(write_shards(tmp_path, "train", 1, 3).replace("{00000..00000}", "00000"))
        full.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        shards, named = str(full), str(full)
    else:
        shards, named = bad_shard(tmp_path, case)
    for policy in ("skip", "error"):
        dm = WebDataModule(shards, shards, image_size=32, batch_size=4, num_workers=0,
                           min_freq=1, on_bad_sample=policy)  # fmt: skip
        batches = list(dm.val_dataloader())
        assert len(batches) == 1 and len(batches[0]["bad_samples"]) == 1
        if policy == "error":
            with pytest.raises(DataError, match="data.on_bad_sample=skip") as err:
                dm.transfer_batch_to_device(batches[0], torch.device("cpu"), 0)
            assert named in str(err.value)
        else:
            batch = dm.transfer_batch_to_device(batches[0], torch.device("cpu"), 0)
            assert len(dm.bad_samples) == 1 and named in next(iter(dm.bad_samples.skipped))
            assert len(batch["image_ids"]) >= 1  # the good samples still arrive


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
    script = Path(__file__).resolve().parents[1] / "scripts" / name
    return subprocess.run(
        [sys.executable, str(script), *args, f"hydra.run.dir={cwd / 'out'}"],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


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
    from captioner.tasks import validate_data

    paths = write_table(tmp_path / "data")
    second = json.loads(paths["train_file"].read_text().splitlines()[1])["image"]
    (tmp_path / "data" / second).write_bytes(b"not an image")
    cfg = compose_train(*data_overrides("jsonl", paths), output_dir=tmp_path / "out",
                        config_name="validate_data")  # fmt: skip
    report, _ = validate_data(cfg)
    (entry,) = report["bad"]
    assert entry["source"].endswith(f"{second} (listed at {paths['train_file']}:2)")


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
    from captioner.tasks import evaluate

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


def test_a_worker_without_shards_ends_instead_of_spinning(tmp_path: Path) -> None:
    from captioner.data.shards import ShardStream

    shards = write_shards(tmp_path, "train", 2, 2)
    stream = ShardStream([shards.replace("{00000..00001}", f"{i:05d}") for i in range(2)],
                         lambda image: image, shuffle=True, repeat=True)  # fmt: skip
    stream.rank, stream.world_size = 2, 3  # a third process: no shard is left for it
    result: list = []
    thread = threading.Thread(target=lambda: result.append(list(stream)), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert result == [[]]  # it finished, with nothing, instead of looping forever


def test_shards_under_ddp_need_epoch_samples(tmp_path: Path) -> None:
    from captioner.data import WebDataModule

    shards = write_shards(tmp_path, "train", 2, 2)
    dm = WebDataModule(shards, shards, image_size=32, num_workers=0, min_freq=1)
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=0, strategy=cpu)
    with pytest.raises(ConfigError, match="data.epoch_samples"):
        dm.train_dataloader()


def test_bad_samples_survive_lightning_input_conversion(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import HalfPrecision

    from captioner.data.policy import BadSample, BadSampleLog

    batch = {"images": torch.zeros(1, 3, 4, 4), "bad_samples": [BadSample("x.jpg", "broken")]}
    converted = HalfPrecision("bf16-true").convert_input(batch)  # what bf16-true runs do
    assert converted["images"].dtype == torch.bfloat16
    with pytest.raises(DataError, match="x.jpg: broken"):
        BadSampleLog("error").report(converted["bad_samples"])


def test_training_crops_keep_at_least_the_minimum_area(monkeypatch: pytest.MonkeyPatch) -> None:
    from captioner.data import transforms

    sizes = []
    real = transforms.TF.resized_crop

    def spy(pixels, top, left, height, width, size, interpolation, antialias):
        sizes.append((height, width))
        return real(pixels, top, left, height, width, size, interpolation, antialias=antialias)

    monkeypatch.setattr(transforms.TF, "resized_crop", spy)
    augment = TrainAugment(ImagePreprocess((32, 32)), min_area=0.8)
    for image in (Image.new("RGB", (100, 100)), Image.new("RGB", (300, 60))):
        for _ in range(200):
            augment(image)
        areas = [h * w / (image.height * image.width) for h, w in sizes[-200:]]
        assert min(areas) >= 0.79 and max(areas) <= 1.0


def test_evaluation_needs_the_test_data_only(tmp_path: Path) -> None:
    from captioner.tasks import evaluate

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
