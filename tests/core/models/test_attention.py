"""Grouped-query attention and rotary positions: what each must equal, and what it must change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner.core.checkpoint import export, load_checkpoint
from captioner.core.inference import Captioner
from captioner.core.models import Attention, CaptionerModel
from captioner.core.models.rotary import rotate, rotation
from tests.helpers import compose_train, tiny_config


def repeated_heads(gqa: Attention) -> Attention:
    """Multi-head attention whose every query head has its own copy of the key/value head
    `gqa` gives it (head h reads key/value head h // group): what grouping must equal."""
    dim, heads = gqa.out_proj.in_features, gqa.num_heads
    kv_dim = gqa.kv_proj.in_features if gqa.is_cross else None
    mha = Attention(dim, heads, kv_dim=kv_dim).eval()
    group, width = heads // gqa.kv_heads, gqa.head_dim

    def widen(weight: torch.Tensor) -> torch.Tensor:  # (kv_heads * d, ...) -> (heads * d, ...)
        blocks = weight.unflatten(0, (gqa.kv_heads, width))
        return blocks.repeat_interleave(group, dim=0).flatten(0, 1)

    with torch.no_grad():
        for name in ("weight", "bias"):
            if gqa.is_cross:
                getattr(mha.q_proj, name).copy_(getattr(gqa.q_proj, name))
                k, v = getattr(gqa.kv_proj, name).chunk(2)
                getattr(mha.kv_proj, name).copy_(torch.cat([widen(k), widen(v)]))
            else:
                packed = getattr(gqa.qkv_proj, name)
                q, k, v = packed.split([dim, gqa.kv_heads * width, gqa.kv_heads * width])
                getattr(mha.qkv_proj, name).copy_(torch.cat([q, widen(k), widen(v)]))
            getattr(mha.out_proj, name).copy_(getattr(gqa.out_proj, name))
    return mha


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_grouped_query_attention_equals_heads_that_share_copies(
    kv_heads: int, cross: bool, need_weights: bool
) -> None:
    """Causal and padded; for cross-attention also 3 beams per image reading its keys."""
    torch.manual_seed(0)
    gqa = Attention(16, 4, kv_dim=12 if cross else None, kv_heads=kv_heads).eval()
    mha = repeated_heads(gqa)
    x = torch.randn(6, 5, 16)
    padding = torch.zeros(6, 5, dtype=torch.bool)
    padding[1, -2:] = True
    if cross:
        context = torch.randn(2, 9, 12)
        image_padding = torch.zeros(2, 9, dtype=torch.bool)
        image_padding[1, -3:] = True
        ours, w_ours = gqa(x, kv=gqa.project_kv(context), key_padding_mask=image_padding,
                           need_weights=need_weights)  # fmt: skip
        theirs, w_theirs = mha(x, context.repeat_interleave(3, 0), need_weights=need_weights,
                               key_padding_mask=image_padding.repeat_interleave(3, 0))  # fmt: skip
    else:
        ours, w_ours = gqa(x, causal=True, key_padding_mask=padding, need_weights=need_weights)
        theirs, w_theirs = mha(x, causal=True, key_padding_mask=padding, need_weights=need_weights)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    if need_weights:  # one map per query head, (B, heads, T, S)
        assert w_ours.shape == w_theirs.shape == (6, 4, 5, 9 if cross else 5)
        torch.testing.assert_close(w_ours, w_theirs, atol=1e-6, rtol=1e-5)


def test_all_heads_as_key_value_heads_is_multi_head_attention() -> None:
    """`kv_heads = heads` is PyTorch's own multi-head attention, given the same weights."""
    torch.manual_seed(0)
    ours = Attention(16, 4, kv_heads=4).eval()
    reference = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.qkv_proj.weight)
        reference.in_proj_bias.copy_(ours.qkv_proj.bias)
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(3, 6, 16)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True: may not attend
    expected, weights = reference(x, x, x, attn_mask=future, average_attn_weights=False)
    for need_weights in (False, True):
        out, w = ours(x, causal=True, need_weights=need_weights)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, weights, atol=1e-6, rtol=1e-5)


