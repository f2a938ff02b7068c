"""Checkpoints of earlier formats and layouts load and caption exactly as they did when written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.data import ShapesWorld

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = {
    # the first format: one hard-wired cross-attention architecture, flat keys
    "format1_tiny": ("cross_attention",),
    # the composed parts, written before the package was laid out in layers: a prefix
    # decoder with multi-query attention and rotary positions, an encoder with 2-D rotary ones
    "parts_prefix_tiny": ("image_attention", "self_attention", "encoder_attention"),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("decoding", ["greedy", "beam3"])
def test_a_checkpoint_of_an_earlier_version_captions_as_it_did(name: str, decoding: str) -> None:
    expected = json.loads((FIXTURES / f"{name}.json").read_text())[decoding]
    captioner = Captioner.from_checkpoint(FIXTURES / f"{name}.ckpt")
    world = ShapesWorld(image_size=(32, 48), max_objects=2, seed=0)
    images = [Image.fromarray(world.render(world.scene("test", i))) for i in range(4)]
    beam_size = 3 if decoding == "beam3" else 1
    captions = captioner.caption(
        images, return_attention=True, return_encoder_attention=True, beam_size=beam_size
    )
    assert len({c["text"] for c in expected}) > 1  # the images are told apart
    for caption, want in zip(captions, expected, strict=True):
        assert caption.text == want["text"] and caption.tokens == want["tokens"]
        torch.testing.assert_close(
            caption.token_logprobs, torch.tensor(want["token_logprobs"]), atol=1e-5, rtol=1e-5
        )
        for field in CHECKPOINTS[name]:
            got = caption.image_attention if field == "cross_attention" else getattr(caption, field)
            torch.testing.assert_close(got, torch.tensor(want[field]), atol=1e-5, rtol=1e-5)
        if "alternatives" in want:  # beam search's every ended hypothesis, best first
            if want["alternatives"] is None:
                assert caption.alternatives is None
                continue
            assert caption.alternatives is not None
            assert [text for text, _ in caption.alternatives] == [
                a[0] for a in want["alternatives"]
            ]
            got = torch.tensor([logp for _, logp in caption.alternatives])
            wanted = torch.tensor([a[1] for a in want["alternatives"]])
            torch.testing.assert_close(got, wanted, atol=1e-5, rtol=1e-5)
