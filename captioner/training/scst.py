"""Self-critical sequence training (SCST): optimise CIDEr-D, the score a captioner is judged by,
instead of the likelihood of its references (Rennie et al., 2017).

Cross-entropy trains every word on a reference's history, never on the model's own; SCST
draws k captions per image from the model itself (the KV-cached sampler, without gradients),
scores each with CIDEr-D against the image's references, and pushes each drawn caption's
log-probability (one teacher-forced pass, with gradients) up or down by its advantage: its
reward minus a baseline. The baseline is the greedy caption's reward (classic SCST: one more
decoding) or the mean reward of the image's other k - 1 draws (Luo, 2020: no extra decoding,
and independent of the draw it judges). Rewards use CIDEr-D statistics of the training
references, so a caption's reward never depends on the batch it came in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from captioner.core.errors import ConfigError
from captioner.core.generation import DecodingOptions, Generated, evaluating, generate
from captioner.core.models import CaptionerModel
from captioner.core.values import is_finite
from captioner.data.cache import cached_json
from captioner.metrics import ptb
from captioner.metrics.cider import CiderD, DocumentFrequency

BASELINES = ("greedy", "mean")


@dataclass(frozen=True)
class SelfCritical:
    """The `model.scst` keys: how captions are drawn, rewarded and compared."""

    samples: int = 5  # captions drawn per image
    baseline: str = "mean"  # mean: of the image's other draws; greedy: the greedy caption's reward
    entropy: float = 0.0  # weight of the drawn words' mean entropy, a bonus against collapse
    length: float = 0.0  # reward per word, added to CIDEr-D: > 0 counters a pull to short captions

    def __post_init__(self) -> None:
        rules = [
            (isinstance(self.samples, int) and self.samples >= 1, "samples", "an integer >= 1"),
            (self.baseline in BASELINES, "baseline", " or ".join(BASELINES)),
            (
                self.baseline != "mean" or self.samples >= 2,
                "samples",
                ">= 2 with baseline=mean (the other draws of an image are the baseline)",
            ),
            (is_finite(self.entropy) and self.entropy >= 0, "entropy", "a number >= 0"),
            (is_finite(self.length), "length", "a number"),
        ]
        for ok, key, rule in rules:
            if not ok:
                raise ConfigError(f"model.scst.{key} must be {rule}, got {getattr(self, key)!r}.")

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> SelfCritical:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model.scst key {unknown[0]!r}: the keys are {', '.join(sorted(known))}."
            )
        return cls(**values)


def training_document_frequency(
    references: Iterable[Sequence[str]], cache_file: Any = None
) -> DocumentFrequency:
    """CIDEr-D's document frequencies over the training references, PTB-tokenised as rewards
    are: read from `cache_file` when it holds them, else built (one pass over the training
    captions) and stored there."""

    def build() -> DocumentFrequency:
        tokenized = ([ptb.tokenize_caption(c) for c in group] for group in references)
        return DocumentFrequency.from_references(tokenized)

    if cache_file is None:
        return build()
    return cached_json(
        build, cache_file, DocumentFrequency.to_dict, DocumentFrequency.from_dict,
        lambda df: f"CIDEr-D document frequencies of {df.num_images:,} training images",
    )  # fmt: skip


class CaptionReward:
    """A caption's reward: its CIDEr-D against its image's references (PTB tokens on both
    sides, as evaluation scores them), plus `length` per word."""

    def __init__(self, document_frequency: DocumentFrequency, length: float = 0.0) -> None:
        self.scorer = CiderD(document_frequency)
        self.length = length

    def __call__(self, captions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        tokens = [ptb.tokenize_caption(c) for c in captions]
        rewards = self.scorer.score(tokens, [ptb.tokenize_caption(r) for r in references])
        if self.length:
            rewards = rewards + self.length * np.array([len(t.split()) for t in tokens])
        return rewards


def caption_logprobs(
    net: CaptionerModel,
    memory: torch.Tensor,
    captions: Generated,
    bos_id: int,
    banned: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of generated captions' tokens under the model, with gradients, from
    one teacher-forced pass: `memory` (N, S, D) the image tokens of each row. `banned` tokens
    (those the sampler never draws) are left out of the distribution, so it is the one the
    captions were drawn from. Returns (M,) log p of every token up to each `<eos>`, its rows'
    entropy (M,), and the (N, T) mask that places them."""
    tokens = captions.tokens
    inputs = torch.cat([torch.full_like(tokens[:, :1], bos_id), tokens[:, :-1]], dim=1)
    live = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < captions.lengths[:, None]
    hidden = net.features(None, inputs, memory=memory).hidden[live]  # (M, D)
    logits = (hidden @ net.output_weight.T).float()
    if banned:
        logits[:, list(banned)] = float("-inf")
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp.masked_fill(logp.isinf(), 0.0)).sum(dim=-1)
    return logp.gather(1, tokens[live][:, None]).squeeze(1), entropy, live


def self_critical_loss(
    net: CaptionerModel,
    memory: torch.Tensor,
    references: Sequence[Sequence[str]],
    tokenizer: Any,
    options: SelfCritical,
    reward: CaptionReward,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy-gradient loss of a batch, from its image tokens (B, S, D) with gradients, and
    what to log: mean reward, baseline, |advantage|, words per caption, entropy.

    The loss is -sum(advantage x log p) over every drawn token, divided by the number of
    tokens; minus `entropy` times the tokens' mean entropy.
    """
    k, ids = options.samples, (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    policy = DecodingOptions(do_sample=True)  # the model's own distribution
    image_tokens = memory.detach()
    drawn = generate(net, None, *ids, policy, memory=image_tokens, samples=k)
    words = [tokenizer.decode(row.tolist()) for row in drawn.tokens]
    rewards = np.stack(
        [reward(words[i * k : (i + 1) * k], refs) for i, refs in enumerate(references)]
    )
    if options.baseline == "greedy":
        greedy = generate(net, None, *ids, DecodingOptions(), memory=image_tokens)
        pairs = zip(greedy.tokens, references, strict=True)
        baseline = np.array([reward([tokenizer.decode(t.tolist())], refs) for t, refs in pairs])
    else:  # the mean of the other k - 1 draws of the image
        baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    advantage = torch.as_tensor(rewards - baseline, dtype=torch.float32, device=memory.device)
    with evaluating(net):  # the policy that drew them: `generate` decodes without dropout
        logp, entropy, live = caption_logprobs(
            net, memory.repeat_interleave(k, dim=0), drawn, tokenizer.bos_id,
            banned=(tokenizer.bos_id, tokenizer.pad_id),
        )  # fmt: skip
    weights = advantage.reshape(-1, 1).expand_as(live)[live]
    loss = -(weights * logp).sum() / len(logp)
    if options.entropy:
        loss = loss - options.entropy * entropy.mean()
    ended = drawn.tokens.gather(1, (drawn.lengths - 1)[:, None]).squeeze(1) == tokenizer.eos_id
    stats = {
        "reward": float(rewards.mean()),
        "baseline": float(baseline.mean()),
        "advantage": float(np.abs(rewards - baseline).mean()),
        "length": float((drawn.lengths - ended.long()).float().mean()),
        "entropy": float(entropy.detach().mean()),
    }
    return loss, stats
