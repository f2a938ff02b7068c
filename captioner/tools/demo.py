"""A browser app that captions an image and shows where the decoder looked for each word.

`build_demo(captioner)` is the Gradio app and `launch` serves it (`scripts/demo.py`): the
caption, then each word's image attention (mean of layers and heads) blended over the image
with the blend of `captioner.viz`, and one chosen word large beside its layers x heads grid.
Gradio is an optional extra, imported only here and only when an app is built, with its
analytics off: serving the app reaches no other machine.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from captioner.core.checkpoint import load_checkpoint
from captioner.core.errors import ConfigError
from captioner.core.generation import DecodingOptions
from captioner.core.inference import Caption, Captioner
from captioner.data.datamodule import ShapesDataModule
from captioner.data.stored import check_data_config
from captioner.viz.gif import blended_words, fit_pixels
from captioner.viz.overlay import head_grid

if TYPE_CHECKING:
    import gradio as gr

MIN_SIDE, MAX_SIDE = 256, 512  # the image as every view shows it: small ones enlarged, crisp
GRID_SIDE = 192  # the image in each panel of a layers x heads grid, of many panels
MAX_BEAM = 8  # the beam-size slider's end (or less, for a small vocabulary)
EXAMPLES = 4  # test scenes offered for a shapes model
NO_GRADIO = "the demo needs gradio: pip install 'captioner[demo]'"
LABELS = {"beam_size": "beam size", "max_length": "max length", "do_sample": "sample"}


@dataclass
class Shown:
    """What one caption leaves for choosing a word to enlarge: the image as shown (RGB floats
    (H, W, 3)), its caption and each word's overlay."""

    pixels: np.ndarray
    caption: Caption
    overlays: list[np.ndarray]

    def label(self, index: int) -> str:
        """'red (p=0.93)': the word and the probability the model gave it."""
        p = math.exp(float(self.caption.token_logprobs[index]))
        return f"{self.caption.words[index]} (p={p:.2f})"


def check_gradio() -> None:
    """Name the missing extra at once, before a checkpoint is read, without the seconds that
    importing gradio takes."""
    if importlib.util.find_spec("gradio") is None:
        raise ConfigError(NO_GRADIO)


def import_gradio() -> Any:
    """Gradio, with its analytics off unless the user turned them on."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise ConfigError(NO_GRADIO) from None
    return gradio


def load(
    ckpt: str | Path, device: str | torch.device | None = None
) -> tuple[Captioner, list[np.ndarray]]:
    """The captioner of a `.ckpt`, a run folder or an export folder (as
    `Captioner.from_checkpoint` reads them) and a few test scenes of the shapes world it was
    trained on, images it never saw (none for other data, whose images are not at hand); the
    file is read once for both. `device`: cuda when there is one, else cpu, unless given."""
    contents = load_checkpoint(ckpt)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    captioner = Captioner.from_contents(contents, device)
    kind, fields = (None, {}) if contents.data is None else check_data_config(contents.data)
    if kind is not ShapesDataModule:
        return captioner, []
    world = ShapesDataModule(**fields).world
    return captioner, [world.render(world.scene("test", i)) for i in range(EXAMPLES)]


def show(image: Image.Image, caption: Caption) -> Shown:
    """Each word's attention, mean of layers and heads, blended over the image brought to
    `MIN_SIDE`..`MAX_SIDE` pixels, all on one colour scale: what `viz.save_gif` draws per
    frame, without the text."""
    pixels, blended = blended_words(
        image, caption.image_attention, caption.words, min_side=MIN_SIDE, max_side=MAX_SIDE
    )
    return Shown(pixels, caption, [np.round(b * 255).astype(np.uint8) for b in blended])


def caption_image(
    captioner: Captioner,
    image: Image.Image | None,
    beam_size: int,
    max_length: int,
    sample: bool,
    temperature: float,
    top_p: float,
) -> Shown:
    """Caption one image with the options of the app's controls, its attention recorded."""
    gr = import_gradio()
    if image is None:
        raise gr.Error("Upload an image first, or pick an example.", print_exception=False)
    decoding = {
        "beam_size": int(beam_size), "max_length": int(max_length), "do_sample": bool(sample),
        "temperature": float(temperature), "top_p": float(top_p),
    }  # fmt: skip
    try:  # a wrong value named by its control
        DecodingOptions(**decoding).resolve_max_length(captioner.model.config, LABELS.get)
    except ConfigError as err:
        raise gr.Error(str(err), print_exception=False) from None  # the user's, not a bug
    caption = captioner.caption(image, return_attention=True, **decoding)[0]
    return show(image, caption)


