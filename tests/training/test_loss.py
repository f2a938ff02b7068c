"""The fused output projection + cross-entropy equals the unfused one, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from captioner.core.models import CaptionerModel
from captioner.training import loss as loss_module
from captioner.training.lit_module import teacher_forced_loss
from captioner.training.loss import linear_cross_entropy
from tests.helpers import tiny_config

PAD = 0


def _rows(rows: int = 37, dim: int = 16, vocab: int = 50) -> tuple[torch.Tensor, ...]:
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.3).requires_grad_()
    targets = torch.randint(1, vocab, (rows,))
    targets[::4] = PAD
    return hidden, weight, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])  # one row, uneven chunks, one chunk
def test_fused_loss_and_gradients_equal_unfused(
    smoothing: float, chunk_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    hidden, weight, targets = _rows()
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_rows * weight.shape[0])
    expected = F.cross_entropy(
        hidden @ weight.T, targets, ignore_index=PAD, label_smoothing=smoothing
    )
    fused = linear_cross_entropy(hidden, weight, targets, PAD, smoothing)
    torch.testing.assert_close(fused, expected)
    for got, want in zip(
        torch.autograd.grad(fused * 3.0, (hidden, weight)),
        torch.autograd.grad(expected * 3.0, (hidden, weight)),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


def test_fused_loss_under_bfloat16_autocast_matches_unfused() -> None:
    hidden, weight, targets = _rows(rows=64, dim=32, vocab=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=PAD)
        fused = linear_cross_entropy(hidden, weight, targets, PAD)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, expected, atol=1e-2, rtol=1e-2)
    got = torch.autograd.grad(fused, (hidden, weight))
    want = torch.autograd.grad(expected, (hidden, weight))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-3, rtol=5e-2)


def test_padding_rows_are_never_projected() -> None:
    hidden, weight, targets = _rows(rows=40)
    targets[:] = 5

    def flops(kept: int) -> int:
        t = targets.clone()
        t[kept:] = PAD
        with FlopCounterMode(display=False) as counter:
            linear_cross_entropy(hidden, weight, t, PAD).backward()
        return counter.get_total_flops()

    # forward projection + both gradients: 3 matmuls of (rows x D x V), for kept rows only
    assert flops(40) == 3 * 2 * 40 * 16 * 50
    assert flops(10) == 3 * 2 * 10 * 16 * 50


@pytest.mark.parametrize("decoder", ["cross", "prefix"])
def test_caption_loss_equals_cross_entropy_of_the_logits(decoder: str) -> None:
    model = CaptionerModel(tiny_config(decoder=decoder)).train()
    images = torch.randn(3, 3, 16, 24)
    tokens = torch.randint(3, 23, (3, 9))
    tokens[0, 6:] = PAD  # a shorter caption
    fused, cross = teacher_forced_loss(model, images, tokens, PAD, label_smoothing=0.1)
    assert cross is None
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    logits = model(images, tokens[:, :-1])
    expected = F.cross_entropy(
        logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD, label_smoothing=0.1
    )
    torch.testing.assert_close(fused, expected)
    # every weight, the embedding tied to the output projection included
    for got, want in zip(
        fused_grads, torch.autograd.grad(expected, list(model.parameters())), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    _, cross = teacher_forced_loss(model, images, tokens, PAD, need_weights=True)
    assert cross is not None and cross[0].shape == (3, 2, 8, 24)
