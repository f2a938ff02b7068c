"""Serve a browser app that captions images and shows each word's attention over the image.

The command lives in `captioner/cli/demo.py`: `python -m captioner.cli.demo`
runs it from any folder.
"""

import sys

from captioner.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
