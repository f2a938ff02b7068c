"""Decoding: the KV cache changes nothing but speed; beams, batches and sampling are consistent."""

from __future__ import annotations

import pytest
import torch

from captioner.core.errors import ConfigError
from captioner.core.generation import DecodingOptions, Generated, generate
from captioner.core.models import CaptionerModel, PrefixDecoder
from tests.helpers import FUSIONS, open_gates, tiny_config

BOS, EOS, PAD = 1, 2, 0
STRATEGIES = {
    "greedy": {},
    "beam": {"beam_size": 3},
    "beam_exact": {"beam_size": 3, "early_stopping": "never", "length_penalty": 0.6},
    "sample": {"do_sample": True, "temperature": 0.8, "top_k": 10, "top_p": 0.95},
}


@pytest.fixture(scope="module", params=list(FUSIONS))
def model(request: pytest.FixtureRequest) -> CaptionerModel:
    """A random model, of each fusion, whose captions differ between images in words and
    length.

    The standard initialisation makes a fresh model nearly ignore the image; weights of
    variance scale^2 / fan-in (and gates opened) make it sensitive to it, and a larger <eos>
    embedding ends captions at varied steps. The seeds and scales are ones whose captions
    vary (`test_captions_vary_in_words_and_length`).
    """
    seed, scale = {
        "cross": (2, 2.0), "cross_every_2": (2, 3.0), "prefix": (4, 3.0),
        "cross_mqa_rope": (6, 2.0), "prefix_gqa_rope": (1, 3.0),
    }[request.param]  # fmt: skip
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=23, max_len=12, **FUSIONS[request.param])
    model = open_gates(CaptionerModel(config).eval(), 1.0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, scale / param[0].numel() ** 0.5)
        model.decoder.token_embed.weight.mul_(3)  # tied: sharper word distributions
        model.decoder.token_embed.weight[EOS].mul_(1.5)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(5, 3, 16, 24, generator=torch.Generator().manual_seed(3))


def run(model: CaptionerModel, images: torch.Tensor, seed: int = 0, **options) -> Generated:
    return generate(
        model, images, BOS, EOS, PAD, DecodingOptions(**options), need_weights=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def assert_same(a: Generated, b: Generated, atol: float = 1e-5) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.image_attention, b.image_attention, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.self_attention, b.self_attention, atol=atol, rtol=1e-4)


def test_captions_vary_in_words_and_length(model: CaptionerModel, images: torch.Tensor) -> None:
    """The fixtures are not degenerate, so the equalities below say something."""
    greedy = run(model, images)
    assert len(set(greedy.lengths.tolist())) >= 3
    assert len({tuple(row.tolist()) for row in greedy.tokens}) == len(images)
    assert (greedy.tokens == EOS).any() and (greedy.lengths == 11).any()  # ends, and runs out
    beam = run(model, images, beam_size=3)
    assert not torch.equal(beam.token_logprobs.sum(1), greedy.token_logprobs.sum(1))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_decoding_equals_full_recomputation(
    model: CaptionerModel, images: torch.Tensor, strategy: str
) -> None:
    options = STRATEGIES[strategy]
    assert_same(run(model, images, **options), run(model, images, use_cache=False, **options))


@pytest.mark.parametrize("strategy", ["greedy", "beam", "beam_exact"])
def test_batch_gives_the_captions_of_one_image_at_a_time(
    model: CaptionerModel, images: torch.Tensor, strategy: str
) -> None:
    batched = run(model, images, **STRATEGIES[strategy])
    for i in range(len(images)):
        alone = run(model, images[i : i + 1], **STRATEGIES[strategy])
        length = int(alone.lengths[0])
        assert int(batched.lengths[i]) == length
        assert torch.equal(batched.tokens[i, :length], alone.tokens[0, :length])
        torch.testing.assert_close(
            batched.token_logprobs[i, :length],
            alone.token_logprobs[0, :length],
            atol=1e-5,
            rtol=1e-4,
        )
        torch.testing.assert_close(
            batched.image_attention[i, :, :, :length], alone.image_attention[0, :, :, :length],
            atol=1e-5, rtol=1e-4,
        )  # fmt: skip


def beam_search_with_one_beam(model: CaptionerModel, images: torch.Tensor) -> Generated:
    """`generate` sends beam_size=1 to greedy search; run the beam search code itself."""
    from captioner.core.generation import _Recorder, _Search, _Stepper

    steps, rows = model.config.max_len - 1, len(images)
    with torch.no_grad():
        search = _Search(
            stepper=_Stepper(model, model.encoder(images)[0], 1, steps, True, True),
            recorder=_Recorder(steps, rows, model, images.device),
            batch=rows, steps=steps, ids=(BOS, EOS, PAD), options=DecodingOptions(beam_size=1),
            device=images.device, vocab_size=model.config.vocab_size,
        )  # fmt: skip
        return search.beam_search()


