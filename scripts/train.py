"""Train a captioner: python scripts/train.py experiment=shapes [key=value ...]."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CAPTIONER_ROOT", str(ROOT))

from captioner.cli import print_metrics, user_errors  # noqa: E402
from captioner.tasks import train  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors():
        metrics, objects = train(cfg)
    if objects["trainer"].is_global_zero:  # the other DDP processes return the same metrics
        print_metrics(metrics, objects["metrics_path"])


if __name__ == "__main__":
    main()
