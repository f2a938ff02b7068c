"""Is the model reading the image? The image gain, caption diversity and the warning for a
decoder that writes the same words whatever it sees."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from captioner.core.generation import DecodingOptions
from captioner.core.models import CaptionerModel
from captioner.training.evaluation import SplitEvaluator, image_share
from captioner.training.tasks import evaluate, train
from tests.helpers import compose_train, tiny_config

SHORT_RUN = (
    "experiment=shapes_tiny", "data.image_size=[32,48]", "data.num_train=256", "data.num_val=32",
    "data.num_test=16", "trainer.max_epochs=3", "model.scheduler.warmup_steps=2", "~logger",
    "callbacks.rich_progress_bar=null",
    "callbacks.attention_samples=null", "+trainer.enable_checkpointing=false",
    "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
    "callbacks.step_checkpoint=null", "callbacks.sigterm_checkpoint=null",
)  # fmt: skip


def blind(self: CaptionerModel, images: torch.Tensor, need_weights: bool = False) -> tuple:
    """What the decoder reads when it cannot see the image: the same zeros for every image."""
    return torch.zeros(len(images), self.image_tokens, self.encoder.dim), None


def test_a_decoder_that_cannot_see_the_image_gains_nothing_and_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(CaptionerModel, "encode", blind)
    cfg = compose_train(*SHORT_RUN, output_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="captioner"):
        metrics, _ = train(cfg)
    assert metrics["test/image_gain"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["test/blank_gain"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["val/image_gain"] == pytest.approx(0.0, abs=1e-6)  # in metrics.json too
    warnings = [r.getMessage() for r in caplog.records if "ignoring the image" in r.getMessage()]
    assert len(warnings) == 3  # after each validation past warm-up
    assert "val/image_gain=0.000" in warnings[0] and "of validation captions are" in warnings[0]


def test_a_trained_model_reads_its_images(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_train(f"ckpt_path={trained_run}", "+data.num_test=32",
                        output_dir=tmp_path, config_name="eval")  # fmt: skip
    metrics, _ = evaluate(cfg)
    assert metrics["test/image_gain"] > 0.5 and metrics["test/blank_gain"] > 0.5
    assert 0 < metrics["test/top_caption_share"] < 0.5 < metrics["test/distinct_captions"]
    assert metrics["test/vocab_used"] >= 8  # sizes, colours, shapes and the connecting words


def test_image_share_is_the_attention_mass_on_the_image_over_real_tokens() -> None:
    layer = torch.zeros(2, 3, 4, 5)  # (B, heads, T, S): rows over 5 image positions
    layer[0, :, :, :] = 0.1  # half of every row of caption 0 on the image
    layer[1, :, 0, :] = 0.2  # caption 1: all of its first word's attention, none of its second
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # caption 1 has two real tokens
    share = image_share([layer, layer * 0], real)
    torch.testing.assert_close(share, torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


@pytest.mark.parametrize("decoder", ["cross", "prefix"])
def test_a_prefix_decoder_reports_the_image_share_of_each_layer(decoder: str) -> None:
    torch.manual_seed(0)
    net = CaptionerModel(tiny_config(decoder)).eval()
    tokenizer = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2)
    evaluator = SplitEvaluator(net, tokenizer, DecodingOptions())
    tokens = torch.randint(3, 23, (3, 6))
    tokens[:, 0], tokens[2, 4:] = 1, 0  # <bos> first; the last caption is padded
    with torch.no_grad():
        reliance = evaluator.caption_losses({"images": torch.randn(3, 3, 16, 24), "tokens": tokens})
    assert reliance.tokens.tolist() == [5, 5, 3]
    assert not torch.equal(reliance.loss, reliance.shuffled)  # another image, another loss
    if decoder == "cross":  # a word's cross-attention is all on the image: nothing to report
        assert reliance.share is None
    else:  # the word rows weigh image positions against the words before them
        assert (
            reliance.share.shape == (3, 2) and ((reliance.share > 0) & (reliance.share < 1)).all()
        )


def test_eval_writes_a_card_of_what_decides_its_numbers(trained_run: Path, tmp_path: Path) -> None:
    import hashlib
    import json

    from tests.helpers import write_table

    paths = write_table(tmp_path / "data")
    data = [f"data.{key}={value}" for key, value in paths.items()]
    cfg = compose_train(f"ckpt_path={trained_run}", "data=jsonl", *data, "decoding.beam_size=2",
                        output_dir=tmp_path, config_name="eval")  # fmt: skip
    _, objects = evaluate(cfg)
    card = json.loads(objects["card_path"].read_text())
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert card["checkpoint"] == {
        "file": str(ckpt), "kind": "lightning",
        "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
    }  # fmt: skip
    test_file = paths["test_file"]
    assert card["data"]["files"]["test_file"] == hashlib.sha256(test_file.read_bytes()).hexdigest()
    scored = len(test_file.read_text().splitlines())
    assert card["data"]["images_scored"] == {"test": scored}
    assert card["decoding"]["beam_size"] == 2 and "PTBTokenizer" in card["tokenizer"]
    assert card["left_out"] == [] and card["versions"]["pycocoevalcap"]
    assert len(card["versions"]["commit"]) == 40  # this checkout's
