import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from fedcomp.fl.engine import run_inline

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_on_a_tiny_run(fast_cfg, tmp_path, monkeypatch):
    run_inline(fast_cfg("num_rounds=3"), tmp_path)
    monkeypatch.setenv("FEDCOMP_RUN_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "3 rounds" in printed
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 3
