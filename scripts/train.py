"""Train a captioner: python scripts/train.py experiment=shapes_tiny [key=value ...].

The run folder (logs/train/runs/<date>_<time>/) gets the checkpoints, train.log, the CSV log
and metrics.json; the last lines printed say how to caption and score with the checkpoint.
"""

from __future__ import annotations

import shlex

from omegaconf import DictConfig

from captioner.app import run, run_log


def train(cfg: DictConfig) -> None:
    from captioner.cli import print_metrics  # the package (torch) only once a run starts
    from captioner.tasks import train as fit

    metrics, objects = fit(cfg)
    if not objects["trainer"].is_global_zero:  # the other DDP processes return the same metrics
        return
    checkpoint = objects["checkpoint"]
    after = ["no checkpoint was written (checkpointing is off)"]
    if checkpoint is not None:
        ckpt = shlex.quote(str(checkpoint))
        after = [
            f"checkpoint: {checkpoint}",
            f"caption images: python scripts/caption.py --ckpt {ckpt} IMAGE_OR_DIR ...",
            f"score it:       python scripts/eval.py --ckpt {ckpt}",
        ]
    print_metrics(metrics, objects["metrics_path"], run_log(), after)


if __name__ == "__main__":
    run("train", train, __doc__)
