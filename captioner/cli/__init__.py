"""The command-line front door: one module per command (`python -m captioner.cli.train`, or
`python scripts/train.py` from a checkout), the Hydra configs (`conf/`), and what the commands
share (`app`: checking a command line before any work; `console`: one-line errors, progress
bars, the metrics table). A command imports torch only once its arguments are read."""
