"""Scan a dataset for bad entries: python scripts/validate_data.py data=NAME [data.key=value ...].

The command lives in `captioner/cli/validate_data.py`: `python -m captioner.cli.validate_data`
runs it from any folder.
"""

from captioner.cli.validate_data import main

if __name__ == "__main__":
    main()
