"""Figures from attention tensors (matplotlib); nothing here runs a model.

Maps go back to pixels through each tensor's patch grid (any shape, any patch size); encoder
functions take `num_prefix_tokens` so a CLS token is dropped from maps but kept in matrices.
"""

from captioner.viz.encoder import encoder_attention_from_patch, encoder_patch_map, query_map
from captioner.viz.explorer import ExplorerImage, explorer, explorer_html
from captioner.viz.files import AttentionFolder, save_figure
from captioner.viz.gif import save_gif
from captioner.viz.matrices import attention_matrices
from captioner.viz.overlay import (
    attention_to_pixels,
    blend_heatmap,
    head_grid,
    select_attention,
    word_overlays,
)
from captioner.viz.rollout import attention_rollout, rollout_overlay

__all__ = [
    "AttentionFolder",
    "ExplorerImage",
    "attention_matrices",
    "attention_rollout",
    "attention_to_pixels",
    "blend_heatmap",
    "encoder_attention_from_patch",
    "encoder_patch_map",
    "explorer",
    "explorer_html",
    "head_grid",
    "query_map",
    "rollout_overlay",
    "save_figure",
    "save_gif",
    "select_attention",
    "word_overlays",
]
