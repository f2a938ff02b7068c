"""Export a checkpoint as safetensors weights plus JSON (architecture, tokenizer, preprocessing).

    python scripts/export.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --out exported/

The folder loads with `Captioner.from_checkpoint("exported/")` and `scripts/caption.py`.
"""

from __future__ import annotations

import argparse
import sys

from captioner.checkpoint import export, load_checkpoint, load_trusted_pickle
from captioner.cli import user_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a .ckpt from scripts/train.py")
    parser.add_argument("--out", required=True, help="folder to write (created if needed)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read a .ckpt that a safe load refuses, unpickling whatever it holds: this runs any "
        "code in it, so only for a file you trust. The export it writes is safe to share.",
    )
    args = parser.parse_args(argv)
    with user_errors():
        read = load_trusted_pickle if args.trust_pickle else load_checkpoint
        weights, config = export(read(args.ckpt), args.out)
    print(f"weights written to {weights}")
    print(f"config written to {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
