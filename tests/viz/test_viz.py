"""Attention figures put weight where it belongs: a map peaked at patch (r, c) lights exactly
that pixel block, for square and non-square grids, with and without prefix tokens."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from captioner.core.models import CaptionerModel
from captioner.viz import (
    attention_matrices,
    attention_rollout,
    attention_to_pixels,
    blend_heatmap,
    encoder_attention_from_patch,
    encoder_patch_map,
    head_grid,
    query_map,
    rollout_overlay,
    save_gif,
    select_attention,
    word_overlays,
)
from captioner.viz.overlay import ALPHA, CMAP, as_rgb

# (grid, image size): square, non-square with 16 px patches, non-square with fractional patches
LAYOUTS = [((4, 4), (64, 64)), ((3, 5), (48, 80)), ((3, 5), (50, 70))]


def corners_and_middle(grid: tuple[int, int]) -> list[tuple[int, int]]:
    rows, cols = grid
    return [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), (rows // 2, cols // 2)]


def one_hot_grid(grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    maps = torch.zeros(grid)
    maps[patch] = 1.0
    return maps


def peaked_cross(
    grid: tuple[int, int], peaks: list[tuple[int, int]], layers: int = 2, heads: int = 3
):
    """Cross-attention (layers, heads, T, gh, gw) with all of word t's weight on peaks[t]."""
    maps = torch.stack([one_hot_grid(grid, p) for p in peaks])  # (T, gh, gw)
    return maps.expand(layers, heads, *maps.shape).clone()


def random_attention(*shape: int) -> torch.Tensor:
    """Softmax rows: what a real attention layer produces."""
    return torch.randn(*shape).softmax(dim=-1)


def assert_lights_block(heat: np.ndarray, patch: tuple[int, int], grid: tuple[int, int]) -> None:
    """The heat-map's maximum lies in patch's pixel block, whose mean is far above the rest."""
    height, width = heat.shape
    top, bottom = (
        math.floor(patch[0] * height / grid[0]),
        math.ceil((patch[0] + 1) * height / grid[0]),
    )
    left, right = (
        math.floor(patch[1] * width / grid[1]),
        math.ceil((patch[1] + 1) * width / grid[1]),
    )
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert top <= row < bottom and left <= col < right, (patch, (row, col))
    inside = np.zeros_like(heat, dtype=bool)
    inside[top:bottom, left:right] = True
    assert heat[inside].mean() > 10 * heat[~inside].mean()


def png_bytes(fig: Figure) -> int:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    return len(buffer.getvalue())


def image_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_images()]


def rgb_image(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize(("grid", "size"), LAYOUTS)
def test_image_attention_peak_lights_its_pixel_block(grid, size) -> None:
    peaks = corners_and_middle(grid)
    heat = attention_to_pixels(select_attention(peaked_cross(grid, peaks)), size)
    assert heat.shape == (len(peaks), *size)
    for t, patch in enumerate(peaks):
        assert_lights_block(heat[t], patch, grid)


@pytest.mark.parametrize(("grid", "size"), LAYOUTS)
@pytest.mark.parametrize("prefix", [0, 1])
def test_encoder_patch_map_peak_lights_key_block(grid, size, prefix: int) -> None:
    query, patches = (grid[0] - 1, 0), grid[0] * grid[1]
    tokens = prefix + patches
    for key in corners_and_middle(grid):
        attention = random_attention(2, 3, tokens, tokens)
        row = torch.zeros(tokens)
        row[prefix + key[0] * grid[1] + key[1]] = 0.7 if prefix else 1.0
        row[:prefix] = 0.3  # weight on the CLS token must not show in the map
        attention[:, :, prefix + query[0] * grid[1] + query[1]] = row
        maps = encoder_patch_map(attention, query, grid, num_prefix_tokens=prefix)
        assert maps.shape == grid
        assert float(maps.sum()) == pytest.approx(0.7 if prefix else 1.0)
        assert_lights_block(attention_to_pixels(maps, size), key, grid)


def test_query_map_without_patch_is_cls_row_or_mean_of_patches() -> None:
    grid = (2, 3)
    plain = random_attention(6, 6)
    torch.testing.assert_close(query_map(plain, grid), plain.mean(dim=0).reshape(grid))
    with_cls = random_attention(7, 7)
    torch.testing.assert_close(
        query_map(with_cls, grid, num_prefix_tokens=1), with_cls[0, 1:].reshape(grid)
    )


def test_maps_refuse_a_token_count_that_does_not_match_the_grid() -> None:
    attention = random_attention(1, 1, 7, 7)  # a CLS token and 2 x 3 patches
    with pytest.raises(ValueError, match="prefix"):
        encoder_patch_map(attention, (0, 0), (2, 3))  # forgot num_prefix_tokens=1
    with pytest.raises(ValueError, match="outside"):
        encoder_patch_map(attention, (2, 0), (2, 3), num_prefix_tokens=1)


@pytest.mark.parametrize("residual", [0.0, 0.5, 0.9])
def test_rollout_of_identity_is_identity(residual: float) -> None:
    eye = torch.eye(7).expand(3, 2, 7, 7)
    torch.testing.assert_close(attention_rollout(eye, residual=residual), torch.eye(7))
    batched = torch.stack([eye, eye])  # (B, layers, heads, N, N)
    torch.testing.assert_close(
        attention_rollout(batched, residual=residual), torch.eye(7).expand(2, 7, 7)
    )


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_rows_sum_to_one_and_batch_matches_items(fusion: str) -> None:
    attention = random_attention(3, 4, 2, 9, 9)  # (B, layers, heads, N, N)
    rollout = attention_rollout(attention, head_fusion=fusion, num_prefix_tokens=1)
    assert rollout.shape == (3, 9, 9)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(3, 9))
    for b in range(3):
        torch.testing.assert_close(attention_rollout(attention[b], head_fusion=fusion), rollout[b])


