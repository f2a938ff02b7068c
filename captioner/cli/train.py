"""Train a captioner: python scripts/train.py experiment=shapes_tiny [key=value ...].

The run folder (logs/train/runs/<date>_<time>/) gets the checkpoints, train.log, the CSV log
and metrics.json; the last lines printed say how to caption and score with the checkpoint.
The value of `optimized_metric` (val/CIDEr by default) is returned to Hydra, for a sweeper
(`-m hydra/sweeper=optuna ...`) to optimise.
"""

from __future__ import annotations

import logging
import shlex

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from captioner.cli.app import invocation, run, run_log

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    from captioner.cli.console import print_metrics  # the package (torch) only once a run starts
    from captioner.training import train as fit

    metrics, objects = fit(cfg)
    if not objects["trainer"].is_global_zero:  # the other DDP processes return the same metrics
        return optimized(metrics, cfg.get("optimized_metric"))
    checkpoint = objects["checkpoint"]
    after = ["no checkpoint was written (checkpointing is off)"]
    if checkpoint is not None:
        ckpt = shlex.quote(str(checkpoint))
        after = [
            f"checkpoint: {checkpoint}",
            f"caption images: {invocation('caption')} --ckpt {ckpt} IMAGE_OR_DIR ...",
            f"score it:       {invocation('eval')} --ckpt {ckpt}",
        ]
    print_metrics(metrics, objects["metrics_path"], run_log(), after)
    return optimized(metrics, cfg.get("optimized_metric"))


def optimized(metrics: dict[str, float], name: str | None) -> float | None:
    """The metric a sweeper optimises (lightning-hydra-template's `optimized_metric`), or None
    when none is named or the run did not measure it (in a sweep, one line says so)."""
    if name is None:
        return None
    if name not in metrics:
        if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
            return None
        log.warning(
            "optimized_metric=%s was not measured by this run (it has %s): nothing is returned "
            "for a sweeper to optimise", name, ", ".join(sorted(metrics)[:8]) or "no metric",
        )  # fmt: skip
        return None
    return metrics[name]


def main() -> None:
    run("train", train, __doc__)


if __name__ == "__main__":
    main()
