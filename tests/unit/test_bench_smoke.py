"""The benchmark must not rot: its no-Ray parts run on tiny sizes. No Ray, well under 10 s."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import scale  # noqa: E402


@pytest.mark.parametrize("shape", scale.SHAPES)
def test_synthetic_dags_are_valid_ir(shape):
    ir = scale.make_dag(shape, 3, 4)
    ir.verify()
    assert len(ir.graph) == 12
    assert {op.actor for op in ir.ops()} == {"a0", "a1", "a2"}
    assert all(sum(op.actor == a for op in ir.ops()) == 4 for a in ("a0", "a1", "a2"))


@pytest.mark.parametrize("shape", scale.SHAPES)
def test_compile_pipeline_runs_on_every_shape(shape):
    ir, mods, t = scale.compile_ir(scale.make_dag(shape, 3, 2))
    assert ir.schedule is not None
    assert set(mods) == {"driver", "a0", "a1", "a2"}
    for stage in ("validate", "place", "channels", "lower-comm", "schedule", "codegen"):
        assert t[stage] >= 0.0
    assert t["total"] >= t["codegen"]


def test_sweep_table_and_json():
    res = scale.run(sizes=(2, 4), shapes=("chain", "pipeline"), ops_per_actor=2)
    json.dumps(res)                      # the bench writes it into its JSON report
    text = scale.table(res)
    assert "chain" in text and "pipeline" in text and "us/op" in text
    assert res["target_met"] is None     # no 1,000-actor size: not judged
    rows = res["shapes"]["chain"]
    assert [r["actors"] for r in rows] == [2, 4]
    assert "growth_vs_nlogn" in rows[1]


def test_sweep_skips_sizes_over_budget():
    res = scale.run(sizes=(2, 4, 100000), shapes=("chain",), ops_per_actor=2, budget_s=1e-9)
    last = res["shapes"]["chain"][-1]
    assert "skipped" in last and last["actors"] == 100000


def test_case_registry_is_complete():
    # importing the cases needs numpy and Ray's DAG classes only when a DAG is built
    from benchmarks import cases
    names = set(cases.CASES)
    assert {"echo1", "chain2", "fanout2", "numpy1m", "throughput", "chain8", "compile",
            "idle_cpu"} <= names
    for c in cases.CASES.values():
        assert c.better in ("lower", "higher")
        assert c.pool in cases.POOLS
    c = cases.CASES["chain2"]
    assert c.met(100.0, 5.0) is True and c.met(100.0, 50.0) is False
    t = cases.CASES["throughput"]
    assert t.met(1000.0, 20000.0) is True and t.met(1000.0, 2000.0) is False
    idle = cases.CASES["idle_cpu"]
    assert idle.met(None, 0.5) is True and idle.met(50.0, 3.0) is False