def test_rollout_matches_hand_computation() -> None:
    # layer 1: heads [[1,0],[1,0]] and [[1,0],[0,1]] -> mean [[1,0],[.5,.5]]
    #   A1' = .5 I + .5 A1 = [[1, 0], [.25, .75]]
    # layer 2: both heads [[.2,.8],[0,1]] -> A2' = [[.6, .4], [0, 1]]
    # rollout = A2' @ A1' = [[.6 + .1, .3], [.25, .75]]   (A1' @ A2' would be [[.6,.4],[.15,.85]])
    layer1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    layer2 = torch.tensor([[0.2, 0.8], [0.0, 1.0]]).expand(2, 2, 2)
    rollout = attention_rollout(torch.stack([layer1, layer2]), residual=0.5)
    torch.testing.assert_close(rollout, torch.tensor([[0.7, 0.3], [0.25, 0.75]]))


def test_rollout_map_lights_the_patch_every_layer_looks_at_and_drops_prefix() -> None:
    grid, size, prefix = (3, 5), (48, 80), 1
    tokens = prefix + 15
    key, query = (2, 4), (0, 1)
    layer = torch.zeros(tokens, tokens)
    layer[:, prefix + key[0] * 5 + key[1]] = 0.8
    layer[:, 0] = 0.2  # every token also reads the CLS token
    rollout = attention_rollout(layer.expand(2, 2, tokens, tokens), num_prefix_tokens=prefix)
    assert rollout.shape == (tokens, tokens)  # prefix kept in the matrix
    maps = query_map(rollout, grid, patch=query, num_prefix_tokens=prefix)
    assert maps.shape == grid  # ... dropped from the map
    assert float(maps.sum()) < 1.0
    assert_lights_block(attention_to_pixels(maps, size), key, grid)


def gif_frames(path: Path) -> tuple[int, tuple[int, int], list[np.ndarray]]:
    with Image.open(path) as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.float32))
        return gif.n_frames, gif.size, frames


