"""The stages on real actors: trace -> lower -> load is compile; lowering touches no actor;
load re-lowers for where the actors really run; the probe's method locations."""

import inspect
import os
import threading

import dagc
from dagc import InputNode, Placement
from tests.e2e import actors


def _chain(a, b):
    with InputNode() as inp:
        return b.scale.bind(a.inc.bind(inp), factor=2)


def _loop_threads(ray, hs) -> list:
    def names(instance):
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("dagc-loop"))

    return ray.get([h.__ray_call__.remote(names) for h in hs], timeout=30)


def test_trace_lower_load_is_compile(ray_session, workers):
    a, b = workers[:2]
    traced = dagc.trace(_chain(a, b))
    assert traced.actor_ids == ("a0", "a1")
    lowered = traced.lower(max_inflight=4)
    assert not any(_loop_threads(ray_session, [a, b]))  # lowering touched no actor
    assert "tcp" not in lowered.as_text()
    with lowered.load() as staged:
        assert staged.execute(1).get(timeout=30) == 4
        staged_sources, staged_schedule = staged.sources(), staged.schedule
    with dagc.compile(_chain(a, b), max_inflight=4) as cg:
        assert cg.execute(1).get(timeout=30) == 4
        assert cg.sources() == staged_sources
        assert cg.schedule == staged_schedule
        assert cg.source(b) == staged_sources["a1"]


def test_load_of_a_what_if_lowering_relowers_for_the_real_placement(ray_session, workers):
    a, b = workers[:2]
    traced = dagc.trace(_chain(a, b))
    what_if = traced.lower(placement=Placement.spread(traced.actor_ids, nodes=2))
    assert "tcp" in {c.transport for c in what_if.ir.channels}
    with what_if.load() as cg:  # one real node: shared memory
        assert {c.transport for c in cg._ir.channels} == {"shm"}
        assert [cg.execute(i).get(timeout=30) for i in range(3)] == [2, 4, 6]
    assert "tcp" in {c.transport for c in what_if.ir.channels}  # the Lowered is unchanged


def test_probe_reports_where_the_bound_methods_are(ray_session, workers):
    from dagc.stages import probe

    a, b = workers[:2]
    probes, placement = probe(dagc.trace(_chain(a, b)))
    assert set(probes) == {"a0", "a1"} and placement.driver_node
    path = os.path.relpath(inspect.getsourcefile(actors))
    line = inspect.getsourcelines(actors.Worker.__ray_actor_class__.scale)[1]
    assert dict(placement.of("a1").methods) == {"scale": f"{path}:{line} Worker.scale"}
    assert set(placement.of("a0").methods) == {"inc"}
    assert probes["a0"].pid != os.getpid() and not probes["a0"].busy


# -- the command line: dagc compile PIPELINE.py --lower-only ---------------------------------
def test_cli_lower_only_writes_the_artifacts_compile_would(tmp_path):
    from tests.e2e.test_cli import run_cli

    low, full = tmp_path / "low", tmp_path / "full"
    r = run_cli("compile", "examples/pipeline.py", "--lower-only", "-o", str(low))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokenize t0" in r.stdout and "no loops started" in r.stdout
    assert "p50" not in r.stdout
    names = sorted(p.name for p in low.iterdir())
    for want in [
        "schedule.txt",
        "schedule.json",
        "schedule.csv",
        "graph.dot",
        "driver.py",
        "a0.py",
    ]:
        assert want in names, names
    assert "trace.json" not in names
    r = run_cli("compile", "examples/pipeline.py", "-o", str(full))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in names:  # lowered for the same placement: the same bytes
        assert (low / name).read_bytes() == (full / name).read_bytes(), name


def test_cli_lower_only_json_and_refusals(tmp_path):
    import json

    from tests.e2e.test_cli import run_cli

    r = run_cli("compile", "examples/pipeline.py", "--lower-only", "--format", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)
    assert data["schedule"]["actors"] and "passes" in data["timings_s"]
    r = run_cli("compile", "examples/pipeline.py", "--lower-only", "--run", "3", timeout=60)
    assert r.returncode == 2 and "--lower-only" in r.stderr and "Traceback" not in r.stderr
