"""Caption generation. Runs without gradients and leaves the model's train/eval mode as it was."""

from __future__ import annotations

import torch

from captioner.models import CaptionerModel


@torch.no_grad()
def greedy_decode(
    model: CaptionerModel, images: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, max_len: int
) -> torch.Tensor:
    """Most likely next word at every step; returns (B, L) ids starting with `<bos>`.

    The image is encoded once; finished rows are padded so a batch stops together.
    """
    was_training = model.training
    model.eval()
    try:
        memory, _ = model.encoder(images)  # (B, N, D)
        tokens = torch.full((images.shape[0], 1), bos_id, dtype=torch.long, device=images.device)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        for _ in range(min(max_len, model.config.max_len) - 1):
            logits = model.decoder(tokens, memory).logits[:, -1]  # (B, vocab)
            step = logits.argmax(dim=-1).masked_fill(done, pad_id)
            tokens = torch.cat([tokens, step[:, None]], dim=1)
            done |= step == eos_id
            if done.all():
                break
        return tokens
    finally:
        model.train(was_training)
