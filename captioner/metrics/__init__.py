"""Caption-quality metrics."""

from captioner.metrics.coco import caption_scores

__all__ = ["caption_scores"]