def test_beam_size_one_is_greedy(model: CaptionerModel, images: torch.Tensor) -> None:
    assert_same(beam_search_with_one_beam(model, images), run(model, images))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_returned_history_is_what_the_model_computes_for_that_caption(
    model: CaptionerModel, images: torch.Tensor, strategy: str
) -> None:
    """Teacher-force each returned caption through the plain forward pass: the log-probs and
    attention returned (for beams, backtracked through reordering) must be that caption's."""
    out = run(model, images, **STRATEGIES[strategy])
    for i in range(len(images)):
        length = int(out.lengths[i])
        tokens = out.tokens[i, :length]
        inputs = torch.cat([torch.tensor([BOS]), tokens[:-1]])[None]
        full = model.forward_with_attention(images[i : i + 1], inputs)
        logprobs = full.logits[0].log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(out.token_logprobs[i, :length], logprobs, atol=1e-4, rtol=1e-4)
        cross = torch.stack(full.image_attention, dim=1)[0]  # (layers, heads, T, S)
        torch.testing.assert_close(
            out.image_attention[i, :, :, :length], cross, atol=1e-5, rtol=1e-4
        )
        self_w = torch.stack(full.self_attention, dim=1)[0]  # (layers, heads, T, T)
        torch.testing.assert_close(
            out.self_attention[i, :, :, :length, :length], self_w, atol=1e-5, rtol=1e-4
        )
        assert torch.all(out.tokens[i, length:] == PAD)
        assert torch.all(out.image_attention[i, :, :, length:] == 0)
        assert torch.all(out.token_logprobs[i, length:] == 0)
        ended = tokens[-1] == EOS
        assert ended or length == 11  # a caption ends with <eos> or at the length limit
        assert not (tokens[:-1] == EOS).any()
        assert not torch.isin(tokens, torch.tensor([BOS, PAD])).any()


def test_beam_search_returns_every_ended_hypothesis_best_first(
    model: CaptionerModel, images: torch.Tensor
) -> None:
    """The alternatives a page of beams shows: the first is the caption returned, the rest
    rank below it, and each one's log-probability is what the model gives that caption."""
    options = {"beam_size": 3, "length_penalty": 0.6}
    out = run(model, images, **options)
    assert out.beam_tokens is not None and out.beam_logprobs is not None
    assert out.beam_tokens.shape[:2] == (len(images), 3)
    for i in range(len(images)):
        length = int(out.lengths[i])
        assert torch.equal(out.beam_tokens[i, 0, :length], out.tokens[i, :length])
        scores = []
        for tokens, total in zip(out.beam_tokens[i], out.beam_logprobs[i].tolist(), strict=True):
            ended = (tokens == EOS).nonzero()
            tokens = tokens[: int(ended[0]) + 1] if len(ended) else tokens[tokens != PAD]
            inputs = torch.cat([torch.tensor([BOS]), tokens[:-1]])[None]
            logits = model(images[i : i + 1], inputs)[0]
            expected = logits.log_softmax(-1).gather(1, tokens[:, None]).sum().item()
            assert total == pytest.approx(expected, abs=1e-4)
            scores.append(total / len(tokens) ** 0.6)
        assert scores == sorted(scores, reverse=True)
    assert run(model, images).beam_tokens is None  # greedy: no beams


def test_image_attention_keys_and_values_are_projected_once_per_image(
    model: CaptionerModel, images: torch.Tensor
) -> None:
    """Cross-attention projects the image's keys and values in each block that reads it; the
    prefix decoder projects the image into its width, then runs it through its blocks."""
    rows_seen: list[int] = []
    if isinstance(model.decoder, PrefixDecoder):
        projections = [model.decoder.image_proj]
    else:
        projections = [b.cross_attn.kv_proj for b in model.decoder.blocks if b.reads_image]
    hooks = [
        projection.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[0]))
        for projection in projections
    ]
    try:
        for options in ({}, {"beam_size": 3}):
            rows_seen.clear()
            run(model, images, **options)
            assert rows_seen == [len(images)] * len(projections)
        rows_seen.clear()
        out = run(model, images, beam_size=3, use_cache=False)  # the hook does count
        assert len(rows_seen) == len(projections) * out.tokens.shape[1]
    finally:
        for hook in hooks:
            hook.remove()


