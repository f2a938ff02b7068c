"""Training and evaluation with Lightning, from a composed Hydra config: the LightningModule
(`lit_module`), its objectives (`loss`, `scst`), scoring (`evaluation`), callbacks, the safe
checkpoint plugin (`checkpoint_io`), resuming (`resume`), and what the scripts call (`tasks`).
"""

from captioner.training.tasks import evaluate, train, validate_data

__all__ = ["evaluate", "train", "validate_data"]
