"""Export a checkpoint as safetensors weights plus JSON (architecture, tokenizer, preprocessing).

    python scripts/export.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --out exported/

`--ckpt` also takes the run folder itself (its `checkpoints/last.ckpt` is read). The folder
written loads with `Captioner.from_checkpoint("exported/")` and `scripts/caption.py`; its files
get the usual permissions (the umask's), so those who share the folder can read them.
"""

from __future__ import annotations

import sys

from captioner.cli.console import OneLineParser, user_errors


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt",
        required=True,
        metavar="PATH",
        help="a .ckpt or a run folder (its checkpoints/last.ckpt) of scripts/train.py",
    )
    parser.add_argument("--out", required=True, help="folder to write (created if needed)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read a .ckpt that a safe load refuses, unpickling whatever it holds: this runs any "
        "code in it, so only for a file you trust. The export it writes is safe to share.",
    )
    args = parser.parse_args(argv)
    # torch comes with the package's checkpoint module: after parsing, so --help answers at once
    from captioner.core import checkpoint

    with user_errors():
        ckpt, note = checkpoint.resolve_checkpoint(args.ckpt)
        if note is not None:
            print(note, file=sys.stderr)
        read = checkpoint.load_trusted_pickle if args.trust_pickle else checkpoint.load_checkpoint
        weights, config = checkpoint.export(read(ckpt), args.out)
    print(f"weights written to {weights}")
    print(f"config written to {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
