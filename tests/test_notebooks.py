"""The notebooks run top to bottom in a fresh kernel, as a new user runs them."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
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


def test_every_notebook_is_listed() -> None:
    assert [p.stem for p in NOTEBOOKS] == sorted(SHOWN)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_its_figures(
    path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)  # stored clean
    monkeypatch.setenv("CAPTIONER_CKPT", str(checkpoint))
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )  # fmt: skip
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [out.get("data", {}) for cell in code for out in cell.outputs]
    shown = (sum("image/png" in o for o in outputs), sum("image/gif" in o for o in outputs))
    assert shown == SHOWN[path.stem]
    assert checkpoint.exists()
