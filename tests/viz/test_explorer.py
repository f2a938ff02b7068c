"""The attention explorer page: self-contained, compact, faithful to the tensors, and working in
a real (headless) Chromium: hovering a word lights the patch its attention peaks on."""

from __future__ import annotations

import base64
import json
import re
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.core.generation import DecodingOptions, generate
from captioner.core.inference import Captioner, to_captions
from captioner.core.models import CaptionerModel
from captioner.data import ShapesWorld
from captioner.viz import attention_rollout
from captioner.viz.explorer import ExplorerImage, explorer, explorer_html
from tests.helpers import ROOT, tiny_config

ARTIFACTS = ROOT / "logs" / "test-artifacts"  # screenshots a person can look at after a run


def page_data(html: str) -> dict:
    text = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert text is not None
    return json.loads(text.group(1))


def levels(block: dict) -> np.ndarray:
    """The page's stored maps, multiplied back: what its script draws."""
    q = np.frombuffer(zlib.decompress(base64.b64decode(block["q"])), dtype=np.uint8)
    q = q.astype(np.float32)
    scale = np.frombuffer(base64.b64decode(block["scale"]), dtype="<f4")
    return (q.reshape(-1, block["shape"][-1]) / 255 * scale[:, None]).reshape(block["shape"])


@pytest.fixture(scope="module")
def captioned(trained_run: Path) -> tuple[Captioner, list[ExplorerImage]]:
    captioner = Captioner.from_checkpoint(trained_run)
    world = ShapesWorld(image_size=(32, 48), max_objects=2)
    images = [world.render(world.scene("test", i)) for i in range(3)]
    captions = captioner.caption(
        [Image.fromarray(image) for image in images], beam_size=3, return_attention=True,
        return_encoder_attention=True,
    )  # fmt: skip
    names = ["scene 0", "</script><b>scene 1</b>", "scene 2"]  # a name must not break the page
    entries = zip(names, images, captions, strict=True)
    return captioner, [ExplorerImage(name, image, c) for name, image, c in entries]


@pytest.fixture(scope="module")
def page(captioned, tmp_path_factory: pytest.TempPathFactory) -> Path:
    captioner, items = captioned
    folder = tmp_path_factory.mktemp("explorer")
    return explorer(
        items, folder / "page.html", num_prefix_tokens=captioner.model.encoder.num_prefix_tokens
    )


def test_the_page_needs_no_network_and_holds_the_tensors(captioned, page: Path) -> None:
    _, items = captioned
    html = page.read_text()
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html)  # nothing fetched
    assert html.count("</script>") == 2  # the data's script and the page's: nothing closed early
    data = page_data(html)
    assert [item["name"] for item in data["items"]] == [item.name for item in items]
    for stored, item in zip(data["items"], items, strict=True):
        caption = item.caption
        attention = caption.image_attention.flatten(-2).numpy()  # (layers, heads, T, patches)
        maps = levels(stored["cross"])
        peak = attention.max(axis=-1, keepdims=True)
        assert np.abs(maps - attention).max() <= (peak / 255 / 2 + 1e-6).max()  # 8 bits per map
        assert stored["words"] == caption.words and len(stored["probs"]) == len(caption.words)
        assert stored["beams"][0][0] == caption.text and len(stored["beams"]) == 3
        weights = caption.encoder_attention
        rollout = attention_rollout(weights)
        np.testing.assert_allclose(levels(stored["rollout"]), rollout, atol=rollout.max() / 255)
        np.testing.assert_allclose(levels(stored["encoder"]), weights.mean(1), atol=1 / 255)


def test_a_hundred_images_of_a_three_layer_four_head_model_stay_small(tmp_path: Path) -> None:
    """100 images at 64 px, 3 layers x 4 heads in both parts, 8 x 8 patches, 31-token captions
    (the longest: a random model rarely ends early)."""
    torch.manual_seed(0)
    config = tiny_config(
        image_size=(64, 64), patch_size=8, encoder_depth=3, encoder_heads=4, encoder_dim=48,
        decoder_depth=3, decoder_heads=4, decoder_dim=48, max_len=32,
    )  # fmt: skip
    model = CaptionerModel(config).eval()
    images = torch.randint(0, 256, (100, 64, 64, 3), dtype=torch.uint8)
    pixels = images.permute(0, 3, 1, 2).float() / 255
    out = generate(model, pixels, 1, 2, 0, DecodingOptions(min_length=31), need_weights=True)
    words = SimpleNamespace(itos=[f"w{i}" for i in range(23)], decode=lambda ids: str(ids))
    captions = to_captions(out, words, model)
    with torch.no_grad():
        _, encoder = model.encoder(pixels, need_weights=True)
    for caption, weights in zip(captions, torch.stack(encoder, dim=1), strict=True):
        caption.encoder_attention = weights
    assert captions[0].image_attention.shape == (3, 4, 31, 8, 8)
    pairs = enumerate(zip(images, captions, strict=True))
    html = explorer_html([ExplorerImage(f"{i}.png", image.numpy(), c) for i, (image, c) in pairs])
    size = len(html.encode())
    assert size < 5_000_000, size


