"""The benchmark must not rot: its no-Ray parts run on tiny sizes. No Ray, well under 10 s."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import scale  # noqa: E402  (importable once ROOT is on sys.path)


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
    for stage in (
        "validate-graph",
        "place-actors",
        "assign-channels",
        "lower-comm",
        "schedule-ops",
        "codegen",
    ):
        assert t[stage] >= 0.0
    assert t["total"] >= t["codegen"]


def test_sweep_table_and_json():
    res = scale.run(sizes=(2, 4), shapes=("chain", "pipeline"), ops_per_actor=2)
    json.dumps(res)  # the bench writes it into its JSON report
    text = scale.table(res)
    assert "chain" in text and "pipeline" in text and "us/op" in text
    assert res["target_met"] is None  # no 1,000-actor size: not judged
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
    assert {
        "echo1",
        "chain2",
        "fanout2",
        "numpy1m",
        "throughput",
        "chain8",
        "compile",
        "idle_cpu",
    } <= names
    for c in cases.CASES.values():
        assert c.better in ("lower", "higher")
        assert c.pool in cases.POOLS
    c = cases.CASES["chain2"]
    assert c.met(100.0, 5.0) is True and c.met(100.0, 50.0) is False
    t = cases.CASES["throughput"]
    assert t.met(1000.0, 20000.0) is True and t.met(1000.0, 2000.0) is False
    idle = cases.CASES["idle_cpu"]
    assert idle.met(None, 0.5) is True and idle.met(50.0, 3.0) is False


def test_new_cases_are_registered():
    from benchmarks import cases

    ov = cases.CASES["overlap_cpu"]
    assert ov.pool == "torch" and ov.pool in cases.POOLS and ov.actors == 3
    labels = [r.label for r in ov.runs()]
    assert labels[:2] == ["ray", "dagc"] and "dagc_overlap" in labels
    runs = {r.label: r for r in ov.runs()}
    assert runs["dagc"].options == {"overlap_communication": False}
    assert runs["dagc_overlap"].options == {"overlap_communication": True}
    assert {"x_chain2", "x_fanout2", "x_tput"} <= set(cases.CLUSTER_CASES)
    assert not set(cases.CLUSTER_CASES) & set(cases.CASES)  # --cluster only
    for c in cases.CLUSTER_CASES.values():
        assert c.pool == "xnode" and c.pool in cases.POOLS


def _fake_round(r, p50, tput, **more):
    return {
        "round": r,
        "p50": p50,
        "p99": 2 * p50,
        "throughput": tput,
        "compile_s": 0.1,
        "started_idle": True,
        "checksum": 1.5,
        **more,
    }


def test_summary_and_table_with_variants():
    """bench.summarize / bench.table on made-up rounds (no Ray): variants, extra metrics."""
    from benchmarks import bench, cases

    case = cases.CASES["overlap_cpu"]
    rounds = {
        "ray": [_fake_round(r, 100.0, 10.0) for r in range(3)],
        "dagc": [_fake_round(r, 80.0, 12.0, transports=["comm", "shm"]) for r in range(3)],
        "dagc_overlap": [_fake_round(r, 40.0, 24.0) for r in range(3)],
        "ray_shm": [_fake_round(r, 50.0, 20.0) for r in range(2)]
        + [{"round": 2, "error": "RuntimeError: boom"}],
    }
    out = bench.summarize(case, rounds)
    json.dumps(out, default=str)
    assert out["ratio"] == 0.8 and out["met"] is True
    assert out["extra_metrics"][0]["ratio"] == 1.2
    ov = out["variants"]["dagc_overlap"]["metrics"]
    assert ov["p50"]["ratio_dagc_over_ray"] == 0.4
    assert ov["p50"]["speedup_vs_dagc"] == 2.0 and ov["throughput"]["speedup_vs_dagc"] == 2.0
    shm = out["variants"]["ray_shm"]
    assert shm["metrics"]["p50"]["ratio_dagc_over_ray"] == 80.0 / 50.0
    assert shm["errors"] == ["RuntimeError: boom"]
    assert out["checksum_ok"] is True and out["dagc_transports"] == ["comm", "shm"]
    text = bench.table([out])
    assert "dagc overlap=True" in text and "speed-up" in text
    assert "ray_shm error: RuntimeError: boom" in text and "comm, shm" in text


def test_cluster_mode_arguments():
    from benchmarks import bench

    a = bench.parse_args(["--cluster", "--quick"])
    assert a.cluster and a.quick
    from benchmarks import cases

    assert [c.name for c in bench.select_cases("x_chain2", cases.CLUSTER_CASES)] == ["x_chain2"]
    with pytest.raises(SystemExit, match="--cluster case"):
        bench.select_cases("x_chain2")
