"""A checkpoint is data: nothing in it runs, whichever entry point reads it, and every file that
is not a usable checkpoint is refused in one line naming the file and the field."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioner.core.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    export,
    load_checkpoint,
    load_trusted_pickle,
)
from captioner.core.checkpoint.contents import _contents
from captioner.core.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from captioner.core.inference import Captioner
from captioner.data.stored import recorded_datamodule
from captioner.training.checkpoint_io import SafeCheckpointIO
from tests.helpers import QUIET, ROOT


class RunsCode:
    """Unpickling this object calls os.makedirs(marker): the shape of a malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def saved(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def shards_data(test_shards: str) -> dict[str, Any]:
    return {
        "_target_": "captioner.data.WebDataModule", "train_shards": "train.tar",
        "val_shards": "val.tar", "test_shards": test_shards, "image_size": [32, 48],
        "batch_size": 4, "num_workers": 0, "max_len": 32, "min_freq": 1,
    }  # fmt: skip


def hostile_data(route: str, marker: Path) -> dict[str, Any]:
    """A data config that ran code when handed to `hydra.utils.instantiate`."""
    if route == "pipe_shard":  # webdataset runs the command to read the shard
        return shards_data(f"pipe:mkdir {marker} && cat /dev/null")
    return {  # route == "nested_target": instantiate calls os.makedirs(marker)
        "_target_": "captioner.data.ShapesDataModule",
        "num_test": {"_target_": "os.makedirs", "name": str(marker)},
    }


def write_hostile(saved: dict[str, Any], route: str, folder: Path) -> tuple[Path, Path]:
    """A `.ckpt` that carries `route`, and the marker that appears if its code ever runs."""
    folder.mkdir(parents=True)
    marker, path = folder / "code_ran", folder / f"{route}.ckpt"
    state = {**saved, "captioner": dict(saved["captioner"])}
    if route == "pickle":
        state["captioner"]["tokenizer"] = RunsCode(marker)
    else:
        state["captioner"]["data"] = hostile_data(route, marker)
    torch.save(state, path)
    return path, marker


def run_script(name: str, *args: Any, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def refused_in_one_line(process: subprocess.Popen, expected: str) -> None:
    out, err = process.communicate(timeout=600)
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 2, (out[-2000:], err[-3000:])
    assert len(lines) == 1 and re.search(expected, lines[0]), err[-3000:]


@pytest.mark.parametrize("route", ["pipe_shard", "nested_target", "pickle"])
@pytest.mark.slow
def test_no_entry_point_runs_what_a_checkpoint_carries(
    route: str, saved: dict[str, Any], scenes_folder: Path, tmp_path: Path
) -> None:
    """caption.py, eval.py, export.py, train.py ckpt_path=, the inference API and the
    notebooks' way to the data, given each route to code execution: nothing runs, and each
    says so in one line with exit status 2."""
    path, marker = write_hostile(saved, route, tmp_path / "ckpt")
    reason = "refused.*makedirs" if route == "pickle" else "field 'data' is not valid"
    processes = [
        run_script("caption.py", "--ckpt", path, scenes_folder, cwd=tmp_path),
        run_script("eval.py", f"ckpt_path={path}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path),
        run_script("export.py", "--ckpt", path, "--out", tmp_path / "export", cwd=tmp_path),
        run_script(
            "train.py",
            "experiment=shapes_tiny",
            "data.image_size=[32,48]",
            f"ckpt_path={path}",
            f"hydra.run.dir={tmp_path}/train",
            *QUIET,
            cwd=tmp_path,
        ),
    ]
    for process in processes:
        refused_in_one_line(process, f"{re.escape(str(path))}.*{reason}")
    with pytest.raises(CheckpointError, match=reason):
        Captioner.from_checkpoint(path)
    with pytest.raises(CheckpointError, match=reason):
        recorded_datamodule(load_checkpoint(path))  # the notebooks' way to the data
    assert not marker.exists()
    assert not (tmp_path / "export").exists()
    if route == "pickle":  # the file really is malicious: trusting it runs the code
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.slow
def test_a_run_folder_is_read_as_safely_as_its_checkpoint(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    """A run folder is its `last.ckpt`, through the same safe reader: refused, named, not run."""
    path, marker = write_hostile(saved, "pickle", tmp_path / "run" / "checkpoints")
    last = path.rename(path.with_name("last.ckpt"))
    for read in (load_checkpoint, Captioner.from_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match=f"{re.escape(str(last))}: refused"):
            read(tmp_path / "run")
    process = run_script("export.py", "--ckpt", tmp_path / "run", "--out", "x", cwd=tmp_path)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 2 and "Traceback" not in err, err[-3000:]
    named, refused = err.splitlines()  # the file read, then why it is refused
    assert named.endswith(f"reading {last}") and refused.startswith(f"checkpoint error: {last}")
    assert not marker.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("route", ["pipe_shard", "nested_target"])
@pytest.mark.slow
def test_an_export_folder_carrying_code_is_refused(route: str, ckpt: Path, tmp_path: Path) -> None:
    folder, marker = tmp_path / "export", tmp_path / "code_ran"
    export(load_checkpoint(ckpt), folder)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["data"] = hostile_data(route, marker)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    evaluation = run_script(
        "eval.py", f"ckpt_path={folder}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path
    )
    refused_in_one_line(evaluation, f"{CONFIG_NAME}|{WEIGHTS_NAME}.*field 'data' is not valid")
    with pytest.raises(CheckpointError, match="data"):
        Captioner.from_checkpoint(folder)
    assert not marker.exists()


def test_training_never_records_shards_read_through_a_command(tmp_path: Path) -> None:
    from captioner.core.checkpoint import record_data_config
    from captioner.data.stored import check_data_config

    recorded = record_data_config(shards_data("pipe:aws s3 cp s3://bucket/test.tar -"))
    assert recorded["test_shards"] is None and recorded["train_shards"] == "train.tar"
    check_data_config(recorded)  # what training records is what loading accepts
    hidden = ["pip{e,e}:touch x", "{pipe:touch x,a.tar}", "http:/{/,/}host/a.tar", "-"]
    for remote in ("https://host/{0..9}.tar", ["ok.tar", " PIPE:cat x"], "s3://b/x.tar", *hidden):
        with pytest.raises(ValueError, match="data.test_shards: .* may name shards read through"):
            check_data_config(shards_data(remote))
        assert record_data_config(shards_data(remote))["test_shards"] is None
    with pytest.raises(ValueError, match="names over 1,000,000 shards"):
        check_data_config(shards_data("{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar"))


def test_the_only_unsafe_load_is_the_documented_escape_hatch() -> None:
    """No code path but `load_trusted_pickle` (export.py --trust-pickle) unpickles objects."""
    unsafe = []
    for folder in ("captioner", "scripts", "notebooks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".ipynb"):
                text = path.read_text()
                name = path.relative_to(ROOT)
                unsafe += [f"{name}: {m}" for m in re.findall(r"weights_only=False", text)]
                unsafe += [
                    f"{path.name}: {call}"
                    for call in re.findall(r"torch\.load\([^)]*\)", text)
                    if "weights_only=True" not in call and "weights_only=False" not in call
                ]
    assert unsafe == ["captioner/core/checkpoint/contents.py: weights_only=False"]


def test_the_escape_hatch_exports_a_trusted_pickle_safely(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    marker, path = tmp_path / "ran", tmp_path / "old.ckpt"
    torch.save({**saved, "hyper_parameters": {"extra": RunsCode(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        load_checkpoint(path)
    assert not marker.exists()
    export(load_trusted_pickle(path), tmp_path / "export")  # the user said they trust it
    assert marker.exists()
    assert load_checkpoint(tmp_path / "export").config.to_dict() == saved["captioner"]["config"]


@pytest.fixture(scope="module")
def scenes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    from captioner.data import ShapesWorld

    folder = tmp_path_factory.mktemp("scenes")
    world = ShapesWorld(image_size=(32, 48), max_objects=2)
    for i in range(2):
        Image.fromarray(world.render(world.scene("test", i))).save(folder / f"{i}.png")
    return folder


# --- files that are not usable checkpoints -------------------------------------------------


def tampered(saved: dict[str, Any], path: Path, change: Any) -> Path:
    """`saved` with `change(state)` applied, written to `path`."""
    state = {**saved, "captioner": json.loads(json.dumps(saved["captioner"]))}
    state["state_dict"] = dict(saved["state_dict"])
    change(state)
    torch.save(state, path)
    return path


def set_weight(name: str, value: torch.Tensor) -> Any:
    return lambda state: state["state_dict"].__setitem__(f"net.{name}", value)


def set_meta(part: str, key: str, value: Any) -> Any:
    """Sets `key` (dotted for a nested one, `decoder.depth`) of the captioner's `part`."""
    *parents, last = key.split(".")

    def change(state: dict[str, Any]) -> None:
        values = state["captioner"][part]
        for parent in parents:
            values = values[parent]
        values[last] = value

    return change


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    cases = {
        "empty.ckpt": (b"", "not a checkpoint: it is an empty file"),
        "text.ckpt": (b"hello world\n", "it is a text file"),
        "config.ckpt": (b'{"config": {}}', "it is JSON text"),
        "image.ckpt": (png, "it is a PNG image"),
        "noise.ckpt": (bytes(range(7, 256)) * 3, "binary file of an unknown kind"),
        "pickle.ckpt": (b"\x80\x02}q\x00X\x01", "written in PyTorch's legacy format"),
        "archive.ckpt": (b"PK\x03\x04" + bytes(40), "not a readable PyTorch checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{name}: .*{message}") as info:
            load_checkpoint(tmp_path / name)
        assert "weights_only=False" not in str(info.value) and "--trust-pickle" not in str(
            info.value
        )


def test_a_checkpoint_is_checked_before_anything_is_built(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    config = saved["captioner"]["config"]
    dim, vocab = config["decoder"]["dim"], config["vocab_size"]
    cases = {
        "shape": (set_weight("decoder.norm.weight", torch.ones(dim + 1)), "has shape"),
        "vocab": (set_meta("config", "vocab_size", vocab + 1), "holds .* words but .*vocab_size"),
        "huge_vocab": (set_meta("config", "vocab_size", 10**12), "vocab_size"),
        "max_len": (set_meta("config", "max_len", config["max_len"] + 4), "has shape"),
        "depth": (set_meta("config", "decoder.depth", 10**7), "decoder.depth is 10000000"),
        "nan": (set_weight("decoder.norm.bias", torch.full((dim,), math.nan)), "NaN"),
        "integers": (set_weight("decoder.norm.bias", torch.zeros(dim, dtype=torch.long)), "int64"),
        "image_size": (set_meta("config", "encoder.image_size", ["a", 48]), "'config'.*image_size"),
        "mlp_ratio": (
            set_meta("config", "decoder.mlp_ratio", math.nan),
            "mlp_ratio must be a positive number, got nan",
        ),
        "itos": (set_meta("tokenizer", "itos", "abc"), "'tokenizer'.*itos"),
        "std": (set_meta("preprocess", "std", [0.5, 0.0, 0.5]), "'preprocess'.*std"),
        "size": (set_meta("preprocess", "image_size", [64, 64]), "'preprocess'.*does not match"),
        "wide": (set_meta("config", "encoder.dim", 2**62), "cannot be built"),
        "wider": (set_meta("config", "encoder.dim", 2**70), "cannot be built"),
        "mlp": (set_meta("config", "encoder.mlp_ratio", 1e300), "cannot be built"),
        "mean": (set_meta("preprocess", "mean", [10**400, 0.5, 0.5]), "'preprocess'.*mean"),
        "tiny_std": (set_meta("preprocess", "std", [1e-320] * 3), "'preprocess'.*std"),
        "float8": (
            set_weight("decoder.norm.bias", torch.zeros(dim, dtype=torch.float8_e4m3fn)),
            "float8_e4m3fn",
        ),
        "sparse": (set_weight("decoder.norm.bias", torch.zeros(dim).to_sparse()), "sparse"),
        "meta": (set_weight("decoder.norm.bias", torch.zeros(dim, device="meta")), "no values"),
    }
    for name, (change, message) in cases.items():
        path = tampered(saved, tmp_path / f"{name}.ckpt", change)
        with pytest.raises(CheckpointError, match=rf"{name}\.ckpt: .*{message}"):
            load_checkpoint(path)
    deep: Any = [32, 48]
    for _ in range(5000):
        deep = [deep]
    for part, key in (("preprocess", "image_size"), ("config", "image_size"), ("data", "seed")):
        meta = json.loads(json.dumps(saved["captioner"]))
        meta[part][key] = deep
        with pytest.raises(CheckpointError, match=rf"deep.ckpt: field '{part}'"):
            _contents(meta, weights_of(saved), Path("deep.ckpt"), "lightning")


def weights_of(saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in saved["state_dict"].items()}


def test_an_export_is_checked_as_a_checkpoint_is(ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    export(load_checkpoint(ckpt), folder)
    text = (folder / CONFIG_NAME).read_text()
    version = '"format_version": 1'
    cases = [
        (version, '"format_version": 2', "newer captioner"),
        (version, '"format_version": "99"', "must be 1"),
        (version, '"format_version": true', "must be 1"),
        ("{\n  " + version, '{"config": 1, ' + version, "duplicate key 'config'"),
        ('"mean": [', '"mean": [' + "9" * 400 + ", ", "'preprocess'"),
    ]
    for old, new, message in cases:
        (folder / CONFIG_NAME).write_text(text.replace(old, new))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(folder)
    (folder / CONFIG_NAME).write_text(text)
    with pytest.raises(ConfigError, match="cannot be written there"):
        export(load_checkpoint(folder), folder / CONFIG_NAME / "sub")  # a file in the way


def test_lightning_never_restores_paths_outside_the_checkpoint_folder(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    """ModelCheckpoint deletes the files its restored state records; it restores a state
    without `dirpath` as its own, and deletes through fsspec what names a protocol."""
    victim = tmp_path / "victim"
    victim.mkdir()
    name = next(k for k in saved["callbacks"] if "val/CIDEr" in k)
    folder = saved["callbacks"][name]["dirpath"]
    forged = {
        "no_folder": {"best_model_path": f"local://{victim}"},
        "protocol": {"dirpath": folder, "best_model_path": f"local://{folder}/x.ckpt"},
        "outside": {"dirpath": folder, "best_k_models": {f"{folder}/../../victim": 1.0}},
        "malformed": 7,
    }
    for case, state in forged.items():
        path = tmp_path / f"{case}.ckpt"
        torch.save({**saved, "callbacks": {**saved["callbacks"], name: state}}, path)
        with pytest.raises(CheckpointError, match=f"{case}.ckpt: the state of callback"):
            SafeCheckpointIO().load_checkpoint(path)
    untouched = tmp_path / "untouched.ckpt"
    torch.save(saved, untouched)
    SafeCheckpointIO().load_checkpoint(untouched)  # what training writes is accepted
    assert victim.is_dir()


@pytest.mark.slow
def test_export_refuses_weights_that_would_caption_garbage(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    dim = saved["captioner"]["config"]["decoder"]["dim"]
    path = tampered(
        saved, tmp_path / "nan.ckpt", set_weight("decoder.norm.bias", torch.full((dim,), math.inf))
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), "--ckpt", str(path), "--out",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "NaN or infinite" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_vocabulary_word_cannot_forge_output_lines(saved: dict[str, Any], tmp_path: Path) -> None:
    words = saved["captioner"]["tokenizer"]["itos"]
    forged = [*words[:4], "red\nfake.png\tcaption", "\x1b[2J", "\u202eevil", *words[7:]]
    path = tampered(saved, tmp_path / "forged.ckpt", set_meta("tokenizer", "itos", forged))
    itos = load_checkpoint(path).tokenizer["itos"]
    assert itos[4:7] == ["red\\nfake.png\\tcaption", "\\x1b[2J", "\\u202eevil"]
    assert all(word.isprintable() for word in itos)


# Values a forged metadata field may hold: anything JSON or a pickle of plain values can.
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_every_malformed_metadata_field_is_one_named_error(
    saved: dict[str, Any], data: st.DataObject
) -> None:
    """A metadata field replaced or removed, at any depth: the checkpoint loads, or one
    `CheckpointError` names the file; never another exception."""
    meta = json.loads(json.dumps(saved["captioner"]))
    weights = weights_of(saved)
    node: Any = meta
    keys = data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=3))
    for depth, k in enumerate(keys):
        if not isinstance(node, dict | list) or not node:
            break
        key = sorted(node)[k % len(node)] if isinstance(node, dict) else k % len(node)
        if depth == len(keys) - 1 or not isinstance(node[key], dict | list):
            if data.draw(st.booleans()) and isinstance(node, dict):
                del node[key]
            else:
                node[key] = data.draw(VALUES)
            break
        node = node[key]
    try:
        _contents(meta, weights, Path("fuzzed.ckpt"), "lightning")
    except CheckpointError as err:
        assert str(err).startswith("fuzzed.ckpt") and "\n" not in str(err)


def test_a_file_that_reads_two_ways_or_nests_deep_is_refused(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    """A legacy-format pickle with a zip appended is read as the pickle by torch.load and as the
    zip by Lightning's loader for sharded strategies; a pickle nested a million deep crashes
    torch's safe unpickler. Both are refused before either reader runs."""
    marker = tmp_path / "ran"
    payload = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, "x": RunsCode(marker)}, payload)
    polyglot = tmp_path / "polyglot.ckpt"
    torch.save(saved, polyglot, _use_new_zipfile_serialization=False)
    polyglot.write_bytes(polyglot.read_bytes() + payload.read_bytes())
    with pytest.raises(CheckpointError, match="polyglot.ckpt: written in PyTorch's legacy format"):
        load_checkpoint(polyglot)
    deep: Any = 1
    for _ in range(150):
        deep = (deep,)
    nested = tmp_path / "nested.ckpt"
    torch.save({**saved, "extra": deep}, nested)
    with pytest.raises(CheckpointError, match="nested.ckpt: .*data.pkl nests values over 100"):
        load_checkpoint(nested)
    assert not marker.exists()


def test_weights_that_claim_more_than_they_store_are_refused(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    dim = saved["captioner"]["config"]["decoder"]["dim"]
    expanded = set_weight("decoder.norm.bias", torch.full((1,), 0.01).expand(dim))
    path = tampered(saved, tmp_path / "expanded.ckpt", expanded)
    with pytest.raises(CheckpointError, match="stores fewer values than its shape"):
        load_checkpoint(path)
    long_index = set_weight("encoder.blocks." + "1" * 5000 + ".x", torch.zeros(1))
    path = tampered(saved, tmp_path / "index.ckpt", long_index)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(path)
    path = tampered(saved, tmp_path / "seed.ckpt", lambda state: state.update(run_seed="abc"))
    from captioner.training.lit_module import CaptionerLitModule

    module = SimpleNamespace(run_seed=0)  # what on_load_checkpoint reads of the module
    with pytest.raises(CheckpointError, match="run_seed 'abc' is not a seed"):
        CaptionerLitModule.on_load_checkpoint(module, torch.load(path, weights_only=True))


def test_a_link_in_the_checkpoint_folder_does_not_lead_lightning_out_of_it(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    name = next(k for k in saved["callbacks"] if "val/CIDEr" in k)
    folder = Path(saved["callbacks"][name]["dirpath"])
    (tmp_path / "victim").mkdir()
    link = folder / f"link-{tmp_path.name}"
    link.symlink_to(tmp_path / "victim")
    try:
        state = {**saved["callbacks"][name], "best_k_models": {f"{link}/f.ckpt": -1.0}}
        path = tmp_path / "linked.ckpt"
        torch.save({**saved, "callbacks": {**saved["callbacks"], name: state}}, path)
        with pytest.raises(CheckpointError, match="outside its checkpoint folder"):
            SafeCheckpointIO().load_checkpoint(path)
    finally:
        link.unlink()
