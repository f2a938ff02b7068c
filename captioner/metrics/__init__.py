"""Caption-quality and grounding metrics."""

from captioner.metrics.coco import caption_scores, warn_if_no_java
from captioner.metrics.grounding import GroundingMeter, box_coverage, grounding_loss

__all__ = ["GroundingMeter", "box_coverage", "caption_scores", "grounding_loss", "warn_if_no_java"]
