"""examples/notebooks: stored without outputs, and each runs end to end on CPU (nbclient)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"capture_routing.ipynb", "replay_step.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel is a fresh process started in tmp_path: make the checkout importable there.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    probe = PROBES.get(path.name)
    if probe is not None:
        notebook.cells.append(nbformat.v4.new_code_cell(probe))
    client = nbclient.NotebookClient(
        notebook,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert images, "expected the notebook to draw at least one figure"
    # tqdm's bars (transformers' weight loading) are widgets: the notebooks extra has ipywidgets.
    streams = [o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [text for text in streams if "IProgress not found" in text]
    if probe is not None:
        (stream,) = notebook.cells[-1].outputs
        edges = json.loads(stream["text"])
        assert len(edges) == 2 and len(edges[0]) == 60 and edges[0] == edges[1], edges


# Code run after a notebook, printing one JSON line the test checks. replay_step: the two
# histograms (native routing, replayed) are drawn on the same bins, so bars compare one to one.
PROBES = {
    "replay_step.ipynb": (
        "import json\n"
        "print(json.dumps([[bar.get_x() for bar in ax.patches] for ax in axes]))"
    ),
}
