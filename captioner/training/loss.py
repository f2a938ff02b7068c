"""Next-word cross-entropy fused with the output projection, computed in chunks of rows.

Materialising (tokens x vocabulary) logits, their log-softmax and its gradient costs more time
than the rest of a small captioner's training step on a CPU: those passes are memory-bound
over tensors far larger than the cache. Here each chunk of rows goes through projection,
log-sum-exp, loss and gradient while it is still in cache, the gradient overwriting the
logits in place, and rows whose target is padding are never projected at all.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in float32): big matmuls, cache-warm passes


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for this device, else the tensors' own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`; gradients are computed
    in the forward pass, chunk by chunk, and only scaled in the backward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        label_smoothing: float,
    ) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden.device, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_hidden = torch.empty(rows, hidden.shape[1], dtype=dtype, device=hidden.device)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            step = max(1, CHUNK_ELEMENTS // vocab)
            for start in range(0, rows, step):
                chunk, target = h[start : start + step], targets[start : start + step]
                logits = (chunk @ w.T).float()  # (c, V)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                loss = -(1.0 - label_smoothing) * picked
                if label_smoothing:
                    loss = loss - label_smoothing * logits.mean(dim=-1)
                # softmax in place, one exponential pass: exp(logits - max) / sum
                peak = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(peak).exp_()
                sums = probs.sum(dim=-1, keepdim=True)
                total += (loss + (peak + sums.log()).squeeze(1)).sum()  # + log-sum-exp
                # d mean loss / d logits = (softmax - (1 - eps) * one_hot - eps / V) / rows
                grad = probs.div_(sums * rows)
                grad[torch.arange(len(target), device=target.device), target] -= (
                    1.0 - label_smoothing
                ) / rows
                if label_smoothing:
                    grad -= label_smoothing / (vocab * rows)
                grad = grad.to(dtype)
                torch.mm(grad, w, out=grad_hidden[start : start + step])
                if dtype == torch.float32:
                    torch.addmm(grad_weight, grad.T, chunk, out=grad_weight)
                else:  # accumulate low-precision products in float32
                    grad_weight += (grad.T @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / rows  # NaN without rows, as F.cross_entropy

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_output.float()
        return (
            (grad_hidden.float() * scale).to(hidden_dtype),
            (grad_weight * scale).to(weight_dtype),
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ...)` without keeping the logits.

    `hidden` (..., D) and `targets` (...) hold the rows; rows whose target is `ignore_index`
    are dropped before the projection. The result and its gradients equal the unfused ones
    up to float rounding; under autocast the projections run in the autocast dtype and the
    softmax in float32, as the unfused loss on autocast logits does.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    return _LinearCrossEntropy.apply(
        hidden.index_select(0, keep), weight, targets.index_select(0, keep), label_smoothing
    )
