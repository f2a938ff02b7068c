"""What a new user meets first: one-line errors before any work, `--help` that is fast and
true, and a first run that says what it wrote and what to type next."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.cli.app import check_overrides, ckpt_flag
from captioner.core.errors import ConfigError
from captioner.training.lit_module import warmup_cosine_schedule
from captioner.training.tasks import evaluate, train
from tests.helpers import ROOT, compose_train, write_table

SCRIPTS = ("train.py", "eval.py", "validate_data.py")
QUICK = (
    "experiment=shapes_tiny", "data.image_size=[32,48]", "data.num_train=64", "data.num_val=8",
    "data.num_test=8", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
)  # fmt: skip


def script(
    name: str, *args: str, cwd: Path, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
        cwd=cwd, timeout=600, env=env,
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The only line on stderr, of a run that stopped with status 2 and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


# --- typos and wrong values: one line, naming the fix ------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.trian_file=x.jsonl", "did you mean data.train_file (a key of data=jsonl)"),
        ("data.train_file=x.jsonl", "data=jsonl has it: add data=jsonl"),
        ("data.nm_train=3", "did you mean data.num_train?"),
        ("model.encoder.dimm=3", "not a key of model/encoder=vit; did you mean model.encoder.dim?"),
        ("modle=tiny", "did you mean model?"),
        ("model=tinyy", "did you mean model=tiny?"),
        ("+seed=3", "drop the '+' (seed=3)"),
        ("data.x=[a", "quote values"),
    ],
)
def test_a_typo_is_one_line_naming_the_closest_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        check_overrides("train", [override])


def test_a_typo_stops_the_script_before_any_work(tmp_path: Path) -> None:
    result = script("train.py", "data.trian_file=x.jsonl", cwd=tmp_path)
    line = one_line_error(result)
    assert line.startswith("config error: data.trian_file=x.jsonl") and "data.train_file" in line
    assert not (tmp_path / "logs").exists()  # no run folder: it stopped before starting


def test_eval_says_how_to_change_the_checkpoints_own_data_config() -> None:
    with pytest.raises(ConfigError, match=re.escape("+data.num_workers=0")):
        check_overrides("eval", ["data.num_workers=0"])
    with pytest.raises(ConfigError, match=re.escape("needs data=NAME (options: coco,")):
        check_overrides("validate_data", [])


def test_eval_takes_ckpt_as_the_other_scripts_do(tmp_path: Path) -> None:
    odd = tmp_path / "a run, it's=1" / "last.ckpt"
    for argv in (["--ckpt", str(odd)], [f"--ckpt={odd}"]):
        (override,) = ckpt_flag(argv)
        check_overrides("eval", [override])
        cfg = compose_train(override, output_dir=tmp_path, config_name="eval")
        assert cfg.ckpt_path == str(odd)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc': must be an integer"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5: must be an integer or null"),
        ("seed=abc", "seed='abc': must be an integer"),
        ("model.optimizer.lr=-1", "model.optimizer: Invalid learning rate: -1"),
        ("trainer.precision=bogus", "trainer.precision='bogus': must be 64 or 32"),
        ("data.batch_size=x", "data.batch_size='x': must be an integer"),
    ],
)
def test_a_wrong_value_is_named_before_training(override: str, named: str, tmp_path: Path) -> None:
    cfg = compose_train(*QUICK, override, output_dir=tmp_path)
    with pytest.raises(ConfigError, match=re.escape(named)):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_a_setting_lightning_refuses_at_start_up_is_one_line(tmp_path: Path) -> None:
    cfg = compose_train(*QUICK, "trainer.val_check_interval=1000", output_dir=tmp_path)
    with pytest.raises(ConfigError, match="the trainer settings: `val_check_interval` \\(1000\\)"):
        train(cfg)


def test_a_min_freq_that_empties_the_vocabulary_says_so(tmp_path: Path) -> None:
    paths = write_table(tmp_path / "data")
    data = [f"data.{key}={value}" for key, value in paths.items()]
    cfg = compose_train("data=jsonl", *data, "data.min_freq=1000", output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="lower data.min_freq"):
        train(cfg)


@pytest.mark.slow
def test_training_without_a_logger_drops_the_learning_rate_monitor(tmp_path: Path) -> None:
    cfg = compose_train(*QUICK, "~logger", "debug=fdr", output_dir=tmp_path)
    _, objects = train(cfg)  # LearningRateMonitor refuses a trainer without a logger
    assert objects["trainer"].global_step == 1


@pytest.mark.slow
def test_eval_takes_a_change_to_the_checkpoints_data_config(
    trained_run: Path, tmp_path: Path
) -> None:
    cfg = compose_train(f"ckpt_path={trained_run}", "+data.num_test=3", "+data.num_workers=0",
                        output_dir=tmp_path, config_name="eval")  # fmt: skip
    _, objects = evaluate(cfg)
    assert objects["datamodule"].num_workers == 0
    assert len(objects["model"].predictions["test"]) == 3


# --- Java -------------------------------------------------------------------------------------


def without_java() -> dict[str, str]:
    """The environment with a PATH that has no `java` (Python is run by its full path)."""
    return {**os.environ, "PATH": str(Path(sys.executable).parent)}


@pytest.mark.slow
def test_eval_without_java_scores_what_needs_no_java_and_says_so(
    trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = script("eval.py", "--ckpt", str(trained_run), "+data.num_test=4",
                    f"hydra.run.dir={run}", cwd=tmp_path, env=without_java())  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    shown = result.stdout + result.stderr
    said = [line for line in shown.splitlines() if "Java is not installed" in line]
    assert len(said) == 1 and "apt-get install default-jre-headless" in said[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test/BLEU-4", "test/ROUGE-L", "test/CIDEr"} <= set(metrics)
    assert "test/METEOR" not in metrics
    assert "Java is not installed" in (run / "eval.log").read_text()


@pytest.mark.slow
def test_training_without_java_validates_and_says_what_the_test_leaves_out(
    tmp_path: Path,
) -> None:
    result = script("train.py", *QUICK, "debug=fdr", f"hydra.run.dir={tmp_path / 'run'}",
                    cwd=tmp_path, env=without_java())  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    shown = result.stdout + result.stderr
    assert shown.count("Java is not installed: METEOR and SPICE are left out") == 1


# --- --help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_is_plain_and_lists_only_the_groups_used(name: str, tmp_path: Path) -> None:
    code = (
        f"import runpy, sys; sys.argv = [{name!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'scripts' / name)!r}, run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    print('torch imported:', 'torch' in sys.modules, 'exit:', done.code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.stderr == "" and result.stdout.endswith("torch imported: False exit: 0\n")
    listed = result.stdout.split("config groups")[1].split("keys of")[0]  # not the own keys
    groups = {line.split(":")[0].strip() for line in listed.splitlines() if line[:2] == "  "}
    assert "data" in groups and "hydra" not in groups
    assert ("model" in groups) == (name != "eval.py")  # eval takes the model from the checkpoint
    assert ("callbacks" in groups) == (name == "train.py")


# --- the first run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_training_says_what_it_wrote_and_what_to_type_next(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = script("train.py", *QUICK, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = result.stdout + result.stderr
    for noise in ("💡", "already configured with model summary", "v_num", "FLOPs"):
        assert noise not in shown
    table = result.stdout.split("headline metrics")[1].split(" steps, ")[0].splitlines()
    assert len(table) < 10 and all(len(line) <= 80 for line in table)  # not 56 rows, not cut
    assert "…" not in result.stdout
    ckpt = re.search(r"^checkpoint: (.+)$", result.stdout, re.MULTILINE).group(1)
    assert Path(ckpt).is_file() and Path(ckpt).parent == run / "checkpoints"
    log = (run / "train.log").read_text()
    assert "headline metrics" in log and f"checkpoint: {ckpt}" in log and "GPU available" in log
    # the printed command (the eval script beside the train script run) scores the checkpoint,
    # and eval.log holds what eval showed
    command = re.search(
        rf"^score it: +python ({re.escape(str(ROOT))}/scripts/eval.py .+)$", result.stdout, re.M
    )
    args = shlex.split(command.group(1))[1:]
    scored = script("eval.py", *args, f"hydra.run.dir={tmp_path / 'eval'}", cwd=ROOT)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "headline metrics" in (tmp_path / "eval" / "eval.log").read_text()


def test_loader_processes_default_to_the_cpus_this_process_has(tmp_path: Path) -> None:
    paths = write_table(tmp_path / "data")
    cfg = compose_train("data=jsonl", *(f"data.{k}={v}" for k, v in paths.items()),
                        output_dir=tmp_path)  # fmt: skip
    from hydra.utils import instantiate

    assert instantiate(cfg.data).num_workers == min(len(os.sched_getaffinity(0)), 8)


def test_a_warmup_longer_than_the_run_is_cut_to_a_tenth_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with caplog.at_level(logging.WARNING):
        schedule = warmup_cosine_schedule(optimizer, total_steps=30, warmup_steps=200)
    assert "warmup_steps=200 is over a quarter of this run's 30 steps" in caplog.text
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert max(rates) == pytest.approx(1.0, abs=0.01)  # the run reaches its learning rate
    assert rates.index(max(rates)) == 3 and rates[-1] < 0.1  # after 3 steps, then decays
    caplog.clear()
    warmup_cosine_schedule(optimizer, total_steps=1000, warmup_steps=200)
    assert caplog.text == ""  # a long run keeps the warm-up it was given


def test_training_resumes_from_a_run_folder_as_from_its_last_checkpoint(trained_run: Path) -> None:
    from captioner.training.resume import _resume_from

    assert _resume_from(str(trained_run), []) == trained_run / "checkpoints" / "last.ckpt"
