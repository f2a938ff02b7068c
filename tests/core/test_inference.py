"""The public inference API, checkpoints (safe loading, export) and the caption/eval scripts."""

from __future__ import annotations

import json
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.core.checkpoint import export, load_checkpoint
from captioner.core.errors import CheckpointError, ConfigError, ImageLoadError
from captioner.core.inference import Captioner, find_images
from captioner.core.models import CaptionerModel
from captioner.data import ImagePreprocess, ShapesWorld, Tokenizer, load_image
from tests.helpers import run_script, tiny_config


@pytest.fixture(scope="module")
def captioner(ckpt: Path) -> Captioner:
    return Captioner.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    """Shapes test scenes at the trained size, as PIL images."""
    world = ShapesWorld(image_size=(32, 48), max_objects=2, seed=0)
    return [Image.fromarray(world.render(world.scene("test", i))) for i in range(4)]


def test_every_kind_of_input_gives_the_same_caption(
    captioner: Captioner, scenes: list[Image.Image], tmp_path: Path
) -> None:
    paths = []
    for i, scene in enumerate(scenes):
        paths.append(tmp_path / f"{i}.png")
        scene.save(paths[-1])
    pixels = torch.stack([torch.from_numpy(np.array(s)).permute(2, 0, 1) for s in scenes])
    from_pil = [c.text for c in captioner.caption(scenes)]
    assert all(from_pil)
    assert [c.text for c in captioner.caption(paths)] == from_pil
    assert [c.text for c in captioner.caption(pixels)] == from_pil  # uint8 (B, C, H, W)
    assert [c.text for c in captioner.caption(list(pixels.float() / 255))] == from_pil
    assert captioner.caption(paths[0])[0].text == from_pil[0]
    assert [c.text for c in captioner.caption(scenes, batch_size=3)] == from_pil


def test_caption_carries_tokens_logprobs_and_every_attention(
    captioner: Captioner, scenes: list[Image.Image]
) -> None:
    config = captioner.model.config
    results = captioner.caption(
        scenes, beam_size=3, return_attention=True, return_encoder_attention=True
    )
    for result in results:
        count = len(result.tokens)
        assert result.words == [captioner.tokenizer.itos[i] for i in result.tokens]
        assert result.text == captioner.tokenizer.decode(result.tokens)
        assert result.token_logprobs.shape == (count,) and torch.all(result.token_logprobs <= 0)
        assert result.logprob == pytest.approx(float(result.token_logprobs.sum()))
        layers, heads = config.decoder.depth, config.decoder.heads
        assert result.image_attention.shape == (layers, heads, count, 4, 6)
        torch.testing.assert_close(
            result.image_attention.sum(dim=(-2, -1)), torch.ones(layers, heads, count)
        )
        assert result.self_attention.shape == (layers, heads, count, count)
        assert torch.all(result.self_attention.triu(diagonal=1) == 0)  # causal
        enc = (config.encoder.depth, config.encoder.heads, 24, 24)
        assert result.encoder_attention.shape == enc
    plain = captioner.caption(scenes, beam_size=3)
    assert [r.text for r in plain] == [r.text for r in results]
    assert plain[0].image_attention is None and plain[0].encoder_attention is None


def spotlight_model() -> CaptionerModel:
    """A 16 x 24 px model (4 x 6 patches) whose cross-attention, in every layer and head, goes
    to the brightest patch: encoder blocks pass patches through, and every query asks for the
    key that measures brightness."""
    torch.manual_seed(0)
    model = CaptionerModel(tiny_config(pos_embed="learned", encoder_depth=1)).eval()
    with torch.no_grad():
        encoder = model.encoder
        encoder.pos_embed.zero_()
        for name, param in encoder.blocks.named_parameters():
            if "out_proj" in name or "mlp.2" in name:
                param.zero_()  # residual branches off: token = LayerNorm(patch embedding)
        conv = encoder.patch_embed.proj
        conv.weight.zero_(), conv.bias.zero_()
        conv.weight[0] = 1.0  # channel 0: brightness; channel 1: its negative, so the
        conv.weight[1] = -1.0  # LayerNorm keeps the sign: + for bright, - for dark patches
        for block in model.decoder.blocks:
            attn = block.cross_attn
            attn.q_proj.weight.zero_()
            attn.q_proj.bias.zero_()
            attn.kv_proj.weight[: attn.q_proj.out_features].zero_()
            attn.kv_proj.bias.zero_()
            for head in range(attn.num_heads):
                dim = head * attn.head_dim
                attn.q_proj.bias[dim] = 10.0
                attn.kv_proj.weight[dim, 0] = 10.0
    return model


