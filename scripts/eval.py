"""Score a checkpoint as papers do: python scripts/eval.py ckpt_path=PATH [key=value ...]."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CAPTIONER_ROOT", str(ROOT))

from captioner.cli import print_metrics, user_errors  # noqa: E402
from captioner.tasks import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        metrics, objects = evaluate(cfg)
    for path in objects["prediction_paths"].values():
        print(f"predictions written to {path}")
    print_metrics(metrics, objects["metrics_path"])


if __name__ == "__main__":
    main()