def test_a_caption_without_attention_is_refused(captioned) -> None:
    captioner, items = captioned
    plain = captioner.caption([Image.fromarray(items[0].image)])[0]
    with pytest.raises(ValueError, match="return_attention=True"):
        explorer_html([ExplorerImage("x", items[0].image, plain)])


# --- In a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Chromium from the system's packages (`.ci/run` installs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert chromium and driver, (
        "the browser tests need Chromium and its driver: apt-get install chromium chromium-driver"
    )
    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1000"):
        options.add_argument(argument)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


HEAT = """
const card = window.explorer.cards[arguments[0]];
const ctx = card.heat.getContext('2d');
return Array.from(ctx.getImageData(0, 0, card.heat.width, card.heat.height).data);
"""


def heat_alpha(browser, card: int) -> np.ndarray:
    """The heat canvas of a card, one pixel per patch: its opacity grows with the weight."""
    return np.array(browser.execute_script(HEAT, card), dtype=np.uint8).reshape(-1, 4)[:, 3]


def assert_peak(alpha: np.ndarray, tensor: torch.Tensor) -> None:
    """The brightest patch on the canvas is where the tensor peaks (or ties with it to the
    page's 8 bits)."""
    values = tensor.flatten()
    assert alpha.max() > 0
    assert values[int(alpha.argmax())] >= values.max() * (1 - 2 / 255)


@pytest.mark.slow
def test_the_page_in_chromium(browser, captioned, page: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, items = captioned
    browser.get(page.as_uri())
    WebDriverWait(browser, 60).until(lambda b: b.execute_script("return window.explorer"))
    assert browser.execute_script("return window.explorer.cards.length") == 3
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert "<b>scene 1</b>" in cards[1].find_element(By.CSS_SELECTOR, ".name").text

    caption = items[0].caption
    words = cards[0].find_elements(By.CSS_SELECTOR, ".word")
    assert [w.text for w in words] == caption.words
    for t in range(len(words)):  # hovering word t lights the patch its attention peaks on
        ActionChains(browser).move_to_element(words[t]).perform()
        assert_peak(heat_alpha(browser, 0), caption.image_attention[:, :, t].mean(dim=(0, 1)))
        info = cards[0].find_element(By.CSS_SELECTOR, ".info").text
        assert f"p = {caption.token_logprobs[t].exp():.3f}" in info
    t = 1
    ActionChains(browser).move_to_element(words[t]).perform()
    mean = heat_alpha(browser, 0)
    Select(browser.find_element(By.ID, "layer")).select_by_value("1")
    Select(browser.find_element(By.ID, "head")).select_by_value("0")
    one = heat_alpha(browser, 0)
    assert not np.array_equal(one, mean)  # another layer and head, another map
    assert_peak(one, caption.image_attention[1, 0, t])
    Select(browser.find_element(By.ID, "mode")).select_by_value("rollout")
    rolled = heat_alpha(browser, 0)
    flow = attention_rollout(caption.encoder_attention)
    assert_peak(rolled, caption.image_attention[1, 0, t].flatten() @ flow)
    assert "rollout-adjusted" in cards[0].find_element(By.CSS_SELECTOR, ".info").text
    for key in ("layer", "head"):
        Select(browser.find_element(By.ID, key)).select_by_value("mean")
    Select(browser.find_element(By.ID, "mode")).select_by_value("raw")

    stage = cards[2].find_element(By.CSS_SELECTOR, ".stage")  # a 4 x 6 grid of patches
    box = stage.rect
    ActionChains(browser).move_to_element_with_offset(
        stage, box["width"] * (4.5 / 6 - 0.5), box["height"] * (2.5 / 4 - 0.5)
    ).click().perform()  # the patch at row 2, column 4
    info = cards[2].find_element(By.CSS_SELECTOR, ".info").text
    assert info.startswith("encoder self-attention from patch (2, 4)")
    query = 2 * 6 + 4
    assert_peak(
        heat_alpha(browser, 2), items[2].caption.encoder_attention[:, :, query].mean((0, 1))
    )

    beams = cards[0].find_elements(By.CSS_SELECTOR, ".beams li")
    shown = [b.text.removeprefix(b.find_element(By.CSS_SELECTOR, ".lp").text) for b in beams]
    assert shown == [text for text, _ in caption.alternatives]

    cards[1].find_element(By.CSS_SELECTOR, "button").click()  # play: word by word
    first = cards[1].find_element(By.CSS_SELECTOR, ".info").text
    assert first.startswith(f'"{items[1].caption.words[0]}"')
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    words[2].click()  # pinned: stays lit for the screenshot
    browser.save_screenshot(str(ARTIFACTS / "explorer.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
