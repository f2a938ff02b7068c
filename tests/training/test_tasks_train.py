"""Training end to end: the loss, overfitting one batch, every experiment, the CLI, errors."""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from captioner.cli.config import CONF_DIR
from captioner.core.errors import ConfigError
from captioner.data import ShapesDataModule
from captioner.training.lit_module import CaptionerLitModule, warmup_cosine_schedule
from captioner.training.tasks import train
from tests.helpers import EXPERIMENTS, ROOT

TINY_ARCH = dict(
    image_size=32, patch_size=8, encoder_dim=32, encoder_depth=1, encoder_heads=2,
    decoder_dim=32, decoder_depth=2, decoder_heads=2, max_len=24,
)  # fmt: skip


@pytest.fixture(scope="module")
def shapes_batch() -> tuple[ShapesDataModule, dict]:
    torch.manual_seed(0)
    dm = ShapesDataModule(image_size=32, num_train=64, num_val=8, num_test=8, batch_size=8)
    return dm, next(iter(dm.train_dataloader()))


def lit_module(dm: ShapesDataModule, **kwargs: object) -> CaptionerLitModule:
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0)
    preprocess = dm.preprocess.to_dict()
    return CaptionerLitModule(dm.tokenizer, preprocess, optimizer, **{**TINY_ARCH, **kwargs})


def test_loss_shifts_labels_and_ignores_padding(shapes_batch: tuple) -> None:
    dm, batch = shapes_batch
    module = lit_module(dm).eval()
    tokens = batch["tokens"]
    logits = module.net(batch["images"], tokens[:, :-1])
    targets = tokens[:, 1:]
    keep = targets != dm.tokenizer.pad_id
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(module.loss(batch), expected)
    padded = {**batch, "tokens": torch.cat([tokens, torch.zeros_like(tokens[:, :3])], dim=1)}
    torch.testing.assert_close(module.loss(padded), expected)