@pytest.mark.parametrize(("row", "col"), [(0, 0), (0, 5), (3, 0), (2, 4), (1, 1)])
def test_attention_grid_reads_as_the_image(row: int, col: int) -> None:
    """Light one 4 x 4 px patch of a dark image: the returned maps peak at (row, col)."""
    tokenizer = Tokenizer([f"w{i}" for i in range(19)])
    captioner = Captioner(spotlight_model(), tokenizer, ImagePreprocess((16, 24)))
    pixels = np.zeros((16, 24, 3), dtype=np.uint8)
    pixels[4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 255
    result = captioner.caption(Image.fromarray(pixels), max_length=3, return_attention=True)[0]
    maps = result.image_attention  # (layers, heads, T, 4, 6)
    peak = maps.flatten(-2).argmax(-1)
    assert torch.all(peak == row * 6 + col)
    assert torch.all(maps[..., row, col] > 0.9)


@pytest.mark.slow
def test_export_round_trips(ckpt: Path, captioner: Captioner, scenes: list, tmp_path: Path) -> None:
    result = run_script("export.py", "--ckpt", ckpt, "--out", tmp_path / "exported", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    weights, config = (
        tmp_path / "exported" / "model.safetensors",
        tmp_path / "exported" / "captioner.json",
    )
    assert str(weights) in result.stdout and config.is_file()
    saved = json.loads(config.read_text())
    assert saved["tokenizer"]["itos"] == captioner.tokenizer.itos
    assert saved["preprocess"]["image_size"] == [32, 48]
    expected = captioner.caption(scenes, beam_size=3)
    for source in (tmp_path / "exported", weights):
        again = Captioner.from_checkpoint(source).caption(scenes, beam_size=3)
        assert [r.tokens for r in again] == [r.tokens for r in expected]
        for a, b in zip(again, expected, strict=True):
            torch.testing.assert_close(a.token_logprobs, b.token_logprobs)
    original = load_checkpoint(ckpt).state_dict
    exported = load_checkpoint(weights).build_model().state_dict()
    assert all(torch.equal(original[k], exported[k]) for k in exported)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_an_export_is_as_readable_as_the_umask_allows(
    umask: int, mode: int, ckpt: Path, tmp_path: Path
) -> None:
    """An export is meant for sharing: its files get what `open()` gives, not a private 0600."""
    contents, previous = load_checkpoint(ckpt), os.umask(umask)
    try:
        written = export(contents, tmp_path / "exported")
    finally:
        os.umask(previous)
    assert [oct(stat.S_IMODE(path.stat().st_mode)) for path in written] == [oct(mode)] * 2


def test_unusable_checkpoints_are_named(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt.*complete"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.ckpt: not a captioner checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="neither a training run folder .* nor an export"):
        load_checkpoint(tmp_path)  # a folder without an export or a run in it
    (tmp_path / "captioner.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors: missing; an export folder"):
        load_checkpoint(tmp_path)  # half an export is read as one, and named
    with pytest.raises(ConfigError, match="decoding.beam_size"):
        Captioner.from_checkpoint(ckpt).caption(torch.zeros(3, 32, 48), beam_size=0)


def make_folder(root: Path, scenes: list[Image.Image]) -> tuple[list[Path], list[Path]]:
    """Readable images of many kinds, and files that are not readable images."""
    good = [root / "a.png", root / "b.jpg", root / "sub" / "grey.png", root / "sub" / "wide.webp"]
    good[2].parent.mkdir(parents=True)
    scenes[0].save(good[0])
    scenes[1].save(good[1], quality=95)
    scenes[2].convert("L").save(good[2])
    scenes[3].resize((150, 50)).save(good[3])
    bad = [root / "corrupt.jpg", root / "notes.txt", root / "sub" / "truncated.png"]
    bad[0].write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    bad[1].write_text("a caption file, not an image")
    bad[2].write_bytes(good[0].read_bytes()[:-60])  # the end of its pixel data cut off
    (root / ".hidden.png").write_bytes(b"ignored: dot-files are skipped")
    return good, bad


@pytest.mark.slow
def test_caption_script_captions_good_files_and_names_bad_ones(
    ckpt: Path, captioner: Captioner, scenes: list[Image.Image], tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    good, bad = make_folder(folder, scenes)
    assert find_images([folder]) == sorted(good + bad)
    result = run_script(
        "caption.py", "--ckpt", ckpt, "--beam-size", "2", "--save-attention", tmp_path / "att",
        folder, tmp_path / "missing.png", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    lines = dict(line.split("\t") for line in result.stdout.splitlines())
    expected = captioner.caption(good, beam_size=2)
    assert lines == {str(p): r.text for p, r in zip(good, expected, strict=True)}
    for path in [*bad, tmp_path / "missing.png"]:
        assert str(path) in result.stderr
    assert "Traceback" not in result.stderr and ".hidden" not in result.stderr + result.stdout
    figures = sorted(p.name for p in (tmp_path / "att").iterdir())
    assert f"attention figures of {len(good)} image(s) written to {tmp_path / 'att'}" in (
        result.stderr
    )
    kinds = (".png", ".gif", "_matrices.png")
    assert figures == sorted(f"{p.stem}{kind}" for p in good for kind in kinds)
    for path, caption in zip(good, expected, strict=True):  # a frame per word, <eos> included
        assert Image.open(tmp_path / "att" / f"{path.stem}.gif").n_frames == len(caption.words)

    listed = run_script(
        "caption.py", "--ckpt", ckpt, "--json", "--dtype", "bf16", good[0], good[1], cwd=tmp_path
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    in_bf16 = Captioner.from_checkpoint(ckpt, dtype="bf16")
    assert json.loads(listed.stdout) == [
        {"image": str(good[0]), "caption": in_bf16.caption(good[0], beam_size=3)[0].text},
        {"image": str(good[1]), "caption": in_bf16.caption(good[1], beam_size=3)[0].text},
    ]


def test_bf16_weights_caption_like_fp32(ckpt: Path, captioner: Captioner, scenes: list) -> None:
    """Weights in bfloat16, scores in float32, close to the float32 model's."""
    in_bf16 = Captioner.from_checkpoint(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in in_bf16.model.parameters()} == {torch.bfloat16}
    fast, exact = in_bf16.caption(scenes, return_attention=True), captioner.caption(scenes)
    assert all(r.token_logprobs.dtype == torch.float32 for r in fast)
    assert all(r.image_attention.dtype == torch.float32 for r in fast)
    same = [(a, b) for a, b in zip(fast, exact, strict=True) if a.tokens == b.tokens]
    assert len(same) >= len(scenes) // 2
    for a, b in same:  # bf16 keeps 8 bits of mantissa: log-probs agree to a few hundredths
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=0.05, rtol=0.05)
    with pytest.raises(ConfigError, match="fp32, bf16"):
        Captioner.from_checkpoint(ckpt, dtype="float8")


def bomb_png(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    pixels = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_bad_image_files_are_named(
    tmp_path: Path, scenes: list[Image.Image], captioner: Captioner
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    _, bad = make_folder(folder, scenes)
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb, 20_000, 20_000)  # 400 megapixels claimed by a file of ~100 bytes
    cases = {path: path.name for path in bad} | {
        tmp_path / "missing.png": "missing.png: no such file",
        bomb: "bomb.png: refused as a possible decompression bomb",
        folder: "is a folder",
    }
    for path, message in cases.items():
        with pytest.raises(ImageLoadError, match=message):
            load_image(path)
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        captioner.caption(bad[0])
