"""Caption-quality and grounding metrics."""

from captioner.metrics.coco import caption_scores, check_java
from captioner.metrics.grounding import GroundingMeter, box_coverage, grounding_loss

__all__ = ["GroundingMeter", "box_coverage", "caption_scores", "check_java", "grounding_loss"]
