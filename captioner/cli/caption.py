"""Caption image files with a trained checkpoint.

    python scripts/caption.py --ckpt PATH [--beam-size N] [--max-length N] [--dtype bf16]
                              [--json] [--save-attention DIR] [--html FILE] [--no-progress]
                              IMAGE_OR_DIR ...

Prints `path<TAB>caption` per image (or, with --json, one JSON list). File names are printed
with backslash escapes for backslashes, tabs, line breaks, other control characters and bytes
that are not UTF-8, so each image is one line of two fields. Whatever is not a readable image
(a broken link, a pipe, a file of another kind) is named on stderr and skipped; the exit
status is 1 if there was any. `--html FILE` writes one page, self-contained (it opens with no
network), where hovering a word of each caption lights up the patches it looked at. On a
terminal, a bar on stderr counts the images done, their rate and the time left; piped or
redirected, stderr holds errors only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from captioner.cli.console import OneLineParser, at_least, finite, progress, user_errors

# torch and the package's modules are imported once the arguments are read: `--help` and a
# wrong option answer at once
DTYPES = ("fp32", "bf16", "fp16")  # the names of `captioner.core.inference.DTYPES`


def build_parser() -> OneLineParser:
    """The options, each with its help; the parser is built without importing torch."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="files or folders")
    add("--ckpt", required=True, metavar="PATH",
        help="a .ckpt or a run folder of scripts/train.py (its checkpoints/last.ckpt), or a "
        "folder of scripts/export.py")  # fmt: skip
    add("--beam-size", type=at_least(1), metavar="N",
        help="hypotheses kept per image; 1 is greedy (default 3, or 1 with --sample)")  # fmt: skip
    add("--max-length", type=at_least(1), metavar="N",
        help="most tokens a caption (default: the longest the model was trained on)")  # fmt: skip
    add("--length-penalty", type=finite, default=1.0, metavar="X",
        help="beams rank by log p / length ** X (default %(default)s)")  # fmt: skip
    add("--sample", action="store_true", help="draw each word: one caption per image, no beams")
    add("--temperature", type=finite, default=1.0, metavar="T",
        help="sampling: < 1 is safer (default %(default)s)")  # fmt: skip
    add("--top-k", type=at_least(0), default=0, metavar="K",
        help="sampling: among the K likeliest words only (default %(default)s: all)")  # fmt: skip
    add("--top-p", type=finite, default=1.0, metavar="P",
        help="sampling: the likeliest words holding mass P (default %(default)s)")  # fmt: skip
    add("--seed", type=at_least(0, below=2**63), metavar="N", help="makes --sample reproducible")
    add("--batch-size", type=at_least(1), default=16, metavar="N",
        help="images at a time (default %(default)s)")  # fmt: skip
    add("--device", help="cpu, cuda, cuda:N or mps (default: cuda if any)")
    add("--dtype", choices=DTYPES, default="fp32",
        help="weights while decoding: bf16 is faster where decoding reads weights "
        "(default %(default)s)")  # fmt: skip
    add("--json", action="store_true", help="a JSON list on stdout")
    add("--save-attention", type=Path, metavar="DIR",
        help="per image: word overlays (.png), a GIF word by word, attention matrices")  # fmt: skip
    add("--html", type=Path, metavar="FILE",
        help="a page of every image: hover a word to see where it looked")  # fmt: skip
    add("--no-progress", action="store_true",
        help="no progress bar (drawn on stderr only when it is a terminal)")  # fmt: skip
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the beam size `--sample` implies: an explicit larger one is refused
    rather than dropped."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.beam_size is None:
        args.beam_size = 1 if args.sample else 3
    elif args.sample and args.beam_size > 1:
        parser.error(
            f"--sample draws one caption per image, --beam-size {args.beam_size} keeps several "
            "hypotheses: use --beam-size 1 with --sample, or leave --sample out"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return caption(args)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except OSError as err:  # the output cannot be written (a full disk, ...)
        from captioner.core.tokenizer import escape

        print(f"error: {escape(str(err))}", file=sys.stderr)
        return 2


def flag(field: str) -> str:
    """The option that sets a decoding field, for errors to name what the user typed."""
    return "--sample" if field == "do_sample" else f"--{field.replace('_', '-')}"


def caption(args: argparse.Namespace) -> int:
    """Caption every image found, printing as it goes; returns the exit status."""
    import torch

    from captioner.core.checkpoint import resolve_checkpoint
    from captioner.core.generation import DecodingOptions
    from captioner.core.inference import Captioner, find_images
    from captioner.core.tokenizer import escape
    from captioner.viz.explorer import ExplorerImage, explorer

    sys.stdout.reconfigure(errors="backslashreplace")  # a terminal that is not UTF-8
    files = find_images(args.inputs)
    if not files:
        print("error: no files found in the given inputs", file=sys.stderr)
        return 1
    listed, failed, figures, saved, page = [], 0, None, 0, []
    with user_errors():
        if args.save_attention is not None:
            from captioner.viz import AttentionFolder  # matplotlib: only when asked for

            figures = AttentionFolder(args.save_attention)
        ckpt, note = resolve_checkpoint(args.ckpt)
        if note is not None:
            print(escape(note), file=sys.stderr)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        captioner = Captioner.from_checkpoint(ckpt, device=device, dtype=args.dtype)
        prefix = captioner.model.encoder.num_prefix_tokens
        decoding = {
            "beam_size": args.beam_size,
            "max_length": args.max_length,
            "length_penalty": args.length_penalty,
            "do_sample": args.sample,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
        }
        # checked before any image is read, a wrong value named by its flag
        DecodingOptions(**decoding).resolve_max_length(captioner.model.config, name=flag)
        results = captioner.caption_files(
            files,
            batch_size=args.batch_size,
            seed=args.seed,
            return_attention=figures is not None or args.html is not None,
            return_encoder_attention=figures is not None or args.html is not None,
            **decoding,
        )
        with progress("captioning", len(files), "images", show=not args.no_progress) as done:
            for path, result, image in results:
                done()
                name = escape(str(path))
                if isinstance(result, Exception):
                    print(f"error: {escape(str(result))}", file=sys.stderr)
                    failed += 1
                    continue
                if args.json:
                    listed.append({"image": name, "caption": result.text})
                else:
                    print(f"{name}\t{result.text}", flush=True)
                if args.html is not None:
                    seen = captioner.preprocess.resize(image).permute(1, 2, 0).numpy()
                    page.append(ExplorerImage(name, seen, result))
                if figures is not None:
                    try:
                        figures.save(path, image, result, prefix)
                        saved += 1
                    except Exception as err:  # one image's figures never stop the run
                        why = escape(str(err))
                        print(f"error: {name}: figures not saved ({why})", file=sys.stderr)
                        failed += 1
    if figures is not None:
        print(
            f"attention figures of {saved} image(s) written to {escape(str(figures.directory))} "
            "(per image: <name>.png word overlays, <name>.gif word by word, "
            "<name>_matrices.png)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(listed, indent=2, ensure_ascii=False))
    if args.html is not None and page:
        with user_errors():
            written = explorer(page, args.html, num_prefix_tokens=prefix)
        size = written.stat().st_size / 1e6
        print(f"attention explorer of {len(page)} image(s) written to "
              f"{escape(str(written))} ({size:.1f} MB)", file=sys.stderr)  # fmt: skip
    if failed:
        print(f"{failed} of {len(files)} inputs could not be captioned", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
