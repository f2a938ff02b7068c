"""The package's layers hold: the core and the inference API load no training, data or plotting
stack, each layer imports only the layers below it, and the import paths of earlier versions
still find the same objects."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# what the core must never load: the training and configuration stack, data loading, plotting
HEAVY = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "webdataset", "matplotlib")
# which of the package's layers each may import (the core: none but itself)
LAYERS = {
    "core": set(),
    "data": {"core"},
    "metrics": {"core"},
    "viz": {"core"},
    "training": {"core", "data", "metrics", "viz"},
    "tools": {"core", "data", "metrics", "viz", "training"},
    "cli": {"core", "data", "metrics", "viz", "training", "tools"},
}


def loaded_by(code: str) -> list[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    report = "; import json, sys; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code + report], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.splitlines()[-1])


def forbidden(modules: list[str]) -> list[str]:
    """The modules of `HEAVY`, and the package's layers above the core, among `modules`."""
    above = [f"captioner.{layer}" for layer in LAYERS if layer != "core"]
    return [
        m
        for m in modules
        if m.split(".")[0] in HEAVY or any(m == a or m.startswith(f"{a}.") for a in above)
    ]


@pytest.mark.parametrize(
    "code",
    [
        "from captioner.inference import Captioner",  # the public API, by its documented path
        "from captioner import Captioner",
        "import captioner.core.inference, captioner.core.checkpoint, captioner.core.generation",
        "from captioner.core.checkpoint import export, load_checkpoint, read_torch_checkpoint",
        "import captioner.models, captioner.checkpoint",  # earlier paths to core modules
    ],
)
def test_the_core_and_the_inference_api_load_no_training_data_or_plotting(code: str) -> None:
    modules = loaded_by(code)
    assert "torch" in modules and "captioner.core.models" in modules  # it did load the core
    assert forbidden(modules) == []


@pytest.mark.slow
def test_the_rule_would_catch_a_core_that_loads_the_training_stack() -> None:
    """The check above is not vacuous: a module of the layers above, or the training stack,
    loaded beside the core is found."""
    assert "lightning" in forbidden(loaded_by("import captioner.core.inference, lightning"))
    assert forbidden(loaded_by("import captioner.data.shapes"))  # the data package, Lightning


def _imported_layers(path: str) -> set[str]:
    """The layers of the package a module's source imports, at any depth of the file (a lazy
    import inside a function is an arrow too)."""
    tree = ast.parse((ROOT / path).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {
        name.split(".")[1] for name in names if name.startswith("captioner.") and name.count(".")
    }


@pytest.mark.parametrize("layer", list(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = {}
    for path in sorted((ROOT / "captioner" / layer).rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        above = _imported_layers(relative) - LAYERS[layer] - {layer}
        if above:
            wrong[relative] = sorted(above)
    assert wrong == {}, f"imports from layers above: {wrong}"


def test_the_package_is_its_layers() -> None:
    """Every module of the package lives in a layer, but the package's own `__init__` and the
    table of moved import paths."""
    top = sorted(p.name for p in (ROOT / "captioner").iterdir() if p.name != "__pycache__")
    assert top == ["__init__.py", "_moved.py", *sorted(LAYERS)]


def test_earlier_import_paths_find_the_same_objects() -> None:
    """Code, notebooks and checkpointed configs of earlier versions name these paths."""
    import captioner.checkpoint
    import captioner.data.transforms
    import captioner.inference
    import captioner.lit_module
    import captioner.models.config
    import captioner.tasks

    import captioner.core.checkpoint
    import captioner.core.models.config
    from captioner.core.images import ImagePreprocess
    from captioner.core.inference import Captioner
    from captioner.data.augment import TrainAugment
    from captioner.training.checkpoint_io import SafeCheckpointIO
    from captioner.training.lit_module import CaptionerLitModule
    from captioner.training.tasks import train

    assert captioner.inference.Captioner is Captioner
    assert captioner.models.config is captioner.core.models.config  # one module, not a copy
    assert captioner.models.config.__spec__.name == "captioner.core.models.config"
    assert captioner.checkpoint.SafeCheckpointIO is SafeCheckpointIO
    assert captioner.checkpoint.load_checkpoint is captioner.core.checkpoint.load_checkpoint
    assert captioner.data.transforms.ImagePreprocess is ImagePreprocess
    assert captioner.data.transforms.TrainAugment is TrainAugment
    assert captioner.lit_module.CaptionerLitModule is CaptionerLitModule
    assert captioner.tasks.train is train and callable(captioner.tasks.compose_config)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        captioner.checkpoint.nothing  # noqa: B018


@pytest.mark.parametrize(
    "target",
    [
        "captioner.lit_module.CaptionerLitModule",
        "captioner.lit_module.warmup_cosine_schedule",
        "captioner.checkpoint.SafeCheckpointIO",
        "captioner.callbacks.CheckpointOnSigterm",
        "captioner.callbacks.ModelSummary",
        "captioner.callbacks.progress_bar",
        "captioner.callbacks.AttentionSamples",
        "captioner.data.ShapesDataModule",
        "captioner.data.WebDataModule",
    ],
)
def test_targets_in_earlier_configs_still_resolve(target: str) -> None:
    """The `_target_` strings that run folders of earlier versions keep in `.hydra/config.yaml`."""
    from hydra.utils import get_object

    assert callable(get_object(target))
