"""Caption image files with a trained checkpoint.

    python scripts/caption.py --ckpt PATH [--beam-size N] [--max-length N] [--json]
                              [--save-attention DIR] IMAGE_OR_DIR ...

Prints `path<TAB>caption` per image (or, with --json, one JSON list). Files that are not
readable images are named on stderr and skipped; the exit status is 1 if there were any.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from captioner.cli import user_errors
from captioner.inference import Captioner, find_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="files or folders")
    parser.add_argument("--ckpt", required=True, help=".ckpt file or scripts/export.py folder")
    parser.add_argument("--beam-size", type=int, default=3, help="1 is greedy (default 3)")
    parser.add_argument("--max-length", type=int, default=None, help="most tokens per caption")
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--sample", action="store_true", help="draw words (needs beam size 1)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="makes --sample reproducible")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="a JSON list on stdout")
    parser.add_argument(
        "--save-attention",
        type=Path,
        metavar="DIR",
        help="per image: word overlays (.png), a GIF word by word, attention matrices",
    )
    return parser.parse_args(argv)


def save_attention(
    directory: Path, path: Path, image: object, caption: object, used: set, prefix: int
) -> None:
    """In `directory`: `<stem>.png`, the image under each word's cross-attention;
    `<stem>.gif`, the same word by word; `<stem>_matrices.png`, the words x patches matrix
    beside the decoder's causal and the encoder's self-attention (`<stem>_` etc. when two
    inputs share a stem)."""
    from captioner.viz import attention_matrices, save_gif, word_overlays

    name = path.stem
    while name in used:
        name += "_"
    used.add(name)
    directory.mkdir(parents=True, exist_ok=True)
    words = caption.words
    word_overlays(image, caption.cross_attention, words).savefig(directory / f"{name}.png", dpi=100)
    save_gif(directory / f"{name}.gif", image, caption.cross_attention, words)
    matrices = attention_matrices(
        words, caption.cross_attention, caption.self_attention, caption.encoder_attention,
        num_prefix_tokens=prefix,
    )  # fmt: skip
    matrices.savefig(directory / f"{name}_matrices.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = find_images(args.inputs)
    if not files:
        print("error: no files found in the given inputs", file=sys.stderr)
        return 1
    listed, failed, figures = [], 0, set()
    with user_errors():
        captioner = Captioner.from_checkpoint(args.ckpt, device=args.device)
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
            return_attention=args.save_attention is not None,
            return_encoder_attention=args.save_attention is not None,
        )
        for path, result, image in results:
            if isinstance(result, Exception):
                print(f"error: {result}", file=sys.stderr)
                failed += 1
                continue
            if args.json:
                listed.append({"image": str(path), "caption": result.text})
            else:
                print(f"{path}\t{result.text}", flush=True)
            if args.save_attention is not None:
                prefix = captioner.model.encoder.num_prefix_tokens
                save_attention(args.save_attention, path, image, result, figures, prefix)
    if args.json:
        print(json.dumps(listed, indent=2))
    if failed:
        print(f"{failed} of {len(files)} inputs could not be captioned", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
