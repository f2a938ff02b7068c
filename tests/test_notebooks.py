"""The notebooks run top to bottom in a fresh kernel, as a new user runs them."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from captioner.core.checkpoint import load_checkpoint
from captioner.data.stored import recorded_datamodule
from tests.helpers import EXPERIMENTS, ROOT, compose_train

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# figures each notebook shows (PNG outputs), and animations (GIF outputs)
SHOWN = {
    "01_cross_attention_over_patches": (4, 1),
    "02_self_vs_cross_attention": (3, 0),
    "03_grounding": (3, 0),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the first notebook trains `experiment=shapes_tiny`; the others reuse it."""
    return tmp_path_factory.mktemp("notebooks") / "run" / "checkpoints" / "last.ckpt"


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def test_every_notebook_is_listed() -> None:
    assert [p.stem for p in NOTEBOOKS] == sorted(SHOWN)


def test_attention_supervision_in_the_text_is_what_the_experiments_use(tmp_path: Path) -> None:
    """A weight the notebooks' text gives is an experiment's own, or 0 (training without it)."""
    weights = {
        float(compose_train(f"experiment={e}", output_dir=tmp_path).model.attention_supervision)
        for e in EXPERIMENTS
    }
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
        stated = re.findall(r"attention_supervision\W{0,3}(\d+(?:\.\d+)?(?:e-?\d+)?)", text)
        assert {float(v) for v in stated} <= weights | {0.0}, path.stem


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_shows_its_figures_and_leaves_the_run_folder_alone(
    path: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)  # stored clean
    monkeypatch.setenv("CAPTIONER_CKPT", str(checkpoint))
    monkeypatch.setenv("CAPTIONER_OUT_DIR", str(tmp_path))
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )  # fmt: skip
    run = checkpoint.parents[1]  # the training run's folder, the checkpoint in it
    with client.setup_kernel():  # cell by cell: `client.execute()` would not stop after the first
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError, naming the cell
            if cell is code[0]:  # the checkpoint is there now, found or trained
                before = files_under(run)
    assert files_under(run) == before  # the notebook wrote its outputs elsewhere
    outputs = [out.get("data", {}) for cell in code for out in cell.outputs]
    shown = (sum("image/png" in o for o in outputs), sum("image/gif" in o for o in outputs))
    assert shown == SHOWN[path.stem]
    assert checkpoint.exists()
    if path.stem == "01_cross_attention_over_patches":  # captions set beside every reference
        world = recorded_datamodule(load_checkpoint(checkpoint)).world
        printed = "".join(out.get("text", "") for cell in code for out in cell.outputs)
        assert all(ref in printed for i in range(4) for ref in world.scene("test", i).captions)
