"""Speed, ours next to Hugging Face's: python scripts/benchmark.py [--model tiny] [--image-size 64]
[--only SUITE ...] [--device cuda] [--no-hf] [--json] [KEY=VALUE ...]

For randomly initialised models of a `conf/model/` preset (with the KEY=VALUE overrides);
medians of repeated runs in turns. By default: training, generation, decoding and data; the
others when named by --only (each suite is a module of `captioner.tools.benchmark`, described
below). --device cuda runs training (bf16 autocast), generation, decoding and variants on a
GPU, timed to the end of the queued work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from captioner.cli.console import user_errors


def named_overrides(text: str) -> tuple[str, list[str]]:
    """--variant "NAME=KEY=VALUE KEY=VALUE" -> (NAME, [KEY=VALUE, ...])."""
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"expected NAME=KEY=VALUE [KEY=VALUE ...], got {text!r}")
    return name, overrides.split()


def build_parser(suites: dict[str, Any]) -> argparse.ArgumentParser:
    """The options; `--help` ends with what each suite measures (its module's docstring)."""
    described = "\n".join(
        f"{name}: {' '.join(sys.modules[suite.run.__module__].__doc__.split())}"
        for name, suite in suites.items()
    )
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=described,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = parser.add_argument
    add("--model", default="tiny", help="a preset in conf/model/")
    add("overrides", nargs="*", metavar="KEY=VALUE",
        help="Hydra overrides of the model, e.g. model/decoder=prefix "
        "model.decoder.depth=4")  # fmt: skip
    add("--image-size", type=int, default=64)
    add("--vocab-size", type=int, default=10_000, help="COCO-sized by default")
    add("--train-batch", type=int, default=64, help="training and loader batch")
    add("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
        help="training: fp32, bf16 autocast; variants: the last; decoding: see "
        "--decode-dtypes")  # fmt: skip
    add("--decode-dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
        help="decoding: the weights cast to each")  # fmt: skip
    add("--batch-sizes", type=int, nargs="+", default=[1, 32], help="decoding")
    add("--repeats", type=int, default=7, help="timed runs per figure")
    add("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    add("--workers", type=int, nargs="+", default=[0, 2], help="loader processes")
    add("--only", nargs="+", choices=list(suites),
        default=[name for name, suite in suites.items() if suite.default])  # fmt: skip
    add("--variant", type=named_overrides, action="append", metavar="NAME=OVERRIDES",
        help='variants: "NAME=KEY=VALUE KEY=VALUE", repeated (default: attention '
        "variants)")  # fmt: skip
    add("--lengths", type=int, nargs="+", default=None,
        help="decoding and variants: caption lengths (default 16 32 64 and 16 64)")  # fmt: skip
    add("--device", default="cpu", help="cpu or cuda (training in bf16 there)")
    add("--ckpt", help="precision: a trained checkpoint (.ckpt or export)")
    add("--low-dtype", choices=["bf16", "fp16"], default="bf16", help="precision")
    add("--limit", type=int, default=None, help="precision: test images")
    add("--patches", type=int, nargs="+", default=[64, 196, 576, 1024], help="fusion: grids")
    add("--steps", type=int, default=12, help="features: training steps")
    add("--no-hf", action="store_true", help="leave out the Hugging Face model")
    add("--compile", action="store_true", help="also train ours through torch.compile")
    add("--json", action="store_true", help="JSON on stdout instead of tables")
    return parser


def preset_config(name: str, image_size: int, vocab_size: int, overrides: Sequence[str]) -> Any:
    """The architecture of `model=<name>` with `overrides` (`model/decoder=prefix`,
    `model.decoder.depth=4`, ...) at this image size, as training would build it."""
    from omegaconf import OmegaConf

    from captioner.cli.config import compose
    from captioner.core.models import CaptionerConfig
    from captioner.training.lit_module import ENCODER_TRAINING

    cfg = compose("train", [f"model={name}", f"data.image_size={image_size}", *overrides])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    keys = {field.name for field in dataclasses.fields(CaptionerConfig)}
    architecture = {k: v for k, v in model.items() if k in keys}  # type: ignore[union-attr]
    encoder = architecture["encoder"]
    architecture["encoder"] = {k: v for k, v in encoder.items() if k not in ENCODER_TRAINING}
    return CaptionerConfig.from_dict({**architecture, "vocab_size": vocab_size})


def main(argv: list[str] | None = None) -> None:
    import torch  # the package once the arguments are read: --help answers at once

    from captioner.cli.config import compose_config
    from captioner.core.errors import ConfigError
    from captioner.core.inference import usable_device
    from captioner.tools.benchmark import SUITES, Setting
    from captioner.tools.benchmark.timing import machine_name

    args = build_parser(SUITES).parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    chosen = {name: suite for name, suite in SUITES.items() if name in args.only}
    results: dict[str, list[Any]] = {}
    with user_errors():
        device = usable_device(args.device)
        if device.type != "cpu" and any(suite.cpu_only for suite in chosen.values()):
            cpu = ", ".join(name for name, suite in chosen.items() if suite.cpu_only)
            raise ConfigError(f"--only {cpu} measure the CPU: leave out --device.")
        if "precision" in chosen and args.ckpt is None:
            raise ConfigError("--only precision compares a trained model: give --ckpt PATH.")

        def preset(overrides: Sequence[str]) -> Any:
            return preset_config(args.model, args.image_size, args.vocab_size, overrides)

        setting = Setting(args, preset(args.overrides), device, preset, compose_config)
        for name, suite in chosen.items():
            results[name] = suite.run(setting)
    about = {
        "model": args.model, "image_size": args.image_size, "vocab_size": args.vocab_size,
        "caption_tokens": setting.config.max_len, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "torch": torch.__version__, "device": str(device),
        "machine": machine_name(device),
    }  # fmt: skip
    if args.json:
        report: dict[str, Any] = {"setting": about}
        for name, suite in SUITES.items():
            report.update(suite.json(results.get(name, [])))
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console

    console = Console(width=max(Console().width, 110))
    console.print(", ".join(f"{k}={v}" for k, v in about.items()))
    for name, rows in results.items():
        if rows:
            SUITES[name].show(console, rows, results)


if __name__ == "__main__":
    main()
