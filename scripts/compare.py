"""Training runs side by side: python scripts/compare.py [NAME=]RUN_DIR... [--out FOLDER]

The command lives in `captioner/cli/compare.py`: `python -m captioner.cli.compare`
runs it from any folder.
"""

import sys

from captioner.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
