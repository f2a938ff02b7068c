"""Caption-quality and grounding metrics."""

from captioner.metrics.coco import caption_scores
from captioner.metrics.grounding import GroundingMeter, box_coverage

__all__ = ["GroundingMeter", "box_coverage", "caption_scores"]
