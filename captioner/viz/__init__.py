"""Figures from attention tensors (matplotlib); nothing here runs a model."""

from captioner.viz.overlay import attention_to_pixels, select_attention, word_overlays

__all__ = ["attention_to_pixels", "select_attention", "word_overlays"]
