"""`scripts/caption.py` stays machine-readable and runs to the end whatever its inputs are
named, whatever words a vocabulary holds, and whatever options are given."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli import caption as caption_command
from captioner.core.errors import ConfigError
from captioner.core.generation import DecodingOptions
from captioner.core.inference import DTYPES, Captioner
from captioner.data import load_image
from tests.helpers import ROOT, run_caption, scene, tiny_config


def hostile_folder(root: Path) -> tuple[list[bytes], list[str]]:
    """Images under names that break TSV or UTF-8, and entries a walk used to skip silently:
    (the image names as bytes, the broken entries' names)."""
    root.mkdir()
    names = [b"plain.png", b"line\nbreak.png", b"tab\there.png", b"latin1-\xe9t\xe9.png",
             b"back\\slash.png", b"L" * 248 + b".png"]  # fmt: skip
    for i, name in enumerate(names):
        scene(i).save(os.path.join(os.fsencode(root), name), format="PNG")
    (root / "sub").mkdir()
    os.symlink(root / "sub", root / "link-to-folder")
    os.symlink(root / "nowhere.png", root / "broken-link.png")
    os.mkfifo(root / "fifo.png")
    return names, ["link-to-folder", "broken-link.png", "fifo.png"]


@pytest.mark.slow
def test_every_image_is_one_line_of_two_fields_whatever_its_name(
    ckpt: Path, tmp_path: Path
) -> None:
    names, broken = hostile_folder(tmp_path / "in")
    result = run_caption(
        "--ckpt", ckpt, "--save-attention", tmp_path / "figures", tmp_path / "in", cwd=tmp_path
    )
    out, err = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")  # strict: valid UTF-8
    lines = out.splitlines()
    assert len(lines) == len(names) and all(line.count("\t") == 1 for line in lines), out
    printed = sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in lines)
    assert printed == sorted(
        ["plain.png", "line\\nbreak.png", "tab\\there.png", "latin1-\\xe9t\\xe9.png",
         "back\\\\slash.png", "L" * 248 + ".png"]
    )  # fmt: skip
    for line in lines:
        name, caption = line.split("\t")
        assert caption and name.isprintable() and caption.isprintable()
    # what is not an image is named, and the exit status says something was left out
    assert result.returncode == 1
    assert "is a link to a folder (not followed)" in err and "is a broken link" in err
    assert "fifo.png: is a pipe, socket or device" in err
    assert f"{len(broken)} of {len(names) + len(broken)} inputs could not be captioned" in err
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert len(figures) == 3 * len(names) and all(len(os.fsencode(f)) <= 255 for f in figures)


@pytest.mark.slow
def test_json_output_is_valid_utf8_json_whatever_the_names(ckpt: Path, tmp_path: Path) -> None:
    names, _ = hostile_folder(tmp_path / "in")
    result = run_caption("--ckpt", ckpt, "--json", tmp_path / "in", cwd=tmp_path)
    listed = json.loads(result.stdout.decode("utf-8"))
    assert len(listed) == len(names) and all(item["caption"] for item in listed)
    assert {item["image"].rsplit("/", 1)[-1] for item in listed} >= {"line\\nbreak.png"}
    json.dumps(listed, ensure_ascii=False).encode("utf-8")  # no lone surrogate left


@pytest.mark.slow
def test_vocabulary_words_cannot_inject_lines_or_terminal_codes(ckpt: Path, tmp_path: Path) -> None:
    """The word the model writes first, renamed in the file to hold a line break, a tab and
    an escape code: printed escaped, one line per image."""
    state = torch.load(ckpt, weights_only=True)
    first = Captioner.from_checkpoint(ckpt).caption(scene(0), beam_size=3)[0].tokens[0]
    state["captioner"]["tokenizer"]["itos"][first] = "x\ny\tz\x1b[31m"
    forged = tmp_path / "forged.ckpt"
    torch.save(state, forged)
    scene(0).save(tmp_path / "0.png")
    result = run_caption("--ckpt", forged, tmp_path / "0.png", cwd=tmp_path)
    out = result.stdout.decode()
    assert result.returncode == 0 and out.count("\n") == 1 and out.count("\t") == 1, out
    assert "x\\ny\\tz\\x1b[31m" in out and "\x1b" not in out


