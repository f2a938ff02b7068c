"""No run loses or double-counts data silently: one id per image, no training over another
run's checkpoints, and a split with nothing usable in it stops the run in one line."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from captioner.core.checkpoint import export, load_checkpoint
from captioner.core.errors import CheckpointError, ConfigError, DataError
from captioner.data.policy import BadSample
from captioner.data.records import read_coco, read_flickr, read_table
from captioner.data.shards import sample_captions
from captioner.training.tasks import evaluate, train, validate_data
from tests.helpers import (
    QUIET,
    TINY_IMAGE_MODEL,
    compose_train,
    image_bytes,
    scenes,
    write_coco,
    write_flickr,
    write_shards,
    write_table,
    write_tar,
    write_webdataset,
)

TINY_RUN = (
    "experiment=shapes_tiny", "data.num_train=16", "data.batch_size=8", "data.num_val=8",
    "data.num_test=8", "trainer.max_epochs=1", "test=false", *QUIET,
)  # fmt: skip


def jsonl_with_ids(folder: Path, ids: list[int]) -> Path:
    """A JSONL split of distinct images, the i-th under `ids[i]`."""
    paths = write_table(folder)
    rows = [json.loads(line) for line in paths["train_file"].read_text().splitlines()]
    path = folder / "dup.jsonl"
    lines = [json.dumps({**row, "id": i}) for row, i in zip(rows, ids, strict=False)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_images_under_one_id_are_an_error(tmp_path: Path) -> None:
    path = jsonl_with_ids(tmp_path, [0, 0, 1, 1, 2, 2])
    with pytest.raises(
        DataError,
        match=r"dup\.jsonl:2: image .*train1\.png has id 0, already the id of image "
        r".*train0\.png at .*dup\.jsonl:1",
    ):
        read_table(path, None, "skip")
    cfg = compose_train(
        "data=jsonl", f"data.train_file={path}", f"data.val_file={path}",
        output_dir=tmp_path / "report", config_name="validate_data",
    )  # fmt: skip
    with pytest.raises(DataError, match="already the id of image"):
        validate_data(cfg)


def test_one_image_is_one_record_however_its_path_is_written(tmp_path: Path) -> None:
    paths = write_coco(tmp_path / "coco")
    spellings = (("pics/a.png", "a"), ("./pics/a.png", "b"))
    rows = [{"image": name, "caption": caption} for name, caption in spellings]
    table = tmp_path / "coco" / "same.jsonl"
    (tmp_path / "coco" / "pics").mkdir()
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (record,), _ = read_table(table, None, "error")
    assert record.captions == ("a", "b") and record.image_id == "pics/a.png"
    coco = json.loads(paths["test_json"].read_text())
    coco["images"].append({**coco["images"][0], "id": 999})  # the same file under a new id
    paths["test_json"].write_text(json.dumps(coco))
    with pytest.raises(DataError, match="is listed again \\(id 999\\), first at"):
        read_coco(paths["test_json"], paths["image_dir"], "skip")


def test_shards_that_reuse_a_key_are_scored_once_each_or_refused(
    trained_run: Path, tmp_path: Path
) -> None:
    """Two shards written apart both hold key 000000000, and one shard holds a key twice (not
    side by side): evaluation names the clash instead of scoring one image and dropping the
    other."""
    first = write_shards(tmp_path / "a", "test", 1, 2).replace("{00000..00000}", "00000")
    second = write_shards(tmp_path / "b", "test", 1, 2).replace("{00000..00000}", "00000")
    (one, captions), (other, _) = scenes("test", 2)
    caption = json.dumps({"caption": captions}).encode()
    repeated = write_tar(tmp_path / "repeated.tar", [
        ("s0.jpg", image_bytes(one)), ("s0.json", caption),
        ("s1.jpg", image_bytes(other)), ("s1.json", caption),
        ("s0.jpg", image_bytes(other)), ("s0.json", caption),
    ])  # fmt: skip

    def evaluate_on(*shards: str | Path) -> dict:
        cfg = compose_train(
            f"ckpt_path={trained_run}/checkpoints/last.ckpt", "data=webdataset",
            f"data.train_shards={first}", f"data.val_shards={first}",
            f"data.test_shards=[{','.join(map(str, shards))}]", "data.num_workers=0",
            output_dir=tmp_path / "eval" / str(len(shards)), config_name="eval",
        )  # fmt: skip
        return evaluate(cfg)[1]["model"].predictions

    for clash, ids in (((first, second), "'000000000'"), ((repeated,), "'s0'")):
        with pytest.raises(DataError, match=f"image id {ids} names two images of the test split"):
            evaluate_on(*clash)
    assert len(evaluate_on(first)["test"]) == 2


def test_ids_of_both_kinds_are_written_and_data_keys_may_refer_to_paths(
    trained_run: Path, tmp_path: Path
) -> None:
    """One image under an integer id, one under its path: both in predictions.json (ints
    first); and a `data.` key given as `${paths...}` resolves as in training."""
    paths = write_table(tmp_path)
    rows = [json.loads(line) for line in paths["test_file"].read_text().splitlines()][:2]
    (tmp_path / "eval").mkdir()
    mixed = [json.dumps({**rows[0], "id": 7}), json.dumps(rows[1])]
    (tmp_path / "eval" / "mixed.jsonl").write_text("\n".join(mixed) + "\n")
    cfg = compose_train(
        f"ckpt_path={trained_run}/checkpoints/last.ckpt", "data=jsonl",
        f"data.train_file={paths['train_file']}", f"data.val_file={paths['val_file']}",
        "data.test_file=${paths.output_dir}/mixed.jsonl", f"data.image_root={tmp_path}",
        "data.num_workers=0", output_dir=tmp_path / "eval", config_name="eval",
    )  # fmt: skip
    evaluate(cfg)
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [7, rows[1]["image"]]


def test_a_run_folder_with_checkpoints_is_not_trained_over(tmp_path: Path) -> None:
    train(compose_train(*TINY_RUN, output_dir=tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ConfigError, match="already holds the checkpoints of a run.*ckpt_path=last"):
        train(compose_train(*TINY_RUN, output_dir=tmp_path))
    assert last.read_bytes() == before
    other = tmp_path / "elsewhere.ckpt"
    other.write_bytes(before)  # a checkpoint from outside this folder: would replace its own
    with pytest.raises(ConfigError, match="already holds"):
        train(compose_train(*TINY_RUN, f"ckpt_path={other}", output_dir=tmp_path))

    # what a writer killed mid-write left is cleared when the run resumes
    stale = tmp_path / "checkpoints" / ".last.ckpt.k1ll3d.tmp"
    stale.write_bytes(before[:100])
    train(compose_train(*TINY_RUN, "trainer.max_epochs=2", "ckpt_path=last", output_dir=tmp_path))
    assert not stale.exists()
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_resuming_needs_the_architecture_and_batches_it_was_trained_with(tmp_path: Path) -> None:
    train(compose_train(*TINY_RUN, output_dir=tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wider = compose_train(
        *TINY_RUN, "model.decoder.dim=96", f"ckpt_path={ckpt}", output_dir=tmp_path / "a"
    )
    with pytest.raises(
        ConfigError, match=r"was trained with model.decoder.dim=64 \(this run: 96\)"
    ):
        train(wider)
    longer = compose_train(
        *TINY_RUN, "model.max_len=40", f"ckpt_path={ckpt}", output_dir=tmp_path / "b"
    )
    with pytest.raises(ConfigError, match=r"model.max_len=32 \(this run: 40\)"):
        train(longer)
    resized = compose_train(
        *TINY_RUN,
        "data.batch_size=4",
        "trainer.max_epochs=2",
        f"ckpt_path={ckpt}",
        output_dir=tmp_path / "run",
    )
    with pytest.raises(ConfigError, match="trained with data.batch_size = 8, this run has 4"):
        train(resized)
    export(load_checkpoint(ckpt), tmp_path / "export")
    weights = tmp_path / "export" / "model.safetensors"
    exported = compose_train(*TINY_RUN, f"ckpt_path={weights}", output_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="an export holds the weights only"):
        train(exported)


def test_a_resumed_run_trains_on_what_its_checkpoint_says_or_stops(tmp_path: Path) -> None:
    """A training split that is not the checkpoint's, a place in the data beyond an epoch, or
    a damaged or forged training state: one line before any training, never a run that
    trains on nothing (or the wrong data) and succeeds."""
    with pytest.raises(ConfigError, match="has 4 samples: less than one batch of data.batch_s"):
        train(compose_train(*TINY_RUN, "data.num_train=4", output_dir=tmp_path / "small"))
    train(compose_train(*TINY_RUN, output_dir=tmp_path / "run"))
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    more = compose_train(
        *TINY_RUN, "data.num_train=24", f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt",
        output_dir=tmp_path / "more",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="trained on 16 training samples, this run has 24"):
        train(more)

    def forged(name: str, change: Callable[[dict], None]) -> DictConfig:
        state = copy.deepcopy(saved)
        change(state)
        torch.save(state, tmp_path / f"{name}.ckpt")
        run = (f"ckpt_path={tmp_path}/{name}.ckpt", "trainer.max_epochs=3")
        return compose_train(*TINY_RUN, *run, output_dir=tmp_path / name)

    position = saved["ShapesDataModule"]
    cases = {
        "far": (lambda s: s["ShapesDataModule"].update(batches=10**6), ConfigError, "batches into"),
        "negative": (lambda s: s["ShapesDataModule"].update(batches=-3), CheckpointError, "place"),
        "seed": (lambda s: s["ShapesDataModule"].update(seed="abc"), CheckpointError, "place"),
        "optimizer": (
            lambda s: s["optimizer_states"][0].update(param_groups=[]),
            CheckpointError,
            r"optimizer.ckpt: training could not be restored from it \(ValueError",
        ),
        "loops": (
            lambda s: s["loops"]["fit_loop"].update(epoch_progress="x"),
            CheckpointError,
            "loops.ckpt: training could not be restored",
        ),
        "adam": (  # fails in the first step, not while restoring
            lambda s: s["optimizer_states"][0]["state"][0].update(exp_avg=torch.zeros(3)),
            CheckpointError,
            r"adam.ckpt: training could not be restored from it \(RuntimeError",
        ),
    }
    for name, (change, error, message) in cases.items():
        with pytest.raises(error, match=message):
            train(forged(name, change))
    assert saved["ShapesDataModule"] == position


def corrupt_images(folder: Path, split: str) -> None:
    for image in (folder / "pics").glob(f"{split}*.png"):
        image.write_bytes(b"not an image")


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_with_nothing_usable_stops_the_run(split: str, tmp_path: Path) -> None:
    """Every image of the split unreadable, with data.on_bad_sample=skip: one line naming the
    split, before an untrained model is saved as if it had been trained."""
    paths = write_table(tmp_path / "data")
    corrupt_images(tmp_path / "data", split)
    cfg = compose_train(
        "data=jsonl", *TINY_IMAGE_MODEL, *QUIET, f"data.train_file={paths['train_file']}",
        f"data.val_file={paths['val_file']}", "data.on_bad_sample=skip", "data.num_workers=0",
        "data.batch_size=4", "trainer.max_epochs=1", "test=false", output_dir=tmp_path / "run",
    )  # fmt: skip
    message = "every training sample of epoch 0" if split == "train" else "every image of the val"
    with pytest.raises(DataError, match=f"{message}.*unusable and skipped"):
        train(cfg)
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_a_key_or_column_named_twice_is_an_error_not_last_wins(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    jsonl = tmp_path / "dup_key.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "a dog", "caption": "a cat"}\n')
    with pytest.raises(DataError, match=r"dup_key\.jsonl:1: key 'caption' appears twice"):
        read_table(jsonl, None, "error")
    table = tmp_path / "dup_column.csv"
    table.write_text("image,caption,caption\na.png,a dog,a cat\n")
    with pytest.raises(
        DataError, match=r"dup_column\.csv:1: column\(s\) \['caption'\] appear twice"
    ):
        read_table(table, None, "error")
    raw = {"__url__": "s.tar", "__key__": "k", "json": b'{"caption": "a", "caption": "b"}'}
    assert sample_captions(raw) == BadSample(
        "s.tar/k.json", "duplicate key 'caption' in one object"
    )


def test_a_stream_resumed_past_its_end_does_not_train_on_nothing(tmp_path: Path) -> None:
    shards = write_webdataset(tmp_path / "shards")
    run = (
        "data=webdataset", *TINY_IMAGE_MODEL, *QUIET, "data.num_workers=0", "data.batch_size=2",
        f"data.train_shards='{shards['train_shards']}'", "test=false",
        f"data.val_shards='{shards['val_shards']}'",
    )  # fmt: skip
    train(compose_train(*run, "trainer.max_epochs=1", output_dir=tmp_path / "run"))
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    saved["WebDataModule"]["batches"] = 10**6  # as if the shards had shrunk since
    torch.save(saved, tmp_path / "past.ckpt")
    resumed = compose_train(
        *run, "trainer.max_epochs=2", f"ckpt_path={tmp_path}/past.ckpt", output_dir=tmp_path / "b"
    )
    with pytest.raises(DataError, match="epoch 1 had no training batch"):
        train(resumed)


def test_data_configs_refuse_what_would_hang_or_read_twice(tmp_path: Path) -> None:
    from captioner.data import ShapesDataModule, Tokenizer

    with pytest.raises(ConfigError, match="captions_per_image must be between 1 and 100"):
        ShapesDataModule(captions_per_image=10**18)
    with pytest.raises(ConfigError, match="data.seed must be in"):
        ShapesDataModule(seed=2**64)
    with pytest.raises(ConfigError, match="no word occurs 5 or more times"):
        Tokenizer.build(["a dog", "a cat"], min_freq=5)
    paths = write_flickr(tmp_path)
    listing = paths["test_list"]
    listing.write_text(listing.read_text() + listing.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"Images.txt:5: image '1000_test.jpg' is listed again"):
        read_flickr(paths["captions_file"], paths["image_dir"], listing, "error")
