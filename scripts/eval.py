"""Score a checkpoint as papers do: python scripts/eval.py --ckpt PATH [key=value ...].

The command lives in `captioner/cli/eval.py`: `python -m captioner.cli.eval`
runs it from any folder.
"""

from captioner.cli.eval import main

if __name__ == "__main__":
    main()
