"""Export a checkpoint as safetensors weights plus JSON (architecture, tokenizer, preprocessing).

The command lives in `captioner/cli/export.py`: `python -m captioner.cli.export`
runs it from any folder.
"""

import sys

from captioner.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
