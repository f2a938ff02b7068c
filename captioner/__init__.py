"""captioner: a small, readable image captioner whose attention over the image you can see.

The package is its architecture, each layer a folder that imports only the layers below it
(`tests/test_layers.py` holds the rule):

- `core`: the captioner itself, torch only: model parts, generation, tokenizer, image
  preprocessing, the checkpoint format and its safety checks, the inference API
  (`captioner.core.inference.Captioner`).
- `data`, `metrics`, `viz` (each on `core` alone): DataModules and datasets; caption and
  grounding metrics; figures and the explorer page.
- `training` (on the three above): the LightningModule, evaluation, callbacks, Lightning's
  checkpoint plugin, resuming, and `train`/`evaluate`/`validate_data`.
- `tools`: benchmark suites, run comparison, the Hugging Face baseline, the demo app.
- `cli`: the command-line front door (`python -m captioner.cli.train`) and its configs.
"""

from typing import Any

from captioner._moved import install

install()  # the import paths of earlier versions (`captioner.inference`, ...) keep working


def __getattr__(name: str) -> Any:
    """`from captioner import Captioner`: the inference API, imported when first asked for."""
    if name in ("Captioner", "Caption"):
        from captioner.core import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