def call_main(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`caption.py`'s main in this process: (exit status, stderr)."""
    try:
        status = caption_command.main(list(argv))
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "cuda:99"], "device cuda:99: this machine has"),
        (["--device", "bogus"], "device 'bogus' is not a device name"),
        (["--temperature", "inf"], "argument --temperature: must be a finite number"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--batch-size", "-1"], "argument --batch-size: must be >= 1, got -1"),
        (["--top-k", "x"], "argument --top-k: invalid integer value"),
        (["--device", "meta"], "device meta: captioner runs on cpu, cuda or mps"),
        (["--sample", "--seed", str(2**70)], f"argument --seed: must be < {2**63}, got {2**70}"),
        (["--sample", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        # a decoding value is named by the flag that sets it, not by its config key
        (["--length-penalty", "1e308"], "--length-penalty must be a number in [-100"),
        (["--sample", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--sample", "--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--max-length", "50"], "--max-length must be between 1 and 31"),
        (["--beam-size", "20"], "--beam-size must be at most"),
        # beams are never dropped in silence for sampling
        (["--sample", "--beam-size", "3"], "use --beam-size 1 with --sample, or leave --sample"),
    ],
)
def test_wrong_options_are_one_line_errors(
    options: list[str], message: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scene(0).save(tmp_path / "0.png")
    status, err = call_main("--ckpt", str(ckpt), *options, str(tmp_path / "0.png"), capsys=capsys)
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert "decoding." not in err and "Traceback" not in err


@pytest.mark.slow
def test_a_wrong_decoding_value_names_its_flag_in_one_line(ckpt: Path, tmp_path: Path) -> None:
    scene(0).save(tmp_path / "0.png")
    result = run_caption(
        "--ckpt", ckpt, "--sample", "--top-p", "0", tmp_path / "0.png", cwd=tmp_path
    )
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1 and not result.stdout, err
    assert "--top-p must be in (0, 1], got 0.0" in err and "decoding." not in err


def test_sampling_needs_no_beam_size(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The default beam size is 3 for search, 1 for sampling."""
    scene(0).save(tmp_path / "0.png")
    status = caption_command.main(["--ckpt", str(ckpt), "--sample", "--seed", "0", str(tmp_path)])
    assert status == 0 and capsys.readouterr().out.count("\t") == 1
    assert caption_command.parse_args(["--ckpt", "x", "y.png"]).beam_size == 3


def test_every_option_says_what_it_does_and_its_default() -> None:
    for action in caption_command.build_parser()._actions:
        assert action.help, action.dest
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, action.dest
    assert tuple(DTYPES) == caption_command.DTYPES


@pytest.mark.parametrize(
    "argv",
    [
        ["caption.py", "--help"],
        ["caption.py", "--ckpt", "x", "--top-k", "many", "y.png"],
        ["caption.py", "--ckpt", "x", "--sample", "--beam-size", "2", "y.png"],
        ["export.py", "--help"],
        ["export.py", "--ckpt", "x"],
    ],
)
def test_help_and_wrong_options_answer_without_importing_torch(argv: list[str]) -> None:
    """Torch takes seconds to import: only a run that captions or exports needs it."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'scripts' / argv[0])!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    status = 0 if "--help" in argv else 2
    assert result.stdout.splitlines()[-1] == f"exit {status} False", result.stderr


def test_save_attention_at_a_file_fails_before_captioning(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scene(0).save(tmp_path / "0.png")
    (tmp_path / "taken").write_text("a file")
    status, err = call_main(
        "--ckpt", str(ckpt), "--save-attention", str(tmp_path / "taken"), str(tmp_path / "0.png"),
        capsys=capsys,
    )  # fmt: skip
    assert status == 2 and err.count("\n") == 1 and "exists and is not a folder" in err


def test_decoding_options_must_be_finite() -> None:
    for options, key in (
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"top_p": float("nan")}, "top_p"),
    ):
        with pytest.raises(ConfigError, match=f"decoding.{key} must be"):
            DecodingOptions(**options).resolve_max_length(tiny_config())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_huge_image_is_shrunk_while_decoded(fmt: str, tmp_path: Path) -> None:
    """Twice the model's input on the shorter side at least, never the whole photo: a batch of
    huge images costs one decode at a time."""
    path = tmp_path / f"big.{fmt.lower()}"
    scene(0).resize((3000, 2000)).save(path, format=fmt)
    small = load_image(path, at_least=(32, 48))
    assert 96 <= min(small.size) < 2 * 96 * 2 and small.size[0] > small.size[1]
    assert load_image(path).size == (3000, 2000)  # scanning a dataset still reads it all
    buffer = io.BytesIO()
    scene(1).save(buffer, format=fmt)
    assert load_image(buffer.getvalue(), at_least=(32, 48)).size == (48, 32)  # small: as is


def test_sampling_survives_any_temperature_and_nucleus(ckpt: Path) -> None:
    """A temperature near zero is greedy, a huge one is uniform, a nucleus of almost nothing
    keeps the likeliest word: none divides its way to NaN."""
    captioner = Captioner.from_checkpoint(ckpt)
    greedy = captioner.caption(scene(0), beam_size=1)[0].tokens
    for options in ({"temperature": 1e-300}, {"top_p": 1e-300}):
        sampled = captioner.caption(scene(0), do_sample=True, seed=0, **options)[0]
        assert sampled.tokens == greedy
    assert captioner.caption(scene(0), do_sample=True, temperature=1e300, seed=0)[0].tokens


def test_figures_of_a_thin_strip_stay_small(tmp_path: Path) -> None:
    """A 1 x 4000 image is not blown up until its short side is 256 pixels: it is shrunk to
    the GIF's longest side instead."""
    from captioner.viz import save_gif

    attention = torch.rand(1, 1, 2, 4, 6)  # (layers, heads, words, grid)
    path = save_gif(tmp_path / "strip.gif", np.zeros((1, 4000, 3), np.uint8), attention, ["a", "b"])
    with Image.open(path) as gif:  # enlarged 256 times it would be 1,024,000 pixels wide
        assert gif.size[0] == 320 and gif.size[1] < 1000


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_the_run_quietly(ckpt: Path, tmp_path: Path) -> None:
    for i in range(3):
        scene(i).save(tmp_path / f"{i}.png")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "caption.py"), "--ckpt", str(ckpt),
         "--batch-size", "1", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout.readline().count("\t") == 1  # like `| head -1`
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=300) in (0, 1) and "Traceback" not in err, err


def test_attention_figures_never_overwrite_each_other(ckpt: Path, tmp_path: Path) -> None:
    """`a.png` writes `a_matrices.png`, which is also the overlay of an image named
    `a_matrices.png`; and a huge strip is shown shrunk."""
    from captioner.viz import AttentionFolder

    captioner = Captioner.from_checkpoint(ckpt)
    folder = AttentionFolder(tmp_path / "figures")
    strip = scene(0).resize((8, 100_000))
    images = {"a.png": scene(0), "a_matrices.png": scene(1), "strip.png": strip}
    for name, image in images.items():
        (caption,) = captioner.caption(image, return_attention=True, return_encoder_attention=True)
        folder.save(Path(name), image, caption, num_prefix_tokens=0)
    written = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert len(written) == 3 * len(images) and "a_matrices_.png" in written
    with Image.open(tmp_path / "figures" / "strip.gif") as gif:  # the strip, 2048 px at most
        assert gif.size[0] == 1 and gif.size[1] < 4096


def test_folders_of_any_depth_are_walked(tmp_path: Path) -> None:
    from captioner.core.inference import find_images

    deep = tmp_path
    for _ in range(1200):  # deeper than Python's recursion limit
        deep = deep / "d"
        deep.mkdir()
    (deep / "x.png").write_bytes(b"")
    try:
        assert find_images([tmp_path]) == [deep / "x.png"]
    finally:  # bottom-up: pytest's own clean-up of old runs removes folders recursively
        (deep / "x.png").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


def test_braces_nested_too_deep_are_a_config_error() -> None:
    from captioner.data.shards import expand_shards

    with pytest.raises(ConfigError, match="braces nested too deeply"):
        expand_shards("{a," * 3000 + "b" + "}" * 3000, "data.test_shards")
