"""`scripts/eval.py`: a checkpoint scored on its test split, as papers score it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from captioner.core.errors import ConfigError
from captioner.core.inference import Captioner
from captioner.data import ShapesWorld
from captioner.metrics import GroundingMeter
from captioner.training.tasks import evaluate
from tests.helpers import ROOT, compose_train

PAPER_METRICS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


def eval_cfg(*overrides: str, output_dir: Path) -> DictConfig:
    return compose_train(*overrides, output_dir=output_dir, config_name="eval")


def test_scores_the_test_split_it_was_trained_on(ckpt: Path, tmp_path: Path) -> None:
    metrics, _ = evaluate(eval_cfg(f"ckpt_path={ckpt}", output_dir=tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for split in ("test", "test_comp"):  # shapes_tiny holds out a colour-shape pair
        names = {k.split("/")[1] for k in metrics if k.startswith(f"{split}/")}
        reliance = {
            "image_gain",
            "blank_gain",
            "distinct_captions",
            "top_caption_share",
            "vocab_used",
        }
        # no SPICE by default
        assert names == PAPER_METRICS | {"scene_acc", "loss", "grounding"} | reliance
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == list(range(12))  # data.num_test=12
    assert all(set(p) == {"image_id", "caption"} and p["caption"] for p in predictions)
    assert (tmp_path / "predictions_test_comp.json").is_file()

    # the captions are the inference API's, with the same decoding (beam 3 by default)
    world = ShapesWorld(image_size=(32, 48), max_objects=2, holdout_combos=[["red", "circle"]])
    images = [world.render(world.scene("test", i)) for i in range(12)]
    from PIL import Image

    expected = Captioner.from_checkpoint(ckpt).caption(
        [Image.fromarray(a) for a in images], beam_size=3, return_attention=True
    )
    assert [p["caption"] for p in predictions] == [c.text for c in expected]

    # grounding: the same figures as the meter fed from the inference API's attention
    meter = GroundingMeter(patch_size=8)
    for i, caption in enumerate(expected):
        scene = world.scene("test", i)
        words = [w for w in caption.words if w != "<eos>"]
        meter.update(caption.image_attention, scene.align(words), [o.box for o in scene.objects])
    assert meter.words > 0
    grounding = {f"test/{k}": v for k, v in meter.compute().items()}
    assert {k: metrics[k] for k in grounding} == pytest.approx(grounding, abs=1e-6)
    layers = {k.split("/")[-1] for k in metrics if k.startswith("test/grounding/pointing_acc/")}
    assert layers == {"mean", "layer0", "layer1"} | {
        f"layer{n}_head{h}" for n in (0, 1) for h in (0, 1)
    }


def test_data_and_decoding_can_be_overridden(ckpt: Path, tmp_path: Path) -> None:
    cfg = eval_cfg(
        f"ckpt_path={ckpt}", "data=shapes", "data.num_test=5", "decoding.beam_size=1",
        "decoding.max_length=4", output_dir=tmp_path,
    )  # fmt: skip
    metrics, _ = evaluate(cfg)
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == 5 and not (tmp_path / "predictions_test_comp.json").exists()
    assert all(len(p["caption"].split()) <= 4 for p in predictions)
    assert {k.split("/")[0] for k in metrics} == {"test"}


@pytest.mark.slow
def test_missing_or_wrong_settings_are_one_clear_line(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a checkpoint is required"):
        evaluate(eval_cfg(output_dir=tmp_path))
    with pytest.raises(ConfigError, match="decoding.max_length"):
        evaluate(eval_cfg(f"ckpt_path={ckpt}", "decoding.max_length=99", output_dir=tmp_path))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for args, message in (
        ([], "config error: a checkpoint is required: python scripts/eval.py --ckpt PATH"),
        ([f"ckpt_path={tmp_path / 'nope.ckpt'}"], "checkpoint error:"),
    ):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "eval.py"), *args, f"hydra.run.dir={tmp_path}"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_prints_the_paths_and_the_table(ckpt: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval.py"), f"ckpt_path={ckpt}",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"predictions written to {tmp_path / 'predictions.json'}" in result.stdout
    assert f"metrics written to {tmp_path / 'metrics.json'}" in result.stdout
    assert "headline metrics" in result.stdout and "METEOR" in result.stdout