def build_demo(captioner: Captioner, examples: Sequence[np.ndarray] = ()) -> gr.Blocks:
    """The app: an image (uploaded, or one of `examples`, (H, W, 3) uint8) and decoding
    controls in; the caption, a gallery of per-word overlays titled "word (p=0.93)" and one
    chosen word large, with its layers x heads grid, out. `api_name="caption"` answers with the
    caption, the gallery, the chosen word, its overlay and its grid."""
    gr = import_gradio()
    config = captioner.model.config
    longest, beams = config.max_len - 1, min(MAX_BEAM, (config.vocab_size - 3) // 2)
    with gr.Blocks(title="captioner", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Where each word looked\nUpload an image (or pick an example): the caption, then "
            "each word's attention over the image patches (mean of layers and heads)."
        )
        shown = gr.State()
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", image_mode="RGB", label="image")
                beam = gr.Slider(1, beams, value=min(3, beams), step=1, label=LABELS["beam_size"])
                length = gr.Slider(1, longest, value=longest, step=1, label=LABELS["max_length"])
                sample = gr.Checkbox(label="sample (one caption, no beams)")
                temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p")
                run = gr.Button("Caption", variant="primary")
            with gr.Column():
                text = gr.Textbox(label="caption")
                gallery = gr.Gallery(label="attention per word", columns=4)
        with gr.Row():
            word = gr.Radio(label="word", type="value")
            large = gr.Image(label="attention of the chosen word")
        grid = gr.Plot(label="layers x heads of the chosen word")
        if examples:
            gr.Examples([[e] for e in examples], inputs=[image], label="shapes test scenes")

        def on_caption(*inputs: Any) -> tuple[Any, ...]:
            result = caption_image(captioner, *inputs)
            panels = [(o, result.label(k)) for k, o in enumerate(result.overlays)]
            chosen = gr.Radio([(label, k) for k, (_, label) in enumerate(panels)], value=0)
            return (result.caption.text, panels, chosen, *on_word(result, 0), result)

        def on_word(result: Shown | None, k: int | None) -> tuple[Any, Figure | None]:
            if result is None or k is None:
                return None, None
            attention, words = result.caption.image_attention, result.caption.words
            figure = head_grid(fit_pixels(result.pixels, 1, GRID_SIDE), attention, words, k)
            return gr.Image(result.overlays[k], label=result.label(k)), figure

        sample.change(on_sample, sample, beam, api_name=False)
        controls = [image, beam, length, sample, temperature, top_p]
        outputs = [text, gallery, word, large, grid, shown]
        run.click(on_caption, controls, outputs, api_name="caption")
        word.input(on_word, [shown, word], [large, grid], api_name=False)
    return demo


def on_sample(sample: bool) -> Any:
    """Sampling draws one caption: the beam size is 1 and fixed while it is on."""
    gr = import_gradio()
    return gr.Slider(value=1, interactive=False) if sample else gr.Slider(interactive=True)


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
) -> str:
    """Serve the app on `host` (this machine only by default) at `port` (None: the first free
    one from 7860); `share` asks Gradio for a public link. Returns the local URL, at once when
    not `block`ing (`demo.close()` stops it), else when the server stops."""
    _, url, _ = demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block
    )
    return url
