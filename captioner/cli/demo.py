"""Serve a browser app that captions images and shows each word's attention over the image.

    python scripts/demo.py --ckpt PATH [--host 127.0.0.1] [--port N] [--share] [--device cpu]

Needs the demo extra: pip install -e '.[demo]'. Only this machine can open the app unless
--host says otherwise; --share asks Gradio for a public link.
"""

from __future__ import annotations

import argparse
import sys

from captioner.cli.console import OneLineParser, at_least, user_errors


def build_parser() -> OneLineParser:
    """The options, each with its help; built without importing torch or gradio."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--ckpt", required=True, metavar="PATH",
        help="a .ckpt or a run folder of scripts/train.py (its checkpoints/last.ckpt), or a "
        "folder of scripts/export.py")  # fmt: skip
    add("--host", default="127.0.0.1",
        help="address to listen on (default %(default)s: this machine only; 0.0.0.0: "
        "every network)")  # fmt: skip
    add("--port", type=at_least(1, below=65536), metavar="N",
        help="port to listen on (default: the first free one from 7860)")  # fmt: skip
    add("--share", action="store_true", help="also a public link through Gradio's servers")
    add("--device", help="cpu, cuda, cuda:N or mps (default: cuda if any)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        serve(args)
    except KeyboardInterrupt:  # Ctrl-C before Gradio stands by for it (it stops the server)
        return 130
    return 0


def serve(args: argparse.Namespace) -> None:
    """Load the checkpoint and serve the app until Ctrl-C."""
    with user_errors():
        from captioner.tools import demo  # torch and gradio: once the arguments are read

        demo.check_gradio()
        from captioner.core.checkpoint import resolve_checkpoint

        ckpt, note = resolve_checkpoint(args.ckpt)
        if note is not None:
            print(note, file=sys.stderr)
        app = demo.build_demo(*demo.load(ckpt, args.device))
        demo.launch(app, args.host, args.port, args.share)


if __name__ == "__main__":
    sys.exit(main())