@pytest.mark.parametrize(("grid", "size"), LAYOUTS)
def test_gif_has_one_frame_per_word_even_when_attention_repeats(tmp_path: Path, grid, size) -> None:
    peaks = [(0, 0), (0, 0), (0, 0), (grid[0] - 1, grid[1] - 1), (grid[0] - 1, grid[1] - 1)]
    words = ["a", "a", "a", "square", "<eos>"]
    black = np.zeros((*size, 3), dtype=np.uint8)
    path = save_gif(
        tmp_path / "sub" / "c.gif", black, peaked_cross(grid, peaks), words, duration_ms=300
    )
    count, (width, height), frames = gif_frames(path)
    assert count == len(words)
    scale = width // size[1]
    assert width == scale * size[1]  # enlarged by a whole factor, towards 256 px within 320
    assert scale == min(math.ceil(256 / min(size)), 320 // max(size))
    assert height > size[0] * scale  # the caption band below the image
    for frame, peak in zip(frames, peaks, strict=True):  # each frame shows its own word's heat
        brightness = frame[: size[0] * scale, : size[1] * scale].sum(axis=-1)
        assert_lights_block(brightness[::scale, ::scale], peak, grid)


def test_gif_writes_the_caption_so_far_under_each_frame(tmp_path: Path) -> None:
    words = ["a", "small", "red", "circle", "<eos>"]
    attention = peaked_cross((2, 3), [(0, 0)] * len(words))
    _, _, frames = gif_frames(save_gif(tmp_path / "c.gif", rgb_image((32, 48)), attention, words))
    image_height = 32 * (320 // 48)  # enlarged 6 times: 9 would reach 256 px, but pass 320
    # bright pixels in the text band, above the 4-pixel progress bar
    ink = [int((frame[image_height:-4].max(axis=-1) > 100).sum()) for frame in frames]
    assert ink == sorted(ink) and len(set(ink)) == len(words)  # one more word on each frame


def test_gif_of_one_word_has_one_frame(tmp_path: Path) -> None:
    path = save_gif(
        tmp_path / "one.gif", rgb_image((20, 30)), peaked_cross((2, 3), [(1, 2)]), ["<eos>"]
    )
    assert gif_frames(path)[0] == 1


def test_word_functions_refuse_words_that_do_not_match_the_attention(tmp_path: Path) -> None:
    attention = peaked_cross((2, 2), [(0, 0), (1, 1)])
    with pytest.raises(ValueError, match="words"):
        save_gif(tmp_path / "x.gif", rgb_image((8, 8)), attention, ["one"])
    with pytest.raises(ValueError, match="words"):
        word_overlays(rgb_image((8, 8)), attention, ["a", "b", "c"])
    with pytest.raises(ValueError, match="words"):
        head_grid(rgb_image((8, 8)), attention, ["a", "b", "c"], 0)


def far_corner(size: tuple[int, int], grid: tuple[int, int]) -> tuple[slice, slice]:
    """The pixels of the bottom-right patch, which a one-hot map on patch (0, 0) never reaches
    even after bilinear upsampling (grids of 3 or more patches a side)."""
    return slice(size[0] - size[0] // grid[0], size[0]), slice(
        size[1] - size[1] // grid[1], size[1]
    )


def test_blend_leaves_pixels_nobody_looks_at_as_they_were() -> None:
    pixels = as_rgb(rgb_image((8, 10)))
    heat = np.zeros((8, 10))
    heat[:, 5:] = np.linspace(0.1, 1.0, 5)  # attention on the right half only
    blended = blend_heatmap(pixels, heat, vmax=1.0, alpha=0.8)
    np.testing.assert_array_equal(blended[:, :5], pixels[:, :5])
    assert np.abs(blended[:, 5:] - pixels[:, 5:]).min(axis=-1).max() > 0
    top = matplotlib.colormaps[CMAP](1.0)[:3]  # the largest weight: the colormap's top colour
    np.testing.assert_allclose(blended[:, -1], 0.2 * pixels[:, -1] + 0.8 * np.array(top))


@pytest.mark.parametrize(("grid", "size"), LAYOUTS)
def test_word_overlays_show_the_plain_image_a_panel_per_word_and_a_colour_bar(grid, size) -> None:
    words = ["a", "red", "square"]
    image = rgb_image(size)
    fig = word_overlays(image, peaked_cross(grid, [(0, 0)] * len(words)), words)
    panels = image_axes(fig)
    assert [ax.get_title() for ax in panels] == ["image", *words]
    np.testing.assert_array_equal(panels[0].get_images()[0].get_array(), as_rgb(image))
    word = panels[1].get_images()[0].get_array()
    corner = far_corner(size, grid)  # no attention there: the image as it was
    np.testing.assert_array_equal(word[corner], as_rgb(image)[corner])
    assert_lights_block(np.abs(word - as_rgb(image)).sum(axis=-1), (0, 0), grid)
    (bar,) = [ax for ax in fig.axes if ax.get_ylabel() == "attention weight"]
    assert bar.get_ylim() == pytest.approx((0.0, 1.0))  # one-hot maps: weights up to 1
    assert png_bytes(fig) > 0


def test_gif_frames_leave_pixels_nobody_looks_at_as_they_were(tmp_path: Path) -> None:
    grid, size, grey = (4, 4), (64, 64), 150
    image = np.full((*size, 3), grey, dtype=np.uint8)
    path = save_gif(tmp_path / "c.gif", image, peaked_cross(grid, [(0, 0)] * 2), ["a", "b"])
    scale = 256 // 64
    corner = far_corner((size[0] * scale, size[1] * scale), grid)
    for frame in gif_frames(path)[2]:
        assert np.abs(frame[corner] - grey).max() <= 2  # GIF palettes round a little
        assert np.abs(frame[:scale, :scale] - grey).max() > 50  # the looked-at patch is tinted


@pytest.mark.parametrize(
    ("size", "max_side"), [((480, 640), 320), ((640, 480), 320), ((480, 640), 200)]
)
def test_gif_of_a_photo_keeps_frames_within_max_side_and_the_file_small(
    tmp_path: Path, size: tuple[int, int], max_side: int
) -> None:
    """A noisy photo-sized image: the worst case for GIF compression."""
    words = ["a", "dog", "on", "grass", "<eos>"]
    attention = random_attention(2, 2, len(words), 12).unflatten(-1, (3, 4))
    kwargs = {} if max_side == 320 else {"max_side": max_side}
    path = save_gif(tmp_path / "photo.gif", rgb_image(size), attention, words, **kwargs)
    with Image.open(path) as gif:
        width, height = gif.size
    assert width == round(size[1] * max_side / max(size))  # shrunk, aspect kept
    assert height < round(size[0] * max_side / max(size)) + 100  # the image and a caption band
    assert path.stat().st_size < 600_000  # 2.3 MB when frames kept all 640 pixels


@pytest.mark.parametrize(("grid", "size"), LAYOUTS)
def test_head_grid_has_a_panel_per_layer_and_head_plus_mean(grid, size) -> None:
    layers, heads = 3, 2
    attention = random_attention(layers, heads, 4, grid[0] * grid[1]).unflatten(-1, grid)
    image = rgb_image(size)
    fig = head_grid(image, attention, ["a", "black", "cat", "<eos>"], 2)
    panels = image_axes(fig)
    assert len(panels) == layers * (heads + 1)
    assert [ax.get_title() for ax in panels[: heads + 1]] == ["head 0", "head 1", "mean"]
    heat = attention_to_pixels(attention[:, :, 2], size)  # (layers, heads, H, W)
    mean = blend_heatmap(as_rgb(image), heat.mean(axis=1)[1], heat.max(), ALPHA)
    np.testing.assert_allclose(
        panels[2 * (heads + 1) - 1].get_images()[0].get_array(), mean, atol=1e-5
    )
    assert [panels[k * (heads + 1)].get_ylabel() for k in range(layers)] == [
        "layer 0",
        "layer 1",
        "layer 2",
    ]
    assert png_bytes(fig) > 0


@pytest.mark.parametrize(
    ("word", "title"),
    [(2, 'word 2 "cat"'), ("cat", 'word 2 "cat"'), (np.int64(2), 'word 2 "cat"'),
     (-1, 'word 3 "<eos>"'), ("a", 'word 0 "a"')],
)  # fmt: skip
def test_head_grid_title_names_the_word_shown(word: int | str, title: str) -> None:
    words = ["a", "black", "cat", "<eos>"]
    attention = random_attention(2, 2, len(words), 6).unflatten(-1, (2, 3))
    fig = head_grid(rgb_image((20, 30)), attention, words, word)
    assert fig.get_suptitle().startswith(f"image attention of {title}:")


@pytest.mark.parametrize("word", [4, -5, "dog"])
def test_head_grid_refuses_a_word_not_in_the_caption(word: int | str) -> None:
    attention = random_attention(1, 1, 4, 6).unflatten(-1, (2, 3))
    with pytest.raises(ValueError, match="caption"):
        head_grid(rgb_image((20, 30)), attention, ["a", "black", "cat", "<eos>"], word)


@pytest.mark.parametrize("prefix", [0, 1])
def test_attention_matrices_shapes_and_causal_mask(prefix: int) -> None:
    grid, words = (3, 5), ["a", "red", "square", "<eos>"]
    count, patches, tokens = len(words), 15, prefix + 15
    cross = random_attention(2, 2, count, patches).unflatten(-1, grid)
    causal = random_attention(2, 2, count, count).tril()
    encoder = random_attention(2, 4, tokens, tokens)
    fig = attention_matrices(words, cross, causal, encoder, layer=1, num_prefix_tokens=prefix)
    panels = image_axes(fig)
    arrays = [np.ma.masked_invalid(ax.get_images()[0].get_array()) for ax in panels]
    assert [a.shape for a in arrays] == [(count, patches), (count, count), (tokens, tokens)]
    upper = np.triu(np.ones((count, count), dtype=bool), k=1)
    assert np.ma.getmaskarray(arrays[1])[upper].all()  # not allowed: blank
    assert not np.ma.getmaskarray(arrays[1])[~upper].any()  # allowed: drawn, even when ~0
    np.testing.assert_allclose(arrays[0], cross[1].mean(dim=0).flatten(1).numpy(), rtol=1e-6)
    assert f"{count} × {patches}" in panels[0].get_title()
    assert [t.get_text() for t in panels[0].get_yticklabels()] == words
    assert [t.get_text() for t in panels[1].get_xticklabels()] == ["<bos>", "a", "red", "square"]
    assert f"{tokens} × {tokens}" in panels[2].get_title()
    assert png_bytes(fig) > 0
    assert len(image_axes(attention_matrices(words, cross, causal))) == 2  # no encoder panel


@pytest.mark.parametrize(("grid", "size"), LAYOUTS)
@pytest.mark.parametrize("prefix", [0, 1])
def test_encoder_figures_render_and_outline_the_query_patch(grid, size, prefix: int) -> None:
    tokens = prefix + grid[0] * grid[1]
    attention = random_attention(2, 2, tokens, tokens)
    patch = (grid[0] - 1, 1)
    fig = encoder_attention_from_patch(
        rgb_image(size), attention, patch, grid, num_prefix_tokens=prefix
    )
    (ax,) = image_axes(fig)
    x, y = ax.patches[0].get_xy()
    assert (x, y) == pytest.approx((size[1] / grid[1] - 0.5, patch[0] * size[0] / grid[0] - 0.5))
    assert png_bytes(fig) > 0
    for query in (patch, None):
        fig = rollout_overlay(
            rgb_image(size), attention, grid, patch=query, num_prefix_tokens=prefix
        )
        assert len(image_axes(fig)) == 2
        assert png_bytes(fig) > 0


def test_figures_from_a_real_model(tiny_model: CaptionerModel, tmp_path: Path) -> None:
    """The tensors a model hands out (4 x 6 grid, 16 x 24 px) go through every function."""
    grid, words = tiny_model.encoder.grid_size, ["a", "b", "c", "<eos>"]
    prefix = tiny_model.encoder.num_prefix_tokens
    image = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        out = tiny_model.forward_with_attention(image, torch.tensor([[1, 5, 6, 7]]))
    cross = torch.stack(out.image_attention, dim=1)[0, :, :, :, prefix:].unflatten(-1, grid)
    causal = torch.stack(out.self_attention, dim=1)[0]  # (layers, heads, T, T)
    encoder = torch.stack(out.encoder_attention, dim=1)[0]  # (layers, heads, N, N)
    pixels = image[0].permute(1, 2, 0).numpy()  # (H, W, 3) floats
    figures = [
        word_overlays(pixels, cross, words),
        head_grid(pixels, cross, words, 1),
        attention_matrices(words, cross, causal, encoder, num_prefix_tokens=prefix),
        encoder_attention_from_patch(pixels, encoder, (3, 5), grid, num_prefix_tokens=prefix),
        rollout_overlay(pixels, encoder, grid, num_prefix_tokens=prefix),
    ]
    assert all(png_bytes(fig) > 0 for fig in figures)
    torch.testing.assert_close(
        attention_rollout(encoder).sum(dim=-1), torch.ones(encoder.shape[-1])
    )
    assert gif_frames(save_gif(tmp_path / "model.gif", pixels, cross, words))[0] == len(words)
