"""Grounding: does the word that names an object look at that object?

For every generated word aligned to an object of the ground truth, two scores per attention
view (each layer and head, each layer's mean over heads, and the mean over everything):
pointing accuracy, whether the centre of the patch with the most image attention lies inside
the object's box, and attention mass, the share of the word's attention that falls on the box
(each patch counted by the fraction of its area the box covers). The attention of a word is
the one its decoding step used, i.e. the row that predicted it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def box_coverage(
    box: Sequence[float] | torch.Tensor, grid: tuple[int, int], patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch of the grid: the fraction of its area inside the box (x0, y0, x1, y1 pixels,
    x1/y1 exclusive), and whether its centre lies inside. Boxes may be batched (..., 4); the
    results are then (..., grid_h, grid_w)."""
    box = torch.as_tensor(box, dtype=torch.float32)
    x0, y0, x1, y1 = (box[..., i, None] for i in range(4))  # each (..., 1)
    edges = [torch.arange(n + 1, dtype=torch.float32, device=box.device) * patch_size for n in grid]

    def overlap(edge: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return (torch.minimum(edge[1:], hi) - torch.maximum(edge[:-1], lo)).clamp_min(0)

    rows = overlap(edges[0], y0, y1) / patch_size  # (..., gh)
    cols = overlap(edges[1], x0, x1) / patch_size  # (..., gw)
    centres = [(e[1:] + e[:-1]) / 2 for e in edges]
    inside_rows = (centres[0] >= y0) & (centres[0] < y1)
    inside_cols = (centres[1] >= x0) & (centres[1] < x1)
    return (
        rows[..., :, None] * cols[..., None, :],
        inside_rows[..., :, None] & inside_cols[..., None, :],
    )


def grounding_loss(image_attention: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Attention supervision: -log of the share of each layer's head-mean image attention that
    falls on the box of the object the word names, averaged over layers and naming words.

    `image_attention` holds one (B, heads, T, patches) tensor per layer; `targets` (B, T,
    patches) is each patch's box coverage, all zero for a word that names no object. Heads
    stay free to split the work; only their mean is asked to find the object.
    """
    named = targets.sum(-1) > 0  # (B, T)
    if not named.any():
        return targets.new_zeros(())
    looks = torch.stack([layer.float().mean(1) for layer in image_attention])  # (L, B, T, S)
    mass = (looks * targets.float()).sum(-1)[:, named]  # (L, words)
    return -mass.clamp_min(1e-6).log().mean()


class GroundingMeter:
    """Accumulates pointing hits and attention mass over captions, per attention view."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self.words = 0
        self.hits: torch.Tensor | None = None  # (L + 1, H + 1): heads then the head mean
        self.mass: torch.Tensor | None = None  # last row: the mean over layers

    def update(
        self, attention: torch.Tensor, alignment: Sequence[int], boxes: Sequence[Sequence[int]]
    ) -> None:
        """One caption: `attention` (L, H, T, grid_h, grid_w) for its T tokens, `alignment[t]`
        the object token t names (or -1), `boxes[k]` object k's pixel box."""
        layers, heads, _, grid_h, grid_w = attention.shape
        if self.hits is None:
            self.hits = torch.zeros(layers + 1, heads + 1, dtype=torch.float64)
            self.mass = torch.zeros(layers + 1, heads + 1, dtype=torch.float64)
        views = attention.double()
        views = torch.cat([views, views.mean(1, keepdim=True)], 1)  # (L, H+1, T, gh, gw)
        views = torch.cat([views, views.mean(0, keepdim=True)], 0)  # (L+1, H+1, T, gh, gw)
        for t, k in enumerate(alignment):
            if k < 0 or t >= views.shape[2]:
                continue
            coverage, inside = box_coverage(boxes[k], (grid_h, grid_w), self.patch_size)
            word = views[:, :, t].flatten(2)  # (L+1, H+1, patches)
            best = word.argmax(-1)  # (L+1, H+1)
            self.hits += inside.flatten()[best].double()
            self.mass += (word * coverage.flatten()).sum(-1) / word.sum(-1)
            self.words += 1

    def merge(self, other: GroundingMeter) -> None:
        """Add another meter's counts: one caption's, or another process's share of a split."""
        if other.hits is None or other.mass is None:
            return
        if self.hits is None or self.mass is None:
            self.hits, self.mass = other.hits.clone(), other.mass.clone()
        else:
            self.hits += other.hits
            self.mass += other.mass
        self.words += other.words

    def compute(self) -> dict[str, float]:
        """Flat metrics: `grounding/pointing_acc` is the best layer's head mean (its index in
        `grounding/best_layer`); every layer, head and mean has its own key."""
        if self.hits is None or not self.words:
            return {"grounding/words": 0.0}
        hits, mass = self.hits / self.words, self.mass / self.words
        layers, heads = hits.shape[0] - 1, hits.shape[1] - 1
        best = int(hits[:layers, heads].argmax())
        out = {
            "grounding/pointing_acc": float(hits[best, heads]),
            "grounding/mass": float(mass[best, heads]),
            "grounding/best_layer": float(best),
            "grounding/words": float(self.words),
            "grounding/pointing_acc/mean": float(hits[layers, heads]),
            "grounding/mass/mean": float(mass[layers, heads]),
        }
        for layer in range(layers):
            for head in range(heads + 1):
                name = f"layer{layer}" + (f"_head{head}" if head < heads else "")
                out[f"grounding/pointing_acc/{name}"] = float(hits[layer, head])
                out[f"grounding/mass/{name}"] = float(mass[layer, head])
        return out
