"""The demo app, served on this machine and called as a browser calls it (Gradio's client): a
caption of vocabulary words with one attention overlay per word, decoding mistakes as
messages, and a bad checkpoint as one line from the script."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import huggingface_hub.constants as hub_constants
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from captioner.cli import demo as demo_command
from captioner.core.inference import Captioner
from captioner.core.tokenizer import SPECIALS
from captioner.tools.demo import MIN_SIDE, build_demo, launch, load
from tests.helpers import ROOT


class Served(NamedTuple):
    client: Client
    captioner: Captioner
    examples: list[np.ndarray]
    url: str
    reached: list[tuple]  # every address outside this machine that anything tried to reach


def is_here(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return host == "localhost"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The app of the tiny shapes run on 127.0.0.1 and a client for it; Gradio's files under a
    temporary folder, and any connection to another machine refused and recorded."""
    reached: list[tuple] = []
    connect = socket.socket.connect

    def local_only(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_here(address[0]):
            reached.append(address)
            raise OSError("the demo's tests reach no other machine")
        connect(sock, address)

    with pytest.MonkeyPatch.context() as env:
        env.setattr(socket.socket, "connect", local_only)
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        env.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # else the client asks the Hub
        captioner, examples = load(trained_run, "cpu")
        app = build_demo(captioner, examples)
        url = launch(app, "127.0.0.1", free_port(), block=False)
        try:
            client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
            yield Served(client, captioner, examples, url, reached)
        finally:
            app.close()


def caption(client: Client, image: Path, beam: int = 3, sample: bool = False) -> tuple:
    """The app's answer for `image`: caption, gallery, chosen word, its overlay, its grid."""
    return client.predict(handle_file(str(image)), beam, 10, sample, 1.0, 0.9, api_name="/caption")


@pytest.mark.slow
def test_caption_with_one_overlay_per_word(served: Served, tmp_path: Path) -> None:
    assert len(served.examples) == 4 and served.examples[0].shape == (32, 48, 3)  # test scenes
    image = tmp_path / "scene.png"
    Image.fromarray(served.examples[0]).save(image)
    text, gallery, word, large, grid = caption(served.client, image)
    words = text.split()
    assert words and set(words) <= set(served.captioner.tokenizer.itos) - set(SPECIALS)
    labels = [item["caption"] for item in gallery]
    shown = [label.split(" (p=")[0] for label in labels]
    assert shown in (words, [*words, "<eos>"])  # one overlay per generated word, in order
    probabilities = [float(label.split("(p=")[1].rstrip(")")) for label in labels]
    assert all(0 < p <= 1 for p in probabilities)
    for item in gallery:  # the image enlarged, as a shapes scene is tiny, its shape kept
        width, height = Image.open(item["image"]["path"]).size
        assert height >= MIN_SIDE and width * 32 == height * 48
    assert word["value"] == 0 and [label for label, _ in word["choices"]] == labels
    assert large["label"] == labels[0] and large["value"]["url"].startswith(served.url)
    assert grid["type"] == "matplotlib"


def test_sampling_and_a_wrong_option(served: Served, tmp_path: Path) -> None:
    client = served.client
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)  # not a scene, nor its size
    text, gallery, *_ = caption(client, image, beam=1, sample=True)
    assert len(gallery) >= len(text.split())
    with pytest.raises(AppError, match="sample must be false when beam size > 1"):
        caption(client, image, beam=3, sample=True)


def test_nothing_but_this_machine_reached(served: Served) -> None:
    """No analytics, version check or share link: the app and its client talk only here."""
    assert served.reached == []


def test_localhost_by_default() -> None:
    args = demo_command.build_parser().parse_args(["--ckpt", "run"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", None, False)


@pytest.mark.slow
def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--ckpt", str(tmp_path / "nowhere")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("checkpoint error: ")
    assert "nowhere" in result.stderr and not result.stdout
