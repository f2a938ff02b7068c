"""Import paths of earlier versions, kept working: each names the module that now holds it.

Code, notebooks and configs written for an earlier layout (`captioner.inference`,
`captioner.models.config`, `_target_: captioner.lit_module.CaptionerLitModule`) import the
same module objects as the new paths, so classes stay identical whichever path found them. An
old module whose contents now live in two places resolves its names in both, in order,
importing the second only when a name is not in the first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

# old path -> where it lives now; an old package covers its submodules too
MOVED: dict[str, tuple[str, ...]] = {
    "captioner.errors": ("captioner.core.errors",),
    "captioner.values": ("captioner.core.values",),
    "captioner.seeding": ("captioner.core.seeding",),
    "captioner.models": ("captioner.core.models",),
    "captioner.generation": ("captioner.core.generation",),
    "captioner.inference": ("captioner.core.inference",),
    "captioner.checkpoint": ("captioner.core.checkpoint", "captioner.training.checkpoint_io"),
    "captioner.data.tokenizer": ("captioner.core.tokenizer",),
    "captioner.data.transforms": ("captioner.core.images", "captioner.data.augment"),
    "captioner.data.vocab_cache": ("captioner.data.cache",),
    "captioner.lit_module": ("captioner.training.lit_module",),
    "captioner.loss": ("captioner.training.loss",),
    "captioner.scst": ("captioner.training.scst",),
    "captioner.evaluation": ("captioner.training.evaluation",),
    "captioner.callbacks": ("captioner.training.callbacks",),
    "captioner.card": ("captioner.training.card",),
    "captioner.tasks": ("captioner.training.tasks", "captioner.cli.config"),
    "captioner.demo": ("captioner.tools.demo",),
}


def _targets(name: str) -> tuple[str, ...] | None:
    """Where the module an old path names lives now (a submodule of a moved package too)."""
    for old, new in MOVED.items():
        if name == old:
            return new
        if name.startswith(old + ".") and len(new) == 1:
            return (new[0] + name[len(old) :],)
    return None


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads the module that now holds it under that name too."""

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}  # the real spec of each module found under an old path

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if _targets(name) is None:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = _targets(spec.name)
        assert targets is not None
        if len(targets) == 1:
            module = importlib.import_module(targets[0])
            self._specs[spec.name] = module.__spec__  # put back once the import system set ours
            return module
        return _merged(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        real = self._specs.pop(getattr(module.__spec__, "name", ""), None)
        if real is not None:
            module.__spec__ = real


def _merged(name: str, targets: tuple[str, ...]) -> types.ModuleType:
    """A module whose names are those of `targets`, each imported when first needed."""
    module = types.ModuleType(name, f"Moved: its names live in {', '.join(targets)}.")

    def lookup(attribute: str) -> Any:
        for target in targets:
            found = importlib.import_module(target)
            if hasattr(found, attribute):
                return getattr(found, attribute)
        raise AttributeError(f"module {name!r} has no attribute {attribute!r}")

    module.__getattr__ = lookup  # type: ignore[method-assign]
    return module


def install() -> None:
    """Make the old paths importable (once per process). First in line: a submodule of a moved
    package (`captioner.models.config`) must resolve to the module already loaded, never be
    found again on disk through its parent's folder."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