def test_the_fused_kernel_reads_the_stored_keys_and_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Query heads and beams are folded onto the keys/values as stored: no per-head copies."""
    torch.manual_seed(0)
    attn = Attention(16, 4, kv_dim=12, kv_heads=1).eval()
    kv = attn.project_kv(torch.randn(2, 9, 12))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append((q.shape, k.data_ptr(), v.data_ptr(), k.shape))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr("captioner.core.models.attention.F.scaled_dot_product_attention", spy)
    attn(torch.randn(6, 1, 16), kv=kv)  # 3 beams per image, one decoding step
    (q_shape, k_ptr, v_ptr, k_shape), = seen  # fmt: skip
    assert (k_ptr, v_ptr) == (kv[0].data_ptr(), kv[1].data_ptr())
    assert k_shape == (2, 1, 9, 4) and q_shape == (2, 1, 3 * 4, 4)  # beams x heads queries


@pytest.mark.parametrize("decoder", ["cross", "prefix"])
def test_the_cache_shrinks_by_heads_over_kv_heads(decoder: str) -> None:
    sizes = {}
    for kv_heads in (4, 2, 1):
        config = tiny_config(decoder, decoder_heads=4, **{"decoder.kv_heads": kv_heads})
        model = CaptionerModel(config).eval()
        memory, _ = model.encoder(torch.randn(3, 3, 16, 24))
        cache = model.decoder.init_cache(memory)
        model.decoder(torch.ones(3, 5, dtype=torch.long), None, cache=cache)
        sizes[kv_heads] = cache.nbytes
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


def scores(
    q: torch.Tensor, k: torch.Tensor, at_q: torch.Tensor, at_k: torch.Tensor
) -> torch.Tensor:
    """q . k after rotating each by its position (one position row per vector)."""
    head_dim = q.shape[-1]
    return (rotate(q, rotation(at_q, head_dim)) * rotate(k, rotation(at_k, head_dim))).sum(-1)


@pytest.mark.parametrize("axes", [1, 2])
def test_rope_scores_depend_only_on_the_offset(axes: int) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(50, 16), torch.randn(50, 16)
    at_q = torch.randint(0, 30, (50, axes)).float()
    at_k = torch.randint(0, 30, (50, axes)).float()
    base = scores(q, k, at_q, at_k)
    for shift in (1, 7, 100):
        moved = scores(q, k, at_q + shift, at_k + shift)
        torch.testing.assert_close(moved, base, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(q, k, at_q, at_k + 1), base, atol=1e-2)  # offsets matter
    norms = rotate(q, rotation(at_q, 16)).norm(dim=-1)
    torch.testing.assert_close(norms, q.norm(dim=-1))  # a rotation: lengths kept


def test_2d_rope_tells_rows_from_columns() -> None:
    """A step right and a step down each move the score, and differently."""
    torch.manual_seed(0)
    q, k = torch.randn(20, 16), torch.randn(20, 16)
    origin = torch.zeros(20, 2)
    same = scores(q, k, origin, origin)
    right = scores(q, k, origin, torch.tensor([[0.0, 1.0]]).expand(20, 2))
    down = scores(q, k, origin, torch.tensor([[1.0, 0.0]]).expand(20, 2))
    for one, other in ((right, same), (down, same), (right, down)):
        assert (one - other).abs().min() > 1e-4


def sharpened(model: CaptionerModel) -> CaptionerModel:
    """Weights of variance 4 / fan-in: attention far from uniform, so positions show."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 2 / param[0].numel() ** 0.5)
    return model


