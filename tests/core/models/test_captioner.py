"""Invariants of the encoder, decoder and attention that must hold at any size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner.core.errors import ConfigError
from captioner.core.models import Attention, CaptionerConfig, CaptionerModel, PrefixDecoder
from captioner.core.models.attention import attention_mask
from captioner.tools.benchmark.timing import CPU_ATTENTION_FLOPS
from tests.helpers import FUSIONS, open_gates, tiny_config


def inputs(batch: int = 2, length: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 24, generator=g), torch.randint(
        4, 23, (batch, length), generator=g
    )


def test_future_tokens_cannot_change_earlier_logits(fusion_model: CaptionerModel) -> None:
    images, tokens = inputs()
    base = fusion_model(images, tokens)
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 23
    out = fusion_model(images, changed)
    torch.testing.assert_close(out[:, :4], base[:, :4])
    assert not torch.allclose(out[:, 4:], base[:, 4:])


def test_encoder_is_bidirectional(tiny_model: CaptionerModel) -> None:
    images, _ = inputs()
    first, _ = tiny_model.encoder(images)
    changed = images.clone()
    changed[..., -4:, -4:] += 1.0  # pixels of the last (bottom-right) patch only
    second, _ = tiny_model.encoder(changed)
    assert not torch.allclose(first[:, 0], second[:, 0])  # the first patch token moved


def test_patch_tokens_are_row_major(tiny_model: CaptionerModel) -> None:
    assert tiny_model.encoder.grid_size == (4, 6)
    assert tiny_model.encoder.num_prefix_tokens == 0
    images, _ = inputs()
    base = tiny_model.encoder.patch_embed(images)
    changed = images.clone()
    changed[..., 4:8, 12:16] += 1.0  # pixel block of patch row 1, column 3
    diff = (tiny_model.encoder.patch_embed(changed) - base).abs().sum(dim=(0, 2))
    assert diff.nonzero().flatten().tolist() == [1 * 6 + 3]


def test_decoder_reads_the_image(fusion_model: CaptionerModel) -> None:
    images, tokens = inputs()
    other = torch.randn_like(images)
    assert not torch.allclose(fusion_model(images, tokens), fusion_model(other, tokens))


def test_padded_tokens_change_nothing(fusion_model: CaptionerModel) -> None:
    images, tokens = inputs(length=5)
    base = fusion_model(images, tokens)
    padded = torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    mask = torch.zeros_like(padded, dtype=torch.bool)
    mask[:, 5:] = True
    out = fusion_model(images, padded, token_padding_mask=mask)
    torch.testing.assert_close(out[:, :5], base)
    # and masked keys really are ignored: changing the pad ids changes no real position
    out2 = fusion_model(images, padded.masked_fill(mask, 7), token_padding_mask=mask)
    torch.testing.assert_close(out2[:, :5], base)


def test_masked_image_tokens_are_ignored_by_image_attention(fusion_model: CaptionerModel) -> None:
    images, tokens = inputs()
    memory, _ = fusion_model.encoder(images)
    mask = torch.zeros(memory.shape[:2], dtype=torch.bool)
    mask[:, 10:] = True
    base = fusion_model.decoder(tokens, memory, memory_padding_mask=mask).logits
    noisy = memory.clone()
    noisy[:, 10:] = torch.randn_like(noisy[:, 10:])
    out = fusion_model.decoder(tokens, noisy, memory_padding_mask=mask).logits
    torch.testing.assert_close(out, base)
    unmasked = fusion_model.decoder(tokens, noisy).logits
    assert not torch.allclose(unmasked, base)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_and_explicit_attention_agree(causal: bool, cross: bool, padded: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=4, kv_dim=12 if cross else None).eval()
    x = torch.randn(3, 5, 16)
    context = torch.randn(3, 9, 12) if cross else None
    keys = 9 if cross else 5
    mask = None
    if padded:
        mask = torch.zeros(3, keys, dtype=torch.bool)
        mask[1, -2:] = True
    fused, none = attn(x, context, causal=causal and not cross, key_padding_mask=mask)
    explicit, weights = attn(
        x, context, causal=causal and not cross, key_padding_mask=mask, need_weights=True
    )
    assert none is None
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, 4, 5, keys)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 5))
    if causal and not cross:
        assert torch.all(weights.triu(diagonal=1) == 0)
    if padded:
        assert torch.all(weights[1, ..., -2:] == 0)


def test_causal_mask_for_queries_that_end_a_longer_sequence() -> None:
    """A step appending two tokens to four cached ones sees exactly what a full pass sees."""
    full = attention_mask(6, 6, causal=True, key_padding_mask=None, device=torch.device("cpu"))
    step = attention_mask(2, 6, causal=True, key_padding_mask=None, device=torch.device("cpu"))
    assert torch.equal(step, full[4:])
    assert torch.equal(full, torch.ones(6, 6, dtype=torch.bool).tril())


def test_model_paths_agree_and_return_every_map(fusion_model: CaptionerModel) -> None:
    images, tokens = inputs()
    out = fusion_model.forward_with_attention(images, tokens)
    torch.testing.assert_close(out.logits, fusion_model(images, tokens), atol=1e-5, rtol=1e-5)
    assert len(out.encoder_attention) == 2 and out.encoder_attention[0].shape == (2, 4, 24, 24)
    heads = fusion_model.config.decoder.heads  # per query head, however many key/value heads
    assert len(out.self_attention) == 2 and out.self_attention[0].shape == (2, heads, 7, 7)
    assert len(out.image_attention) == fusion_model.decoder.image_layers
    for image in out.image_attention:  # words x patches, whatever the fusion
        assert image.shape == (2, heads, 7, 24)
    if fusion_model.config.decoder.kind == "prefix":  # one softmax over image and words
        total = out.image_attention[0].sum(-1) + out.self_attention[0].sum(-1)
        torch.testing.assert_close(total, torch.ones(2, heads, 7))
        assert torch.all(out.self_attention[0].triu(diagonal=1) == 0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_parameter_gets_a_gradient(fusion: str) -> None:
    model = open_gates(CaptionerModel(tiny_config(pos_embed="learned", **FUSIONS[fusion])))
    images, tokens = inputs()
    loss = model(images, tokens).logsumexp(-1).mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


def test_embeddings_are_tied_and_init_ran() -> None:
    model = CaptionerModel(tiny_config(encoder_dim=64, decoder_dim=64, vocab_size=500))
    assert model.decoder.head.weight is model.decoder.token_embed.weight
    assert abs(model.decoder.token_embed.weight.std().item() - 0.02) < 0.003
    q = model.encoder.blocks[0].attn.qkv_proj
    assert abs(q.weight.std().item() - 0.02) < 0.004 and torch.all(q.bias == 0)
    out_std = model.encoder.blocks[0].attn.out_proj.weight.std().item()
    assert out_std < 0.015  # residual projections are scaled down by depth
    patch = model.encoder.patch_embed.proj.weight  # (D, C, p, p): LeCun normal
    assert abs(patch.std().item() * patch[0].numel() ** 0.5 - 1.0) < 0.15


def test_sincos_position_embedding_is_fixed_and_distinct() -> None:
    model = CaptionerModel(tiny_config(pos_embed="sincos"))
    names = {n for n, _ in model.named_parameters()}
    assert "encoder.pos_embed" not in names
    pos = model.encoder.pos_embed[0]  # (N, D)
    assert pos.shape == (24, 32)
    assert torch.cdist(pos, pos).add(torch.eye(24) * 10).min() > 0.1  # every patch differs


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": (16, 22)}, "model.encoder.patch_size"),
        ({"encoder_dim": 30}, "model.encoder.heads"),
        ({"decoder_heads": 5}, "model.decoder.heads"),
        ({"pos_embed": "spiral"}, "model.encoder.pos_embed"),
        ({"encoder_depth": 0}, "model.encoder.depth"),
        ({"pos_embed": "sincos", "encoder_dim": 34, "encoder_heads": 2}, "divisible by 4"),
    ],
)
def test_config_errors_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**changes)


def test_unknown_config_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="model.patch_sise"):
        CaptionerConfig.from_dict({"vocab_size": 10, "patch_sise": 8})


def test_config_round_trips_as_plain_types() -> None:
    config = tiny_config()
    state = config.to_dict()
    assert state["encoder"]["image_size"] == [16, 24]
    assert CaptionerConfig.from_dict(state) == config


def test_labels_name_what_differs_from_multi_head_attention() -> None:
    assert tiny_config(decoder_heads=4).label == "cross"
    mqa = {"decoder.kv_heads": 1, "decoder.pos_embed": "rope"}
    assert tiny_config("prefix", decoder_heads=4, **mqa).label == "prefix, MQA, RoPE"
    both = {**mqa, "decoder.kv_heads": 2, "encoder.kv_heads": 1, "encoder.pos_embed": "rope"}
    label = tiny_config(decoder_heads=4, **both).label
    assert label == "cross, GQA 2, RoPE (encoder: MQA, 2-D RoPE)"  # a Markdown table cell


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"decoder.kv_heads": 3}, "model.decoder.kv_heads=3 does not divide"),
        ({"encoder.kv_heads": 0}, "model.encoder.kv_heads must be a positive"),
        ({"decoder.pos_embed": "sincos"}, "model.decoder.pos_embed must be"),
        ({"encoder.pos_embed": "rope", "encoder_dim": 24}, "divisible by 4"),
    ],
)
def test_attention_variant_errors_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(decoder_heads=4, **changes)


def test_wrong_image_size_is_a_clear_error(tiny_model: CaptionerModel) -> None:
    with pytest.raises(ValueError, match="data.image_size"):
        tiny_model(torch.randn(1, 3, 16, 16), torch.ones(1, 3, dtype=torch.long))


def test_decoding_with_the_cache_equals_the_full_pass(fusion_model: CaptionerModel) -> None:
    images, tokens = inputs(length=7)
    memory, _ = fusion_model.encoder(images)
    full = fusion_model.decoder(tokens, memory).logits
    cache = fusion_model.decoder.init_cache(memory)
    steps = [fusion_model.decoder(tokens[:, :3], None, cache=cache).logits]  # a prompt, then 1 by 1
    buffer = cache.layers[0].keys
    assert buffer is not None
    pointer = buffer.data_ptr()
    steps += [
        fusion_model.decoder(tokens[:, t : t + 1], None, cache=cache).logits for t in range(3, 7)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 7
    assert cache.layers[0].keys.data_ptr() == pointer  # allocated once, written in place
    with pytest.raises(ValueError, match="model.max_len"):
        fusion_model.decoder(tokens[:, :6], None, cache=cache)


def test_beams_share_the_image_keys_without_copies() -> None:
    """Rows b*G..b*G+G-1 reading image b's keys equal each row having its own copy."""
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=4, kv_dim=12).eval()
    context = torch.randn(2, 9, 12)
    x = torch.randn(6, 3, 16)  # 3 beams for each of 2 images
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -3:] = True
    for need_weights in (False, True):
        shared, w_shared = attn(
            x, kv=attn.project_kv(context), key_padding_mask=padding, need_weights=need_weights
        )
        copied, w_copied = attn(
            x, context.repeat_interleave(3, 0), key_padding_mask=padding.repeat_interleave(3, 0),
            need_weights=need_weights,
        )  # fmt: skip
        torch.testing.assert_close(shared, copied, atol=1e-6, rtol=1e-5)
        if need_weights:
            torch.testing.assert_close(w_shared, w_copied, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cross-attention"):
        attn(x, kv=attn.project_kv(context), causal=True)


def test_prefix_mask_is_bidirectional_over_the_image_and_causal_over_the_words() -> None:
    mask = PrefixDecoder.prefix_mask(3, 4, torch.device("cpu"))
    assert mask[:3, :3].all()  # image positions see every image position
    assert not mask[:3, 3:].any()  # and no word
    assert mask[3:, :3].all()  # a word sees every image position
    assert torch.equal(mask[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())  # and the past


def test_prefix_image_positions_never_see_the_words() -> None:
    """The image positions' states, at every block, are the same whatever the caption: what
    lets decoding compute them once per image."""
    torch.manual_seed(0)
    model = CaptionerModel(tiny_config(decoder="prefix")).eval()
    images, tokens = inputs()
    states: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _m, _args, out: states.append(out[0][:, :24]))
        for block in model.decoder.blocks
    ]
    try:
        model(images, tokens)
        first, states[:] = list(states), []
        model(images, torch.flip(tokens, dims=[1]))
    finally:
        for hook in hooks:
            hook.remove()
    for before, after in zip(first, states, strict=True):
        torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_gated_cross_attention_starts_shut_and_learns_to_open() -> None:
    """tanh(0) = 0: a fresh gated decoder ignores the image, the gate still gets a gradient
    (the cross-attention's output), and the cross-attention's own weights get none yet."""
    torch.manual_seed(0)
    model = CaptionerModel(tiny_config(cross_every=2)).train()
    reading = [block for block in model.decoder.blocks if block.reads_image]
    assert len(reading) == 1 and model.decoder.blocks[0] is reading[0]
    images, tokens = inputs()
    logits = model(images, tokens)
    torch.testing.assert_close(model(torch.randn_like(images), tokens), logits)
    logits.logsumexp(-1).mean().backward()
    gate, cross = reading[0].cross_gate, reading[0].cross_attn
    assert gate.grad is not None and gate.grad.abs() > 0
    assert all(p.grad is None or not p.grad.any() for p in cross.parameters())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_attention_flops_are_what_the_kernels_count(fusion: str) -> None:
    """The analytic attention cost of a teacher-forced pass equals FlopCounterMode's count of
    the attention kernels it runs, for every fusion."""
    model = CaptionerModel(tiny_config(**FUSIONS[fusion])).eval()
    images, tokens = inputs(batch=1)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as c:
        model(images, tokens)
    counted = sum(n for op, n in c.get_flop_counts()["Global"].items() if "attention" in str(op))
    assert counted > 0 and sum(model.attention_flops(7, cached=False).values()) == counted
    cached = model.attention_flops(7)
    assert cached["decoder_self"] < model.attention_flops(7, cached=False)["decoder_self"]
