"""Score a checkpoint as papers do: python scripts/eval.py --ckpt PATH [key=value ...].

PATH is a .ckpt from scripts/train.py, its run folder (its checkpoints/last.ckpt is read) or
a folder from scripts/export.py; `ckpt_path=PATH` works too. The test split of the data the
checkpoint was trained on is captioned and scored; predictions.json, metrics.json and
eval.log go to logs/eval/runs/<date>_<time>/. On a terminal, a bar on stderr counts the test
batches done, their rate and the time left; piped or redirected, none is drawn.
"""

from __future__ import annotations

from omegaconf import DictConfig

from captioner.cli.app import run, run_log


def evaluate(cfg: DictConfig) -> None:
    from captioner.cli.console import print_metrics  # the package (torch) only once a run starts
    from captioner.training.tasks import evaluate as score

    metrics, objects = score(cfg)
    after = [f"predictions written to {path}" for path in objects["prediction_paths"].values()]
    after.append(
        f"evaluation card (checkpoint, data files, decoding, versions): {objects['card_path']}"
    )
    print_metrics(metrics, objects["metrics_path"], run_log(), after)


def main() -> None:
    run("eval", evaluate, __doc__)


if __name__ == "__main__":
    main()
