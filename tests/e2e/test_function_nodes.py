"""Function nodes (``f.bind()`` of ``@ray.remote`` functions) compiled and run: each on an
actor dagc creates with the function's options and kills with the DAG (teardown, garbage
collection, a failed compile), alone or mixed with actor methods, through ``dagc.compile``
and under ``dagc.patch_ray()``."""

import gc
import time

import numpy as np
import pytest
import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import dagc
from dagc.runtime.actor import function_host


@ray.remote
def load(n):
    return np.arange(n, dtype=np.float64)


@ray.remote
def double(a):
    return a * 2


@ray.remote
def total(a, *more):
    return float(a.sum()) + sum(float(m.sum()) for m in more)


@ray.remote
def plus(x, y=0):
    return x + y


@ray.remote
def checked(x):
    if x == 3:
        raise ValueError(f"bad input {x}")
    return x


@ray.remote
def resources(x):
    ctx = ray.get_runtime_context()
    return x, ctx.get_assigned_resources(), ctx.get_placement_group_id(), ctx.get_actor_id()


def _hosts(cg) -> list:
    """The actors the DAG created for its function nodes."""
    return [h for h in cg._side.handles.values() if h in cg._side.owned]


def _dead(handles, timeout=30.0) -> bool:
    """Whether every actor is dead (ray.kill is asynchronous: polled)."""
    deadline = time.monotonic() + timeout
    for h in handles:
        while True:
            try:
                ray.get(h.__ray_ready__.remote(), timeout=5)
            except RayActorError:
                break
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    return True


def test_pure_function_chain(ray_session):
    with InputNode() as inp:
        dag = total.bind(double.bind(load.bind(inp)))
    with dagc.compile(dag, max_inflight=4) as cg:
        refs = [cg.execute(n) for n in (3, 10, 100)]
        assert [r.get(timeout=60) for r in refs] == [6.0, 90.0, 9900.0]
        table = str(cg.schedule)
        for label in ("a0:load", "a1:double", "a2:total"):
            assert label in table
        assert "test_function_nodes.py" in cg.source("a1:double")  # the function's place
        assert " double" in cg.source("a1:double")
        hosts = _hosts(cg)
        assert len(hosts) == 3
    assert _dead(hosts)


def test_mixed_graph_function_method_function(ray_session, workers):
    w = workers[0]
    with InputNode() as inp:
        x = plus.bind(inp, y=1)  # function
        s = w.scale.bind(x, factor=10)  # actor method
        dag = MultiOutputNode([plus.bind(s, y=x), plus.bind(x)])  # functions
    with dagc.compile(dag) as cg:
        assert [cg.execute(i).get(timeout=60) for i in range(3)] == [[11, 1], [22, 2], [33, 3]]
        assert "a1:Worker" in str(cg.schedule)
        assert len(_hosts(cg)) == 3
        hosts = _hosts(cg)
    assert _dead(hosts)
    assert ray.get(w.echo.remote(5), timeout=30) == 5  # the user's actor is left alone


def test_resource_options_are_the_actors(ray_session):
    pg = ray.util.placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    try:
        in_pg = PlacementGroupSchedulingStrategy(placement_group=pg)
        with InputNode() as inp:
            dag = MultiOutputNode(
                [
                    resources.bind(inp),  # no num_cpus: Ray's actor default, none held
                    resources.options(num_cpus=2, num_gpus=0, memory=50 * 2**20).bind(inp),
                    resources.options(num_cpus=1, scheduling_strategy=in_pg).bind(inp),
                ]
            )
        with dagc.compile(dag) as cg:
            plain, sized, placed = cg.execute(7).get(timeout=60)
            hosts = _hosts(cg)
        assert plain[0] == sized[0] == placed[0] == 7
        assert plain[1] == {}
        assert sized[1] == {"CPU": 2.0, "memory": 50.0 * 2**20}
        assert placed[1] == {"CPU": 1.0} and placed[2] == pg.id.hex()
        assert len({plain[3], sized[3], placed[3]}) == 3  # one actor per function node
        assert _dead(hosts)
    finally:
        ray.util.remove_placement_group(pg)


def test_a_functions_exception_is_that_executions_task_error(ray_session):
    with InputNode() as inp:
        dag = plus.bind(checked.bind(inp), y=1)
    with dagc.compile(dag) as cg:
        refs = [cg.execute(i) for i in (2, 3, 4)]
        assert refs[0].get(timeout=60) == 3
        with pytest.raises(dagc.TaskError, match="bad input 3") as ei:
            refs[1].get(timeout=60)
        assert isinstance(ei.value, ValueError)
        assert refs[2].get(timeout=60) == 5  # the DAG goes on


