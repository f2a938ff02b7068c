"""Checkpoints of earlier formats load and caption exactly as they did when written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.data import ShapesWorld
from captioner.inference import Captioner

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("decoding", ["greedy", "beam3"])
def test_a_first_format_checkpoint_captions_as_it_did(decoding: str) -> None:
    expected = json.loads((FIXTURES / "format1_tiny.json").read_text())[decoding]
    captioner = Captioner.from_checkpoint(FIXTURES / "format1_tiny.ckpt")
    world = ShapesWorld(image_size=(32, 48), max_objects=2, seed=0)
    images = [Image.fromarray(world.render(world.scene("test", i))) for i in range(4)]
    beam_size = 3 if decoding == "beam3" else 1
    captions = captioner.caption(images, return_attention=True, beam_size=beam_size)
    assert len({c["text"] for c in expected}) > 1  # the images are told apart
    for caption, want in zip(captions, expected, strict=True):
        assert caption.text == want["text"] and caption.tokens == want["tokens"]
        torch.testing.assert_close(
            caption.token_logprobs, torch.tensor(want["token_logprobs"]), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            caption.image_attention, torch.tensor(want["cross_attention"]), atol=1e-5, rtol=1e-5
        )
