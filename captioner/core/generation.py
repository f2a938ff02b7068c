"""Caption generation: greedy, sampling and beam search, batched, on the decoder's KV cache.

Every function runs without gradients and leaves the model's train/eval mode as it was.
The image is encoded once; with the cache (the default) each step feeds the decoder one
position per row and what depends on the image alone (the cross-attention keys/values, or
the prefix decoder's image positions) is computed once per image,
shared by all of its beams. `use_cache=False` recomputes the whole prefix at every step: the
reference that the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from captioner.core.errors import ConfigError
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.core.models.cache import DecoderCache
from captioner.core.values import is_finite


@dataclass
class DecodingOptions:
    """How words are chosen. The fields are the `decoding.*` keys of `conf/eval.yaml`."""

    beam_size: int = 1  # 1: greedy (or sampling); k > 1 keeps k hypotheses per image
    max_length: int | None = None  # most generated tokens, <eos> included; None: model.max_len-1
    min_length: int = 0  # <eos> is not allowed before this many tokens
    length_penalty: float = 1.0  # beams rank by sum(log p) / length ** length_penalty
    early_stopping: bool | str = False  # beams: when an image is done, once beam_size
    # hypotheses have ended and ... True: at once; False: no live beam scores better at its
    # current length; "never": no live beam could score better at any length (exact)
    do_sample: bool = False  # draw each word from the model's distribution
    temperature: float = 1.0  # sampling: divides the logits; < 1 is more conservative
    top_k: int = 0  # sampling: only among the k most likely words (0: all)
    top_p: float = 1.0  # sampling: only among the most likely words holding this much mass
    use_cache: bool = True  # False recomputes the whole prefix each step (a reference)

    def resolve_max_length(
        self, config: CaptionerConfig, name: Callable[[str], str] = "decoding.{}".format
    ) -> int:
        """Check every field, naming the one to fix as `name(field)` (a command line names its
        flags, not the config's keys); returns the number of steps to run."""
        vocab_size = config.vocab_size
        longest = config.max_len - 1  # the model saw <bos> + at most max_len - 1 targets
        max_length = longest if self.max_length is None else self.max_length
        checks = [
            (isinstance(self.beam_size, int) and self.beam_size >= 1, "beam_size", ">= 1"),
            (
                isinstance(max_length, int) and 1 <= max_length <= longest,
                "max_length",
                f"between 1 and {longest} (the model was trained with model.max_len="
                f"{config.max_len} tokens, <bos> and <eos> included)",
            ),
            (
                isinstance(self.min_length, int) and 0 <= self.min_length <= max_length,
                "min_length",
                f"between 0 and {max_length}",
            ),
            (
                is_finite(self.temperature) and self.temperature > 0,
                "temperature",
                f"a finite number > 0 (for greedy decoding, turn {name('do_sample')} off)",
            ),
            (
                is_finite(self.length_penalty) and abs(self.length_penalty) <= 100,
                "length_penalty",
                "a number in [-100, 100]",
            ),
            (
                self.early_stopping in (True, False, "never"),
                "early_stopping",
                "true, false or never",
            ),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", ">= 0"),
            (is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (
                not (self.do_sample and self.beam_size > 1),
                "do_sample",
                f"false when {name('beam_size')} > 1 (sampling draws one caption per image)",
            ),
            (
                2 * self.beam_size + 3 <= vocab_size,
                "beam_size",
                f"at most {(vocab_size - 3) // 2} for a vocabulary of {vocab_size} words",
            ),
        ]
        for ok, key, rule in checks:
            if not ok:
                raise ConfigError(f"{name(key)} must be {rule}, got {getattr(self, key)!r}.")
        return max_length


@dataclass
class Generated:
    """A batch of generated captions, one per image, aligned position by position.

    Position i holds the i-th generated token; after `<eos>` rows are padded. The attention
    at position i is what the decoder looked at while choosing token i: its query is the
    position whose input is token i - 1 (`<bos>` for i = 0).
    """

    tokens: torch.Tensor  # (B, T) ids, <eos> included where it was generated, then <pad>
    lengths: torch.Tensor  # (B,) tokens per row, <eos> included
    token_logprobs: torch.Tensor  # (B, T) log p(token | image, tokens before), 0 past the end
    image_attention: torch.Tensor | None = None  # (B, layers, heads, T, patches)
    self_attention: torch.Tensor | None = None  # (B, layers, heads, T, T) over <bos>, tokens
    # beam search: every hypothesis that ended, best first (B, beams, T), and the sum of its
    # log-probabilities (B, beams), -inf where fewer ended
    beam_tokens: torch.Tensor | None = None
    beam_logprobs: torch.Tensor | None = None


class _Stepper:
    """Next-token logits for the newest position of every row, with or without the cache."""

    def __init__(
        self,
        model: CaptionerModel,
        memory: torch.Tensor,
        rows_per_image: int,
        steps: int,
        use_cache: bool,
        need_weights: bool,
    ) -> None:
        self.decoder = model.decoder
        self.need_weights = need_weights
        self.cache: DecoderCache | None = None
        self.memory: torch.Tensor | None = None
        if use_cache:
            self.cache = self.decoder.init_cache(memory, max_len=steps)
        else:  # the reference: every row carries its own copy of the image tokens
            self.memory = memory.repeat_interleave(rows_per_image, dim=0)

    def __call__(
        self, prefix: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Prefix (N, t) -> log-probabilities (N, vocab) of the next token and, if asked,
        the newest query's image attention (N, layers, heads, S) and self-attention
        (N, layers, heads, t)."""
        tokens = prefix if self.cache is None else prefix[:, -1:]
        out = self.decoder(
            tokens, self.memory, need_weights=self.need_weights, cache=self.cache, last_only=True
        )
        logprobs = out.logits[:, -1].float().log_softmax(dim=-1)
        if not self.need_weights:
            return logprobs, None, None
        assert out.image_attention is not None and out.self_attention is not None
        image = torch.stack([w[:, :, -1] for w in out.image_attention], dim=1)
        self_weights = torch.stack([w[:, :, -1] for w in out.self_attention], dim=1)
        return logprobs, image.float(), self_weights.float()

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues old row `rows[i]`. Without a cache the prefixes say it all, and the
        image rows need no change: beams never move to another image."""
        if self.cache is not None:
            self.cache.reorder(rows)


class _Recorder:
    """Per-step attention of every row, kept until the finished captions are known."""

    def __init__(self, steps: int, rows: int, model: CaptionerModel, device: torch.device):
        decoder, heads = model.decoder, model.decoder.heads
        tokens = model.image_tokens  # every image token the decoder reads
        self.image = torch.zeros(steps, rows, decoder.image_layers, heads, tokens, device=device)
        layers = len(decoder.blocks)
        self.self = torch.zeros(steps, rows, layers, heads, steps, device=device)

    def record(self, step: int, image: torch.Tensor | None, self_w: torch.Tensor | None) -> None:
        assert image is not None and self_w is not None
        self.image[step] = image
        self.self[step, ..., : step + 1] = self_w

    def gather(
        self, query_rows: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of each caption's positions; `query_rows` (M, T) names the row whose
        query chose each position. Returns (M, layers, heads, T, S) and (M, layers, heads, T, T).
        """
        steps = query_rows.shape[1]
        at = torch.arange(steps, device=query_rows.device)
        live = (at[None, :] < lengths[:, None]).float()[:, None, None, :, None]  # (M,1,1,T,1)
        image = self.image[at[None, :], query_rows].permute(0, 2, 3, 1, 4) * live
        self_w = self.self[at[None, :], query_rows, ..., :steps].permute(0, 2, 3, 1, 4) * live
        return image, self_w


def _pick(
    scores: torch.Tensor, options: DecodingOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """The most likely token of each row (N, vocab) -> (N,), or one drawn from the filtered
    distribution (temperature, then top-k, then top-p)."""
    if not options.do_sample:
        return scores.argmax(dim=-1)
    # The best word shifted to 0, the rest below it, then scaled by 1 / temperature kept
    # within [1e-30, 1e30]: beyond that sampling is greedy (or uniform) already, and a float32
    # scale of 0 or infinity would turn the excluded words' -inf (or the best word's 0) to NaN.
    scale = min(max(1.0 / options.temperature, 1e-30), 1e30)
    logits = (scores - scores.max(dim=-1, keepdim=True).values) * scale
    if 0 < options.top_k < logits.shape[-1]:
        kth = logits.topk(options.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= options.top_p
        outside[:, 0] = False  # the most likely always stays (a top_p below float32's range)
        logits = logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@dataclass
class _Search:
    """What every search strategy works with."""

    stepper: _Stepper
    recorder: _Recorder | None
    batch: int  # images (beam search); rows (greedy, sampling: samples x images)
    steps: int  # most tokens per caption
    ids: tuple[int, int, int]  # <bos>, <eos>, <pad>
    options: DecodingOptions
    device: torch.device
    vocab_size: int

    def __post_init__(self) -> None:
        bos_id, eos_id, pad_id = self.ids
        # Added to the log-probabilities before choosing: never <pad> or <bos>, and no <eos>
        # before `min_length` tokens. One tensor each, made once.
        self.bias = torch.zeros(self.vocab_size, device=self.device)
        self.bias[[bos_id, pad_id]] = float("-inf")
        self.bias_before_min = self.bias.clone()
        self.bias_before_min[eos_id] = float("-inf")

    def allowed(self, logprobs: torch.Tensor, step: int) -> torch.Tensor:
        """The scores to choose from at `step`: -inf for the tokens not allowed there."""
        return logprobs + (self.bias_before_min if step < self.options.min_length else self.bias)

    def greedy_or_sample(self, generator: torch.Generator | None) -> Generated:
        """One caption per image: the most likely word at every step, or a drawn one."""
        stepper, recorder, options, device = self.stepper, self.recorder, self.options, self.device
        batch, steps, ids = self.batch, self.steps, self.ids
        bos_id, eos_id, pad_id = ids
        seq = torch.full((batch, steps + 1), pad_id, dtype=torch.long, device=device)
        seq[:, 0] = bos_id
        token_logprobs = torch.zeros(batch, steps, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        ran = 0
        for t in range(steps):
            logprobs, image, self_w = stepper(seq[:, : t + 1])
            choice = _pick(self.allowed(logprobs, t), options, generator).masked_fill_(done, pad_id)
            seq[:, t + 1] = choice
            token_logprobs[:, t] = logprobs.gather(1, choice[:, None]).squeeze(1)
            if recorder is not None:
                recorder.record(t, image, self_w)
            done |= choice == eos_id
            ran = t + 1
            if done.all():
                break
        tokens = seq[:, 1 : ran + 1]
        ended = tokens == eos_id
        lengths = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, ran)
        past_end = torch.arange(ran, device=device)[None, :] >= lengths[:, None]
        out = Generated(tokens, lengths, token_logprobs[:, :ran].masked_fill(past_end, 0.0))
        if recorder is not None:
            rows = torch.arange(batch, device=device)[:, None].expand(batch, ran)
            out.image_attention, out.self_attention = recorder.gather(rows, lengths)
        return out

    def beam_search(self) -> Generated:
        """Keep `beam_size` hypotheses per image; hypotheses that end go to a pool of the best
        `beam_size` per image; the best of the pool is returned.

        Every step records, for each row, its token, the row it continues and that token's
        log-probability; the returned captions are read back through those links, so tokens,
        log-probabilities and attention follow the chosen hypothesis's own history.
        """
        stepper, recorder, options, device = self.stepper, self.recorder, self.options, self.device
        batch, steps, ids = self.batch, self.steps, self.ids
        bos_id, eos_id, pad_id = ids
        k = options.beam_size
        rows = batch * k
        first_row = (torch.arange(batch, device=device) * k)[:, None]  # (B, 1)
        rank = torch.arange(2 * k, device=device)[None, :]  # (1, 2k)
        seq = torch.full((rows, steps + 1), pad_id, dtype=torch.long, device=device)
        seq[:, 0] = bos_id
        step_token = torch.zeros(steps, rows, dtype=torch.long, device=device)
        step_parent = torch.zeros(steps, rows, dtype=torch.long, device=device)
        step_logprob = torch.zeros(steps, rows, device=device)
        beam_scores = torch.zeros(batch, k, device=device)
        beam_scores[:, 1:] = float("-inf")  # all beams start identical: keep one
        # The pool of ended hypotheses: score, last step, the row whose query chose the last
        # token, that token and its log-probability.
        pool = {
            "score": torch.full((batch, k), float("-inf"), device=device),
            "step": torch.zeros(batch, k, dtype=torch.long, device=device),
            "row": torch.zeros(batch, k, dtype=torch.long, device=device),
            "token": torch.full((batch, k), pad_id, dtype=torch.long, device=device),
            "logprob": torch.zeros(batch, k, device=device),
        }
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        alpha = options.length_penalty
        ran = 0
        for t in range(steps):
            logprobs, image, self_w = stepper(seq[:, : t + 1])  # (rows, V)
            if recorder is not None:
                recorder.record(t, image, self_w)
            vocab = logprobs.shape[1]
            scores = self.allowed(logprobs, t) + beam_scores.view(rows, 1)
            top_scores, top = scores.view(batch, k * vocab).topk(2 * k, dim=1)  # (B, 2k)
            parent = first_row + top // vocab  # (B, 2k) rows
            token = top % vocab
            token_logprob = logprobs[parent, token]
            is_eos = token == eos_id
            # The next beams: the k best candidates that do not end with <eos>.
            pick = (rank + is_eos * 2 * k).argsort(dim=1)[:, :k]  # (B, k)
            live_scores, live_parent = top_scores.gather(1, pick), parent.gather(1, pick)
            live_token, live_logprob = token.gather(1, pick), token_logprob.gather(1, pick)

            # Hypotheses that end here: <eos> among the k best candidates, and at the length
            # limit every live beam.
            ends = [(is_eos & (rank < k), top_scores, parent, token, token_logprob)]
            if t == steps - 1:
                ends.append((torch.ones_like(pick, dtype=torch.bool), live_scores, live_parent,
                             live_token, live_logprob))  # fmt: skip
            for mask, score, row, tok, logprob in ends:
                mask = mask & ~done[:, None] & torch.isfinite(score)
                candidate = {
                    "score": (score / (t + 1) ** alpha).masked_fill(~mask, float("-inf")),
                    "step": torch.full_like(row, t), "row": row, "token": tok, "logprob": logprob,
                }  # fmt: skip
                merged = {key: torch.cat([pool[key], candidate[key]], dim=1) for key in pool}
                best = merged["score"].topk(k, dim=1).indices
                pool = {key: value.gather(1, best) for key, value in merged.items()}

            done |= self._beams_done(pool["score"], live_scores, t)

            rows_next = live_parent.reshape(rows)
            step_token[t], step_parent[t] = live_token.reshape(rows), rows_next
            step_logprob[t] = live_logprob.reshape(rows)
            seq = seq[rows_next]
            seq[:, t + 1] = step_token[t]
            beam_scores = live_scores
            stepper.reorder(rows_next)
            ran = t + 1
            if done.all():
                break

        links = (step_token[:ran], step_parent[:ran], step_logprob[:ran])
        return self._read_back(pool, links, ran)

    def _beams_done(self, ended: torch.Tensor, live: torch.Tensor, step: int) -> torch.Tensor:
        """(B,) whether each image can stop: `ended` (B, k) are the pool's length-penalised
        scores, `live` (B, k) the live beams' sums of log-probabilities after `step`."""
        full = torch.isfinite(ended).all(dim=1)
        rule, alpha = self.options.early_stopping, self.options.length_penalty
        if rule is True:
            return full
        # The best a live beam can reach: log-probabilities only fall as it grows, so with
        # length_penalty > 0 its score is highest at the longest length ("never"); the
        # heuristic (False) judges it at its current length.
        length = self.steps if rule == "never" and alpha > 0 else step + 1
        return full & (live.max(dim=1).values / length**alpha <= ended.min(dim=1).values)

    def _read_back(
        self,
        pool: dict[str, torch.Tensor],
        links: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        ran: int,
    ) -> Generated:
        """The best ended hypothesis of each image, and every hypothesis of the pool best
        first (`beam_tokens`, `beam_logprobs`)."""
        order = pool["score"].argsort(dim=1, descending=True)  # (B, k)
        ranked = [
            self._hypothesis(pool, links, ran, order[:, r : r + 1]) for r in range(order.shape[1])
        ]
        tokens, token_logprobs, query_rows, lengths = ranked[0]
        out = Generated(tokens, lengths, token_logprobs)
        if self.recorder is not None:
            out.image_attention, out.self_attention = self.recorder.gather(query_rows, lengths)
        ended = torch.isfinite(pool["score"].gather(1, order))  # (B, k): a pool slot ever filled
        out.beam_tokens = torch.stack([r[0] for r in ranked], dim=1)
        sums = torch.stack([r[1].sum(dim=1) for r in ranked], dim=1)
        out.beam_logprobs = sums.masked_fill(~ended, float("-inf"))
        return out

    def _hypothesis(
        self,
        pool: dict[str, torch.Tensor],
        links: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        ran: int,
        pick: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pool entry `pick` (B, 1) of each image, read back from its last token through
        the recorded (token, parent row, log-probability) of every step: its tokens, their
        log-probabilities, the row whose query chose each, and its length."""
        step_token, step_parent, step_logprob = links
        batch, device, pad_id = self.batch, self.device, self.ids[2]
        end = pool["step"].gather(1, pick).squeeze(1)  # (B,) last position
        query = pool["row"].gather(1, pick).squeeze(1)  # the row whose query chose it
        tokens = torch.full((batch, ran), pad_id, dtype=torch.long, device=device)
        token_logprobs = torch.zeros(batch, ran, device=device)
        query_rows = torch.zeros(batch, ran, dtype=torch.long, device=device)
        everyone = torch.arange(batch, device=device)
        tokens[everyone, end] = pool["token"].gather(1, pick).squeeze(1)
        token_logprobs[everyone, end] = pool["logprob"].gather(1, pick).squeeze(1)
        for s in reversed(range(ran)):
            inside = s < end
            tokens[:, s] = torch.where(inside, step_token[s, query], tokens[:, s])
            token_logprobs[:, s] = torch.where(inside, step_logprob[s, query], token_logprobs[:, s])
            query = torch.where(inside, step_parent[s, query], query)
            query_rows[:, s] = query
        return tokens, token_logprobs, query_rows, end + 1


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` without dropout for the block, then in the mode it was: decoding is always the
    deterministic model, whatever mode training left it in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: CaptionerModel,
    images: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    options: DecodingOptions | None = None,
    *,
    need_weights: bool = False,
    generator: torch.Generator | None = None,
    memory: torch.Tensor | None = None,
    samples: int = 1,
) -> Generated:
    """Captions for a batch of normalised images (B, C, H, W), one per image.

    With `need_weights` the result carries each token's image and self-attention, through the
    explicit attention path. `generator` makes sampling reproducible. `memory`: the image
    tokens, already encoded (`CaptionerModel.encode`), in place of `images`. `samples` > 1
    (sampling only) draws that many captions per image, rows image-major, every draw reading
    its image's cached keys and values: the captions self-critical training scores.
    """
    options = options or DecodingOptions()
    steps = options.resolve_max_length(model.config)
    if samples < 1 or (samples > 1 and not options.do_sample):
        raise ConfigError(f"{samples} captions per image need do_sample (and samples >= 1).")
    ids = (bos_id, eos_id, pad_id)
    with evaluating(model):
        if memory is None:
            assert images is not None
            memory, _ = model.encode(images)  # (B, S, D): once per image
        batch, device = memory.shape[0], memory.device
        k = max(options.beam_size, samples)  # rows per image
        search = _Search(
            stepper=_Stepper(model, memory, k, steps, options.use_cache, need_weights),
            recorder=_Recorder(steps, batch * k, model, device) if need_weights else None,
            batch=batch * samples, steps=steps, ids=ids, options=options, device=device,
            vocab_size=model.config.vocab_size,
        )  # fmt: skip
        return search.beam_search() if options.beam_size > 1 else search.greedy_or_sample(generator)
