"""Inspection on a live compiled DAG: visualize, html, profile, dump, the notebook."""

import json
import os
from pathlib import Path

import pytest

import dagc
from dagc import InputNode, MultiOutputNode

ROOT = Path(__file__).resolve().parents[2]


def test_visualize_html_profile_dump(workers, tmp_path):
    a, b, c = workers[:3]
    with InputNode() as inp:
        x = a.inc.bind(inp)
        dag = MultiOutputNode([c.add.bind(x, b.inc.bind(x)), x])
    with dagc.compile(dag) as cg:
        text = cg.visualize("ascii")
        assert "a0:Worker.inc" in text
        assert cg.visualize("dot").startswith("digraph")
        html = cg._repr_html_()
        assert "<table" in html and "a1:Worker" in html
        assert "<table" in cg.schedule._repr_html_()
        prof = cg.profile(50, 3)
        assert set(prof.records) == {"driver", "a0", "a1", "a2"}
        assert len(prof.records["a0"]) >= 50 * 3
        s = str(prof)
        assert "critical path" in s and "inc" in s
        # the loops are back to the unprofiled variant and still correct
        assert cg.execute(3).get(timeout=10) == [4 + 5, 4]
        cg.dump(tmp_path)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert {"trace.json", "schedule.json", "graph.dot", "a0.py", "driver.py"} <= set(names)
        events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
        assert any(e.get("name") == "inc" for e in events)


def test_source_by_name_and_errors(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    with dagc.compile(dag) as cg:
        assert cg.source("a0") == cg.source("a0:Worker") == cg.source(a)
        with pytest.raises(KeyError):
            cg.source("a9")
        with pytest.raises(ValueError):
            cg.visualize("bmp")


def test_same_dag_compiled_twice_gives_identical_artifacts(workers, tmp_path):
    a, b = workers[:2]
    outs = []
    for k in range(2):
        with InputNode() as inp:
            dag = b.inc.bind(a.inc.bind(inp))
        d = tmp_path / str(k)
        with dagc.compile(dag, output_dir=str(d)):
            pass
        outs.append({p.name: p.read_bytes() for p in d.iterdir()})
    assert outs[0] == outs[1]


@pytest.mark.timeout(300)
def test_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    env_before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"  # the kernel's ray.init() starts its own Ray
    try:
        client = nbclient.NotebookClient(
            nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = env_before
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("text/html" in o.get("data", {}) for o in outputs)