def test_each_cached_step_feeds_one_position(model: CaptionerModel, images: torch.Tensor) -> None:
    shapes: list[tuple[int, ...]] = []
    hook = model.decoder.token_embed.register_forward_hook(
        lambda _m, args, _out: shapes.append(tuple(args[0].shape))
    )
    try:
        out = run(model, images, beam_size=3)
    finally:
        hook.remove()
    assert shapes == [(3 * len(images), 1)] * out.tokens.shape[1]


def test_later_beam_stopping_never_scores_worse(
    model: CaptionerModel, images: torch.Tensor
) -> None:
    def score(out: Generated) -> torch.Tensor:
        return out.token_logprobs.sum(1) / out.lengths.float() ** 0.6

    rules = [True, False, "never"]  # each stops no earlier than the one before
    scores = [
        score(run(model, images, beam_size=3, length_penalty=0.6, early_stopping=r)) for r in rules
    ]
    assert torch.all(scores[1] >= scores[0] - 1e-5) and torch.all(scores[2] >= scores[1] - 1e-5)


class ScriptedStepper:
    """Log-probabilities from a table instead of a model: the likely caption is 3 4 5 <eos>;
    every other word is very unlikely, but after an unlikely word <eos> is likely."""

    GOOD = (3, 4, 5, EOS)

    def __call__(self, prefix: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        rows = []
        for row in prefix.tolist():
            words = tuple(row[1:])
            scores = torch.full((8,), -12.0)
            if words == self.GOOD[: len(words)]:
                scores[EOS] = -10.0
                scores[self.GOOD[len(words)]] = -0.01
            else:
                scores[EOS] = -0.05
            rows.append(scores)
        return torch.stack(rows), None, None

    def reorder(self, rows: torch.Tensor) -> None:
        pass


@pytest.mark.parametrize("rule", [False, "never"])
def test_unlikely_endings_do_not_stop_the_search_early(rule: bool | str) -> None:
    """With early_stopping=True the pool fills with unlikely captions that end at once while
    the likely one is still growing; the default rule waits for it."""
    from captioner.core.generation import _Search

    def search(early_stopping: bool | str) -> list[int]:
        options = DecodingOptions(beam_size=3, early_stopping=early_stopping)
        out = _Search(
            stepper=ScriptedStepper(), recorder=None, batch=1, steps=8, ids=(BOS, EOS, PAD),
            options=options, device=torch.device("cpu"), vocab_size=8,
        ).beam_search()  # fmt: skip
        return out.tokens[0, : int(out.lengths[0])].tolist()

    assert search(rule) == list(ScriptedStepper.GOOD)
    assert search(True) != list(ScriptedStepper.GOOD)  # the failure the rule avoids


def test_length_limits(model: CaptionerModel, images: torch.Tensor) -> None:
    for options in ({}, {"beam_size": 3}):
        short = run(model, images, max_length=3, **options)
        assert short.tokens.shape[1] <= 3 and torch.all(short.lengths <= 3)
        long = run(model, images, min_length=6, **options)
        assert torch.all(long.lengths >= 6)
        assert not (long.tokens[:, :5] == EOS).any()


def test_sampling_is_seeded_and_top_k_one_is_greedy(
    model: CaptionerModel, images: torch.Tensor
) -> None:
    sample = STRATEGIES["sample"]
    assert_same(run(model, images, seed=5, **sample), run(model, images, seed=5, **sample))
    draws = {tuple(run(model, images, seed=s, do_sample=True).tokens[0].tolist()) for s in range(6)}
    assert len(draws) > 1
    assert_same(run(model, images, do_sample=True, top_k=1, seed=1), run(model, images))
    assert_same(run(model, images, do_sample=True, top_p=1e-6, seed=1), run(model, images))


def test_generation_restores_the_mode(model: CaptionerModel, images: torch.Tensor) -> None:
    model.train()
    try:
        run(model, images[:1])
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"beam_size": 0}, "decoding.beam_size"),
        ({"beam_size": 11}, "decoding.beam_size"),  # 2k + 3 words needed, the vocabulary has 23
        ({"max_length": 12}, "decoding.max_length"),  # model.max_len=12 allows 11
        ({"max_length": 0}, "decoding.max_length"),
        ({"min_length": 5, "max_length": 4}, "decoding.min_length"),
        ({"do_sample": True, "temperature": 0.0}, "decoding.temperature"),
        ({"do_sample": True, "top_p": 0.0}, "decoding.top_p"),
        ({"do_sample": True, "beam_size": 2}, "decoding.do_sample"),
        ({"beam_size": 2, "early_stopping": "sometimes"}, "decoding.early_stopping"),
    ],
)
def test_bad_options_name_the_key(
    model: CaptionerModel, images: torch.Tensor, options: dict, key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        run(model, images[:1], **options)
