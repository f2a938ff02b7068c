"""Caption image files with a trained checkpoint.

The command lives in `captioner/cli/caption.py`: `python -m captioner.cli.caption`
runs it from any folder.
"""

import sys

from captioner.cli.caption import main

if __name__ == "__main__":
    sys.exit(main())
