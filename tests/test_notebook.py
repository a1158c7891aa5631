from pathlib import Path

import nbformat
from nbclient import NotebookClient

from fedcomp.fl.engine import run_inline

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_compares_runs(fast_cfg, tmp_path, monkeypatch):
    for compressor in ("none", "topk"):
        run_inline(fast_cfg("num_rounds=3", f"compressor={compressor}"), tmp_path / "runs" / compressor)
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "metrics.jsonl").write_text("")  # an interrupted run: listed, skipped
    monkeypatch.setenv("FEDCOMP_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("FEDCOMP_REPORT_DIR", str(tmp_path / "report"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert (tmp_path / "report" / "report.png").stat().st_size > 1000
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "2 finished runs, 1 not finished" in printed and "compressor.up.name" in printed
