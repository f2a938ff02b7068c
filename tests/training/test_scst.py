"""Self-critical training: draws come from each image's own cache, their log-probabilities are
the sampler's, the gradient favours what the reward favours, the baselines are what they say,
and a run starts from a cross-entropy checkpoint, resumes exactly and runs under DDP."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.core.errors import ConfigError
from captioner.core.generation import DecodingOptions, generate
from captioner.core.models import CaptionerModel
from captioner.core.tokenizer import Tokenizer
from captioner.metrics import ptb
from captioner.metrics.cider import CiderD, DocumentFrequency
from captioner.training.scst import (
    CaptionReward,
    SelfCritical,
    caption_logprobs,
    self_critical_loss,
    training_document_frequency,
)
from captioner.training.tasks import train
from tests.helpers import DDP_RUN, FUSIONS, compose_train, open_gates, tiny_config, train_script

WORDS = [f"w{i}" for i in range(19)]  # with <pad> <bos> <eos> <unk>: the 23 words of tiny_config
TOKENIZER = Tokenizer.build([" ".join(WORDS)])
BOS, EOS, PAD = TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.pad_id


def sharp_model(fusion: str = "cross", seed: int = 2, dropout: float = 0.0) -> CaptionerModel:
    """A random model whose captions differ between images (see test_generation's `model`)."""
    torch.manual_seed(seed)
    model = open_gates(CaptionerModel(tiny_config(dropout=dropout, **FUSIONS[fusion])), 1.0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 2.0 / param[0].numel() ** 0.5)
        model.decoder.token_embed.weight.mul_(3)
    return model


def memory_of(model: CaptionerModel, images: int = 3) -> torch.Tensor:
    pixels = torch.randn(images, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    return model.encode(pixels)[0].detach()


@pytest.mark.parametrize("fusion", ["cross", "prefix_gqa_rope"])
def test_k_draws_per_image_read_their_own_image(fusion: str) -> None:
    """Sampling near temperature 0 is greedy: row i * k + j, every j, is image i's greedy
    caption, so the k rows of an image read that image's cached keys and values."""
    model = sharp_model(fusion).eval()
    memory = memory_of(model)
    greedy = generate(model, None, BOS, EOS, PAD, memory=memory)
    cold = DecodingOptions(do_sample=True, temperature=1e-6)
    drawn = generate(model, None, BOS, EOS, PAD, cold, memory=memory, samples=4)
    assert drawn.tokens.shape[0] == 12
    width = greedy.tokens.shape[1]
    assert torch.equal(drawn.tokens[:, :width], greedy.tokens.repeat_interleave(4, dim=0))
    assert len({tuple(row.tolist()) for row in greedy.tokens}) > 1  # the images differ

    warm = DecodingOptions(do_sample=True)
    cached = generate(model, None, BOS, EOS, PAD, warm, memory=memory, samples=4,
                      generator=torch.Generator().manual_seed(5))  # fmt: skip
    uncached = generate(
        model, None, BOS, EOS, PAD, DecodingOptions(do_sample=True, use_cache=False),
        memory=memory, samples=4, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert torch.equal(cached.tokens, uncached.tokens)
    assert len({tuple(row.tolist()) for row in cached.tokens}) > 3  # the draws differ


def test_several_draws_per_image_need_sampling() -> None:
    model = sharp_model()
    with pytest.raises(ConfigError, match="do_sample"):
        generate(model, None, BOS, EOS, PAD, memory=memory_of(model), samples=2)


@pytest.mark.parametrize("fusion", ["cross", "prefix_gqa_rope"])
def test_teacher_forced_logprobs_are_the_samplers(fusion: str) -> None:
    """The one pass with gradients scores each drawn token where the sampler drew it."""
    model = sharp_model(fusion).eval()
    memory = memory_of(model)
    drawn = generate(model, None, BOS, EOS, PAD, DecodingOptions(do_sample=True), memory=memory,
                     samples=3, generator=torch.Generator().manual_seed(1))  # fmt: skip
    logp, entropy, live = caption_logprobs(model, memory.repeat_interleave(3, 0), drawn, BOS)
    assert logp.requires_grad
    torch.testing.assert_close(logp, drawn.token_logprobs[live], atol=1e-5, rtol=1e-5)
    assert live.sum(1).tolist() == drawn.lengths.tolist()
    assert (entropy > 0).all() and (entropy <= np.log(23) + 1e-5).all()
    # without <bos> and <pad>, what is left is a distribution: the one the sampler draws from
    banned, _, _ = caption_logprobs(model, memory.repeat_interleave(3, 0), drawn, BOS, (BOS, PAD))
    assert (banned >= logp - 1e-6).all() and (banned > logp).any()


def fixed_reward(favoured: str):
    """1 for a caption that starts with `favoured`, else 0."""
    return lambda captions, references: np.array([float(c.split()[:1] == [favoured])
                                                  for c in captions])  # fmt: skip


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_steps_raise_the_probability_of_rewarded_captions(baseline: str) -> None:
    model = sharp_model()
    memory = memory_of(model, images=4)
    first = lambda: model.decoder(torch.full((4, 1), BOS), memory).logits[:, 0].softmax(-1)  # noqa: E731
    with torch.no_grad():
        favoured = int(first().mean(0)[4:].argsort()[-3]) + 4  # a word drawn now and then
        before = first()[:, favoured]
    options = SelfCritical(samples=8, baseline=baseline)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(0)
    for _ in range(15):
        loss, stats = self_critical_loss(
            model, memory, [["x"]] * 4, TOKENIZER, options, fixed_reward(TOKENIZER.itos[favoured])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = first()[:, favoured]
    assert (after > before + 0.2).all(), (before, after)
    assert set(stats) == {"reward", "baseline", "advantage", "length", "entropy"}


def test_the_baselines_are_the_greedy_reward_and_the_other_draws_mean() -> None:
    model = sharp_model()
    memory = memory_of(model)
    seen: list[list[str]] = []

    def reward(captions, references):
        seen.append(list(captions))
        return np.array([float(len(c.split())) for c in captions])

    torch.manual_seed(0)
    _, stats = self_critical_loss(model, memory, [["x"]] * 3, TOKENIZER,
                                  SelfCritical(samples=4, baseline="greedy"), reward)  # fmt: skip
    greedy = generate(model, None, BOS, EOS, PAD, memory=memory)
    words = [TOKENIZER.decode(row.tolist()) for row in greedy.tokens]
    assert seen[3:] == [[w] for w in words]  # the draws of each image, then each greedy caption
    assert stats["baseline"] == pytest.approx(np.mean([len(w.split()) for w in words]))
    draws = np.array([[len(c.split()) for c in group] for group in seen[:3]], dtype=float)
    assert stats["reward"] == pytest.approx(draws.mean())
    assert stats["length"] == pytest.approx(draws.mean())  # every draw ended with <eos> here

    torch.manual_seed(0)
    seen.clear()
    _, stats = self_critical_loss(model, memory, [["x"]] * 3, TOKENIZER,
                                  SelfCritical(samples=4, baseline="mean"), reward)  # fmt: skip
    draws = np.array([[len(c.split()) for c in group] for group in seen], dtype=float)
    others = (draws.sum(1, keepdims=True) - draws) / 3
    assert len(seen) == 3  # no greedy decoding
    assert stats["baseline"] == pytest.approx(others.mean())
    assert stats["advantage"] == pytest.approx(np.abs(draws - others).mean())


def test_the_gradient_is_for_the_policy_that_drew_the_captions() -> None:
    """Captions are drawn without dropout (decoding is the deterministic model); with dropout
    on in training, their log p must still be taken without it, or the gradient is for another
    policy. The loss in training mode is the loss in eval mode, and the mode is left as it was."""
    model = sharp_model(dropout=0.5)
    memory = memory_of(model)
    lengths = lambda captions, references: np.array([len(c.split()) for c in captions])  # noqa: E731
    losses = []
    for training in (True, False):
        model.train(training)
        torch.manual_seed(0)
        loss, _ = self_critical_loss(
            model, memory, [["x"]] * 3, TOKENIZER, SelfCritical(4), lengths
        )
        assert model.training is training
        losses.append(loss.item())
    assert losses[0] != 0.0 and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_equal_rewards_push_nothing_but_the_entropy_bonus() -> None:
    model = sharp_model()
    memory = memory_of(model)
    flat = lambda captions, references: np.ones(len(captions))  # noqa: E731
    loss, _ = self_critical_loss(model, memory, [["x"]] * 3, TOKENIZER, SelfCritical(4), flat)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    loss, stats = self_critical_loss(
        model, memory, [["x"]] * 3, TOKENIZER, SelfCritical(4, entropy=0.1), flat
    )
    assert loss.item() == pytest.approx(-0.1 * stats["entropy"], rel=1e-5)


def test_rewards_are_cider_d_of_ptb_tokens_plus_the_length_term() -> None:
    references = ["A red circle, left of a blue square.", "a blue square and a red circle"]
    df = DocumentFrequency.from_references(
        [[ptb.tokenize_caption(r) for r in references], ["a green triangle"]]
    )
    captions = ["A red circle left of a blue square", "a triangle."]
    expected = CiderD(df).score([ptb.tokenize_caption(c) for c in captions],
                                [ptb.tokenize_caption(r) for r in references])  # fmt: skip
    assert expected[0] > expected[1] > 0 or expected[1] == 0
    np.testing.assert_allclose(CaptionReward(df)(captions, references), expected)
    np.testing.assert_allclose(
        CaptionReward(df, length=0.5)(captions, references), expected + 0.5 * np.array([8, 2])
    )


def test_document_frequencies_are_built_once_and_then_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    references = [["A red circle."], ["a blue square", "A blue square!"]]
    cache = tmp_path / "train.json.cider-df-0123.json"
    with caplog.at_level(logging.INFO, logger="captioner"):
        built = training_document_frequency(references, cache)
        read = training_document_frequency(iter(()), cache)  # nothing to build from: read
    assert read == built and built.num_images == 2 and built.counts["square"] == 1
    assert built.counts["a red circle"] == 1 and "." not in built.counts  # PTB tokens
    assert built.counts["a blue square"] == 1  # once per image, however many references hold it
    assert "cached in" in caplog.text and "read from" in caplog.text


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"samples": 1}, "samples must be >= 2 with baseline=mean"),
        ({"samples": 0, "baseline": "greedy"}, "samples must be an integer >= 1"),
        ({"baseline": "best"}, "baseline must be greedy or mean"),
        ({"entropy": -1.0}, "entropy must be a number >= 0"),
        ({"length": float("nan")}, "length must be a number"),
        ({"sample": 5}, "unknown model.scst key 'sample'"),
    ],
)
def test_scst_settings_are_checked_by_name(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SelfCritical.from_config(values)


# --- Training runs --------------------------------------------------------------------------

SCST_RUN = (
    "experiment=shapes_scst", "data.image_size=[32,48]", "data.num_train=96", "data.num_val=8",
    "data.num_test=8", "data.batch_size=8", "model.scst.samples=3", "~logger",
    "callbacks.rich_progress_bar=null", "callbacks.attention_samples=null",
)  # fmt: skip


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_scst_starts_from_a_cross_entropy_checkpoint_and_resumes_exactly(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From the cross-entropy checkpoint's weights with a fresh optimizer; then a run stopped
    after 2 of its 12 steps and resumed ends with the weights of the run that went through."""
    start = trained_run / "checkpoints" / "last.ckpt"
    keep = ("+callbacks.keep._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            "+callbacks.keep.every_n_train_steps=2", "+callbacks.keep.save_top_k=-1",
            "+callbacks.keep.dirpath=${paths.output_dir}/keep")  # fmt: skip
    whole = tmp_path / "whole"
    with caplog.at_level(logging.INFO, logger="captioner"):
        metrics, objects = train(compose_train(*SCST_RUN, *keep, f"ckpt_path={start}",
                                               "test=false", output_dir=whole))  # fmt: skip
    assert "was trained with cross-entropy: self-critical training starts from its weights" in (
        caplog.text
    )
    assert metrics["train/steps"] == 24  # 2 epochs of 12 batches: a new schedule, not resumed
    saved = torch.load(objects["checkpoint"], weights_only=True)
    assert saved["captioner"]["objective"] == "self_critical"
    assert saved["hyper_parameters"]["scst"]["samples"] == 3
    kept = {torch.load(p, weights_only=True)["global_step"]: p for p in (whole / "keep").iterdir()}
    first = torch.load(kept[2], weights_only=True)
    ce = torch.load(start, weights_only=True)["state_dict"]
    drift = max((first["state_dict"][k] - ce[k]).abs().max().item() for k in ce)
    assert 0 < drift < 0.05  # two small steps away from the cross-entropy weights

    resumed = tmp_path / "resumed"
    train(compose_train(*SCST_RUN, f"ckpt_path='{kept[2]}'", "test=false", output_dir=resumed))
    ours, theirs = weights(resumed), weights(whole)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.slow
def test_cross_entropy_can_go_on_from_a_checkpoints_weights(
    trained_run: Path, tmp_path: Path
) -> None:
    """init_from: a new run from the weights alone, as the comparison with SCST needs."""
    start = trained_run / "checkpoints" / "last.ckpt"
    metrics, objects = train(compose_train(
        *SCST_RUN, "model.scst=null", f"init_from={trained_run}", "trainer.max_steps=2",
        output_dir=tmp_path,
    ))  # fmt: skip
    assert metrics["train/steps"] == 2 and metrics["test/CIDEr"] > 0.5  # not a random model
    saved = torch.load(objects["checkpoint"], weights_only=True)
    assert saved["captioner"]["objective"] == "cross_entropy"
    with pytest.raises(ConfigError, match=r"init_from=.* was trained with model.decoder.dim=64"):
        train(compose_train(*SCST_RUN, f"init_from={start}", "model.decoder.dim=32",
                            output_dir=tmp_path / "other"))  # fmt: skip


def test_scst_refuses_attention_supervision(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.attention_supervision=0"):
        train(compose_train(*SCST_RUN, "model.attention_supervision=0.1", output_dir=tmp_path))


@pytest.mark.slow
def test_scst_under_ddp(trained_run: Path, tmp_path: Path) -> None:
    """Two processes draw and reward captions of their own images, then test together."""
    start = shutil.copy(trained_run / "checkpoints" / "last.ckpt", tmp_path / "ce.ckpt")
    result = train_script(*SCST_RUN, *DDP_RUN, f"ckpt_path={start}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "root" / "logs" / "train" / "runs").iterdir())
    probes = [json.loads((run / f"probe_rank{r}.json").read_text()) for r in range(2)]
    train_ids = [set(p["train"]) for p in probes]
    assert train_ids[0] and train_ids[1] and not train_ids[0] & train_ids[1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/steps"] == 4 and metrics["test/CIDEr"] > 0.5
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["captioner"]["objective"]
        == "self_critical"
    )
