"""Speed, ours next to Hugging Face's: python scripts/benchmark.py [--model tiny] [--image-size 64]

The command lives in `captioner/cli/benchmark.py`: `python -m captioner.cli.benchmark`
runs it from any folder.
"""

from captioner.cli.benchmark import main

if __name__ == "__main__":
    main()
