"""Caption image files with a trained checkpoint.

    python scripts/caption.py --ckpt PATH [--beam-size N] [--max-length N] [--dtype bf16]
                              [--json] [--save-attention DIR] IMAGE_OR_DIR ...

Prints `path<TAB>caption` per image (or, with --json, one JSON list). File names are printed
with backslash escapes for backslashes, tabs, line breaks, other control characters and bytes
that are not UTF-8, so each image is one line of two fields. Whatever is not a readable image
(a broken link, a pipe, a file of another kind) is named on stderr and skipped; the exit
status is 1 if there was any.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from captioner.cli import at_least, finite, user_errors
from captioner.data.tokenizer import escape
from captioner.inference import DTYPES, Captioner, find_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="files or folders")
    parser.add_argument("--ckpt", required=True, help=".ckpt file or scripts/export.py folder")
    parser.add_argument("--beam-size", type=at_least(1), default=3, help="1 is greedy (default 3)")
    parser.add_argument(
        "--max-length", type=at_least(1), default=None, help="most tokens a caption"
    )
    parser.add_argument(
        "--length-penalty", type=finite, default=1.0, help="beams rank by log p / length ** this"
    )
    parser.add_argument("--sample", action="store_true", help="draw words (needs beam size 1)")
    parser.add_argument("--temperature", type=finite, default=1.0, help="sampling: < 1 is safer")
    parser.add_argument("--top-k", type=at_least(0), default=0, help="sampling: k likeliest words")
    parser.add_argument("--top-p", type=finite, default=1.0, help="sampling: nucleus mass")
    parser.add_argument("--seed", type=int, default=None, help="makes --sample reproducible")
    parser.add_argument("--batch-size", type=at_least(1), default=16, help="images at a time")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if any)"
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32",
        help="weights while decoding: bf16 is faster where decoding reads weights (default fp32)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="a JSON list on stdout")
    parser.add_argument(
        "--save-attention",
        type=Path,
        metavar="DIR",
        help="per image: word overlays (.png), a GIF word by word, attention matrices",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return caption(args)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except OSError as err:  # the output cannot be written (a full disk, ...)
        print(f"error: {escape(str(err))}", file=sys.stderr)
        return 2


def caption(args: argparse.Namespace) -> int:
    sys.stdout.reconfigure(errors="backslashreplace")  # a terminal that is not UTF-8
    files = find_images(args.inputs)
    if not files:
        print("error: no files found in the given inputs", file=sys.stderr)
        return 1
    listed, failed, figures = [], 0, None
    with user_errors():
        if args.save_attention is not None:
            from captioner.viz import AttentionFolder  # matplotlib: only when asked for

            figures = AttentionFolder(args.save_attention)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        captioner = Captioner.from_checkpoint(args.ckpt, device=device, dtype=args.dtype)
        results = captioner.caption_files(
            files,
            batch_size=args.batch_size,
            beam_size=1 if args.sample else args.beam_size,
            max_length=args.max_length,
            length_penalty=args.length_penalty,
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            return_attention=figures is not None,
            return_encoder_attention=figures is not None,
        )
        for path, result, image in results:
            name = escape(str(path))
            if isinstance(result, Exception):
                print(f"error: {escape(str(result))}", file=sys.stderr)
                failed += 1
                continue
            if args.json:
                listed.append({"image": name, "caption": result.text})
            else:
                print(f"{name}\t{result.text}", flush=True)
            if figures is not None:
                try:
                    figures.save(path, image, result, captioner.model.encoder.num_prefix_tokens)
                except Exception as err:  # one image's figures never stop the run
                    print(f"error: {name}: figures not saved ({escape(str(err))})", file=sys.stderr)
                    failed += 1
    if args.json:
        print(json.dumps(listed, indent=2, ensure_ascii=False))
    if failed:
        print(f"{failed} of {len(files)} inputs could not be captioned", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