def test_a_dropped_dag_kills_its_function_actors(ray_session):
    with InputNode() as inp:
        dag = plus.bind(plus.bind(inp), y=2)
    cg = dagc.compile(dag)
    assert cg.execute(1).get(timeout=60) == 3
    hosts = _hosts(cg)
    del cg
    gc.collect()
    assert _dead(hosts)


class _Recording:
    """``ray.remote(FunctionHost)`` that records every actor it creates."""

    def __init__(self, cls, made):
        self._cls, self._made = cls, made

    def options(self, **kw):
        return _Recording(self._cls.options(**kw), self._made)

    def remote(self, *args):
        h = self._cls.remote(*args)
        self._made.append(h)
        return h


@pytest.fixture
def created(monkeypatch):
    """Every actor dagc creates for a function node during the test."""
    made = []
    host = function_host._host
    monkeypatch.setattr(function_host, "_host", lambda: _Recording(host(), made))
    return made


def test_a_function_that_cannot_be_placed_fails_the_compile_leaving_no_actor(ray_session, created):
    with InputNode() as inp:
        dag = plus.bind(plus.options(resources={"dagc_no_such_resource": 1}).bind(inp))
    with pytest.raises(dagc.CompileError, match=r"a0:plus.*not placed within 3 s") as ei:
        dagc.compile(dag, start_timeout=3)
    assert "dagc_no_such_resource" in str(ei.value)
    assert len(created) == 2
    assert _dead(created)


def test_a_compile_failing_after_the_actors_exist_kills_them(ray_session, created):
    with InputNode() as inp:
        dag = total.bind(load.bind(inp).with_tensor_transport(device="cuda"))
    with pytest.raises(dagc.CompileError, match="holds no GPU"):
        dagc.compile(dag)
    assert len(created) == 2
    assert _dead(created)


def test_under_patch_ray(ray_session, workers):
    w = workers[1]
    with InputNode() as inp:
        dag = MultiOutputNode([plus.bind(w.inc.bind(inp), y=100), total.bind(load.bind(inp))])
    with dagc.patched_ray(workers=False):
        cdag = dag.experimental_compile()
        try:
            refs = cdag.execute(4)
            assert ray.get(refs, timeout=60) == [105, 6.0]
            hosts = _hosts(cdag)
            assert len(hosts) == 3
        finally:
            cdag.teardown()
    assert _dead(hosts)


def test_big_values_between_functions(ray_session):
    n = 1 << 19  # 4 MiB of float64, several slots' worth
    with InputNode() as inp:
        dag = total.bind(double.bind(load.bind(inp)), load.bind(inp))
    with dagc.compile(dag, max_inflight=2) as cg:
        for k in range(3):
            m = n + k
            assert cg.execute(m).get(timeout=60) == 3.0 * m * (m - 1) / 2


def test_probe_before_load_places_function_actors_on_the_drivers_node(ray_session, workers):
    """What ``dagc compile --lower-only`` sees: no actor is created for a function node; it
    is taken to run on the driver's node with the GPUs it asks for, located at the function."""
    with InputNode() as inp:
        dag = plus.options(num_gpus=1).bind(workers[0].inc.bind(inp))
    traced = dagc.trace(dag)
    probes, placement = dagc.stages.probe(traced, timeout=60)
    assert set(probes) == {"a0"}  # only the user's actor was asked
    place = placement.of("a1")
    assert place.node == placement.driver_node and place.gpus == (0,)
    line = plus._function.__code__.co_firstlineno  # as the probe locates methods
    assert place.methods["plus"].endswith(f"test_function_nodes.py:{line} plus")


def test_the_function_etl_example(ray_session):
    """examples/function_etl.py, loaded as ``dagc compile`` loads a DAG file; its results
    are the functions' own, computed here."""
    import sys
    from pathlib import Path

    from dagc.cli import load_file

    path = Path(__file__).resolve().parents[2] / "examples" / "function_etl.py"
    key = "dagc_test_example_function_etl"
    if key not in sys.modules:
        load_file(str(path), key)
    m = sys.modules[key]
    with dagc.compile(m.build()) as cg:
        (rep, score), _ = dagc.get([cg.execute(3), cg.execute(4)], timeout=120)
    table = m.extract._function(3)
    s, mag = m.spread._function(table), m.magnitude._function(table)
    assert score == pytest.approx(float(np.mean(s * mag)))
    assert rep == m.report._function(3, score, mag)


def test_trace_lower_load_creates_the_actors_at_load_only(ray_session, created):
    with InputNode() as inp:
        dag = plus.bind(inp, y=5)
    lowered = dagc.trace(dag).lower()
    assert "a0:plus" in lowered.as_text() and not created  # nothing made before load
    with lowered.load() as cg:
        assert cg.execute(1).get(timeout=60) == 6
        assert len(created) == 1
    with lowered.load() as cg2:  # each load owns actors of its own
        assert cg2.execute(2).get(timeout=60) == 7
    assert len(created) == 2 and created[0] != created[1]
    assert _dead(created)