def test_one_batch_can_be_overfitted(shapes_batch: tuple) -> None:
    dm, batch = shapes_batch
    module = lit_module(dm).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = module.loss(batch)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 < first
    captions = [
        dm.tokenizer.decode(row.tolist())
        for row in module.evaluator.generate(batch["images"]).tokens
    ]
    expected = [dm.tokenizer.decode(row[1:].tolist()) for row in batch["tokens"]]
    assert captions == expected
    assert module.training  # generation restored the mode


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine_schedule(opt, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    rates = []
    for _ in range(110):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert rates[0] < rates[5] < rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[-1] == pytest.approx(0.1, abs=0.01)


def test_label_smoothing_is_validated(shapes_batch: tuple) -> None:
    with pytest.raises(ConfigError, match="model.label_smoothing"):
        lit_module(shapes_batch[0], label_smoothing=1.5)


@pytest.mark.slow
def test_compiled_training_loss_matches_eager(shapes_batch: tuple) -> None:
    """model.compile=true: the same loss and gradients as eager, through a compiled graph."""
    dm, batch = shapes_batch
    modules = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        modules.append(lit_module(dm, compile=compile_).train())
    eager, compiled = modules
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    losses = [module.loss(batch) for module in modules]
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # dynamo did compile it
    torch.testing.assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # evaluation runs eager: the same generated captions
    assert torch.equal(
        eager.evaluator.generate(batch["images"]).tokens,
        compiled.evaluator.generate(batch["images"]).tokens,
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.slow
def test_every_experiment_runs_with_fast_dev_run(
    experiment: str, train_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = train_cfg(f"experiment={experiment}", "debug=fdr")
    metrics, objects = train(cfg)
    assert objects["metrics_path"] == tmp_path / "metrics.json"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/loss", "test/BLEU-4", "test/CIDEr", "test/scene_acc"):
        assert key in saved and saved[key] == pytest.approx(metrics[key])


def test_validation_logs_attention_samples(
    train_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    overrides = (
        "experiment=shapes_tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1", "test=false", "logger=tensorboard",
        "callbacks.attention_samples.num_images=3",
    )  # fmt: skip
    train(train_cfg(*overrides))
    folder = tmp_path / "attention"
    pngs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert pngs == ["step_0000004/0.png", "step_0000004/1.png", "step_0000004/2.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.*")).parent))
    events.Reload()
    assert events.Tags()["images"] == ["attention/0", "attention/1", "attention/2"]
    assert events.Images("attention/0")[0].step == 4


@pytest.mark.slow
def test_short_run_saves_checkpoints_that_rebuild_the_model(
    train_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    overrides = (
        "experiment=shapes_tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "logger=csv",
    )  # fmt: skip
    metrics, objects = train(train_cfg(*overrides))
    assert {"test/scene_acc", "test_comp/scene_acc", "test/CIDEr", "test/BLEU-4"} <= set(metrics)
    assert 0.0 <= metrics["test/scene_acc"] <= 1.0
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists()
    assert (tmp_path / "csv").is_dir()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # no arbitrary objects
    saved = ckpt["captioner"]
    module = objects["model"]
    assert saved["config"] == module.config.to_dict()
    assert saved["tokenizer"] == module.tokenizer.to_dict()
    from captioner.core.models import CaptionerConfig, CaptionerModel

    rebuilt = CaptionerModel(CaptionerConfig.from_dict(saved["config"]))
    weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    rebuilt.load_state_dict(weights)
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.tensor([[1, 5, 6], [1, 7, 8]])
    module.net.eval()
    torch.testing.assert_close(rebuilt.eval()(images, tokens), module.net(images, tokens))

    best = objects["trainer"].checkpoint_callback.best_model_path
    again, _ = train(train_cfg(*overrides, "train=false", f"ckpt_path={best}"))
    assert again["test/loss"] == pytest.approx(metrics["test/loss"])  # the given weights


def test_config_error_reaches_the_user(train_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match="model.encoder.patch_size=7"):
        train(train_cfg("experiment=shapes_tiny", "model.encoder.patch_size=7"))
    with pytest.raises(ConfigError, match="data.max_objects"):
        train(train_cfg("experiment=shapes_tiny", "data.max_objects=12"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_respects_run_dir_and_prints_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "experiment=shapes_tiny", "debug=fdr", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "metrics.json").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()  # the composed config is kept
    assert str(run_dir / "metrics.json") in result.stdout.replace("\n", "")
    assert "headline metrics" in result.stdout and "scene_acc" in result.stdout


@pytest.mark.slow
def test_cli_config_error_is_one_clear_line(tmp_path: Path) -> None:
    result = run_cli(
        "experiment=shapes_tiny", "model.encoder.heads=5", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert (
        "config error: model.encoder.dim=64 is not divisible by model.encoder.heads=5"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("group", ["experiment", "model", "data", "trainer"])
def test_an_unknown_config_name_lists_the_valid_ones(group: str, tmp_path: Path) -> None:
    result = run_cli(f"{group}=no_such_{group}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert len(choices) >= 2
    assert result.stderr == (
        f"config error: {group}=no_such_{group}: no such option; (options: {', '.join(choices)})\n"
    )


def test_attention_supervision_moves_attention_onto_the_named_objects(shapes_batch: tuple) -> None:
    dm, batch = shapes_batch
    torch.manual_seed(0)
    module = lit_module(dm, attention_supervision=1.0).train()
    plain = lit_module(dm).train()
    plain.load_state_dict(module.state_dict())
    caption_loss, before = module.supervised_loss(batch)
    torch.testing.assert_close(caption_loss, plain.loss(batch))  # one pass gives both
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(60):
        caption_loss, grounding = module.supervised_loss(batch)
        optimizer.zero_grad()
        (caption_loss + grounding).backward()
        optimizer.step()
    assert grounding.item() < 0.4 * before.item()
    # the same steps on the caption loss alone leave the grounding loss where it was
    optimizer = torch.optim.AdamW(plain.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(60):
        loss = plain.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert plain.supervised_loss(batch)[1].item() > 0.8 * before.item()


def test_attention_supervision_needs_data_that_knows_the_objects(shapes_batch: tuple) -> None:
    dm, batch = shapes_batch
    module = lit_module(dm, attention_supervision=0.5)
    without = {k: v for k, v in batch.items() if k != "word_boxes"}
    with pytest.raises(ConfigError, match="model.attention_supervision=0"):
        module.supervised_loss(without)
    with pytest.raises(ConfigError, match="attention_supervision must be >= 0"):
        lit_module(dm, attention_supervision=-1.0)
