"""Train a captioner: python scripts/train.py experiment=shapes_tiny [key=value ...].

The command lives in `captioner/cli/train.py`: `python -m captioner.cli.train`
runs it from any folder.
"""

from captioner.cli.train import main

if __name__ == "__main__":
    main()