def test_rope_encoder_sees_the_layout_not_just_the_patches() -> None:
    """1-pixel patches: transposing a square image transposes its patch tokens. Without
    positions the encoder is blind to that (it permutes its output the same way); with 2-D
    RoPE, whose rows and columns turn different channels, the output changes."""
    torch.manual_seed(0)
    config = tiny_config(image_size=(6, 6), patch_size=1, **{"encoder.pos_embed": "rope"})
    encoder = sharpened(CaptionerModel(config).eval()).encoder

    def transposed_back(image: torch.Tensor) -> torch.Tensor:
        tokens, _ = encoder(image.transpose(-1, -2))
        return tokens.unflatten(1, (6, 6)).transpose(1, 2).flatten(1, 2)

    image = torch.randn(1, 3, 6, 6)
    assert (transposed_back(image) - encoder(image)[0]).abs().max() > 1e-2
    encoder.rope = None  # the same encoder without positions: blind to the transpose
    torch.testing.assert_close(transposed_back(image), encoder(image)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["cross", "prefix"])
def test_rope_words_get_their_position_across_cache_offsets(decoder: str) -> None:
    """Prompts of 3, then 2, then 1 token through the cache equal one pass. The words'
    positions are rotary only (no learned table), and they are read: in one block, swapping
    two earlier words changes the last word's output, which attention without positions (a
    bag of words there) cannot tell apart."""
    torch.manual_seed(0)
    model = sharpened(CaptionerModel(tiny_config(decoder, **{"decoder.pos_embed": "rope"})))
    assert model.decoder.pos_embed is None
    memory, _ = model.encoder(torch.randn(2, 3, 16, 24))
    tokens = torch.randint(3, 23, (2, 6))
    full = model.decoder(tokens, memory).logits
    cache = model.decoder.init_cache(memory)
    parts = [
        model.decoder(tokens[:, a:b], None, cache=cache).logits for a, b in ((0, 3), (3, 5), (5, 6))
    ]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    config = tiny_config(decoder, decoder_depth=1, **{"decoder.pos_embed": "rope"})
    model = sharpened(CaptionerModel(config))
    full = model.decoder(tokens, memory).logits
    swapped = tokens[:, [1, 0, 2, 3, 4, 5]]
    last = model.decoder(swapped, memory).logits[:, -1]
    assert (last - full[:, -1]).abs().max() > 1e-2
    model.decoder.rope = None  # no positions at all: the swap is invisible
    torch.testing.assert_close(
        model.decoder(swapped, memory).logits[:, -1], model.decoder(tokens, memory).logits[:, -1],
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


VARIANTS = {
    "mqa_rope": ["model.encoder.kv_heads=1", "model.decoder.kv_heads=1",
                 "model.encoder.pos_embed=rope", "model.decoder.pos_embed=rope"],
    "prefix_gqa": ["model/decoder=prefix", "model.decoder.heads=4", "model.decoder.kv_heads=2",
                   "model.encoder.kv_heads=1"],
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_round_trips_through_ckpt_and_export(variant: str, tmp_path: Path) -> None:
    """A briefly trained variant: its `.ckpt` and its safetensors export rebuild the same
    architecture and weights, and caption alike."""
    from captioner.training.tasks import train

    cfg = compose_train(
        "experiment=shapes_tiny", "data.num_test=8", "trainer.max_epochs=1",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "test=false",
        "~logger", "callbacks.lr_monitor=null", "callbacks.rich_progress_bar=null",
        *VARIANTS[variant], output_dir=tmp_path,
    )  # fmt: skip
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    contents = load_checkpoint(ckpt)
    assert contents.config.label != "cross"  # the variant, not the default, was saved
    export(contents, tmp_path / "exported")
    images = torch.rand(3, 3, 64, 64)
    expected = Captioner.from_checkpoint(ckpt).caption(images, beam_size=2)
    again = Captioner.from_checkpoint(tmp_path / "exported")
    assert again.model.config == contents.config
    for a, b in zip(again.caption(images, beam_size=2), expected, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs)
    state = again.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in contents.state_dict.items())
