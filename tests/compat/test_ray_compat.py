"""Ray interop (issue 13): ray.get / await on dagc refs, dagc errors as Ray's exceptions,
``dagc.patch_ray()`` and its option mapping, DAGs compiled inside actors, the quickstart.

Ray's own test file is run by ``run_ray_suite.py`` (``test_ray_suite.py``); these are
dagc's tests of each piece, in the normal test run, on the shared Ray session.
"""

import asyncio
import os
import subprocess
import sys
import time
import warnings

import pytest

import dagc
from dagc import ray_compat as rc
from dagc import ray_options

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def ctx_defaults():
    """Ray's DAGContext as its defaults; put back afterwards."""
    from ray.dag import DAGContext

    c = DAGContext.get_current()
    saved = dict(vars(c))
    yield c
    for k, v in saved.items():
        setattr(c, k, v)


# -- option mapping (no actors) ------------------------------------------------------------


def test_map_options_defaults_follow_dag_context(ctx_defaults):
    ctx_defaults.buffer_size_bytes = 12345
    ctx_defaults.max_inflight_executions = 3
    ctx_defaults.get_timeout = 7
    ctx_defaults.teardown_timeout = 9
    ctx_defaults.read_iteration_timeout = 0.05
    opts, ray_side = rc.map_compile_options()
    assert opts == {
        "buffer_size": 12345,
        "max_inflight": 3,
        "get_timeout": 7.0,
        "teardown_timeout": 9.0,
        "_read_slice": 0.05,
        "overlap_communication": False,
        "communicator": "auto",
    }
    assert ray_side["enable_asyncio"] is False and ray_side["get_timeout"] == 7
    ctx_defaults.get_timeout = -1  # Ray: -1 waits forever
    assert rc.map_compile_options()[0]["get_timeout"] is None
    dagc.api.check_options(opts)  # every mapped option is a dagc option


def test_map_options_explicit_keywords(ctx_defaults):
    opts, ray_side = rc.map_compile_options(
        _buffer_size_bytes=4096,
        _max_inflight_executions=5,
        enable_asyncio=True,
        _overlap_gpu_communication=True,
        _default_communicator=None,
    )
    assert (
        opts["buffer_size"],
        opts["max_inflight"],
        opts["overlap_communication"],
        opts["communicator"],
    ) == (4096, 5, True, "auto")
    assert ray_side["enable_asyncio"] is True and ray_side["need_named_communicator"]
    with pytest.raises(TypeError, match="unexpected keyword"):
        rc.map_compile_options(_no_such_option=1)
    with pytest.raises(dagc.CompileError, match="dagc.Communicator"):
        rc.map_compile_options(_default_communicator=object())
    with pytest.raises(ValueError, match="'create', None or a Communicator"):
        rc.map_compile_options(_default_communicator="nccl")


def test_every_ray_keyword_is_accepted():
    """The patched experimental_compile has Ray 2.60's exact signature."""
    import inspect

    from ray.dag.dag_node import DAGNode

    ours = inspect.signature(rc._experimental_compile)
    rays = inspect.signature(rc._ORIGINAL or DAGNode.experimental_compile)
    assert list(ours.parameters) == list(rays.parameters)
    assert [p.default for p in ours.parameters.values()] == [
        p.default for p in rays.parameters.values()
    ]


def test_options_without_effect_warn_once(ctx_defaults, monkeypatch):
    for key in ("submit_timeout", "max_buffered_results", "deadlock"):
        ray_options._WARNED.discard(key)
    import ray.dag.constants as consts

    monkeypatch.setattr(consts, "RAY_CGRAPH_ENABLE_DETECT_DEADLOCK", False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rc.map_compile_options(_submit_timeout=5, _max_buffered_results=10)
        rc.map_compile_options(_submit_timeout=5, _max_buffered_results=10)
    texts = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert sum("_submit_timeout" in t and "no effect" in t for t in texts) == 1
    assert sum("_max_buffered_results" in t and "no effect" in t for t in texts) == 1
    assert sum("DETECT_DEADLOCK" in t for t in texts) == 1
    assert all(x.filename == __file__ for x in w)  # pointed at the caller's line


def test_ray_cgraph_environment_variables_are_honoured():
    """RAY_CGRAPH_* reach DAGContext's defaults when Ray's DAG module is first imported:
    a fresh interpreter sees them mapped with Ray's meaning."""
    env = dict(
        os.environ,
        RAY_CGRAPH_get_timeout="30",
        RAY_CGRAPH_buffer_size_bytes="2048",
        RAY_CGRAPH_max_inflight_executions="4",
        RAY_CGRAPH_teardown_timeout="3",
        RAY_CGRAPH_read_iteration_timeout_s="0.02",
        RAY_CGRAPH_overlap_gpu_communication="1",
    )
    code = (
        "from dagc import ray_compat as rc; o, r = rc.map_compile_options(); "
        "print(sorted(o.items()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(
        sorted(
            {
                "buffer_size": 2048,
                "max_inflight": 4,
                "get_timeout": 30.0,
                "teardown_timeout": 3.0,
                "_read_slice": 0.02,
                "overlap_communication": True,
                "communicator": "auto",
            }.items()
        )
    )


def test_patch_unpatch_and_context_manager():
    from ray.dag.dag_node import DAGNode

    original = DAGNode.experimental_compile
    env_before = os.environ.get("DAGC_PATCH_RAY")
    with dagc.patched_ray(workers=False):
        assert rc.is_patched() and DAGNode.experimental_compile is not original
        with dagc.patched_ray(workers=False):
            pass
        assert rc.is_patched()  # the inner block keeps the outer patch
    assert not rc.is_patched() and DAGNode.experimental_compile is original
    dagc.patch_ray(workers=False)
    dagc.patch_ray(workers=False)
    dagc.unpatch_ray()
    dagc.unpatch_ray()
    assert DAGNode.experimental_compile is original
    assert os.environ.get("DAGC_PATCH_RAY") == env_before


def test_patch_after_ray_init_warns_that_workers_are_not_reached(ray_session):
    ray_options._WARNED.discard("workers")
    with pytest.warns(RuntimeWarning, match="before ray.init"):
        with dagc.patched_ray():
            pass
    assert not rc.is_patched()


# -- end to end, on the shared Ray session --------------------------------------------------


def _actor_cls():
    import ray

    @ray.remote
    class CompatWorker:
        def inc(self, x):
            return x + 1

        def fail_if_even(self, x):
            if x % 2 == 0:
                raise ValueError(f"{x} is even")
            return x

        def sleep(self, x):
            time.sleep(x)
            return x

        @ray.method(num_returns=2)
        def pair(self, x):
            return x, x + 1

    return CompatWorker


@pytest.fixture(scope="module")
def pair(ray_session):
    cls = _actor_cls()
    ws = [cls.remote(), cls.remote()]
    ray_session.get([w.inc.remote(0) for w in ws])
    return ws


@pytest.fixture
def patched_ray(no_shm_leak):
    with dagc.patched_ray(workers=False):
        yield


@pytest.mark.timeout(120)
def test_ray_get_and_await_dagc_refs_without_the_patch(pair, no_shm_leak):
    """A plain dagc DagRef is a Ray CompiledDAGRef: Ray's own ray.get takes it."""
    import ray
    from ray.experimental.compiled_dag_ref import CompiledDAGRef

    a, b = pair
    with dagc.InputNode() as inp:
        dag = b.inc.bind(a.inc.bind(inp))
    with dagc.compile(dag) as cg:
        ref = cg.execute(1)
        assert isinstance(ref, CompiledDAGRef) and isinstance(ref, dagc.DagRef)
        assert ray.get(ref) == 3
        assert ray.get(ref, timeout=5) == 3  # dagc: fetch again, same value
        refs = [cg.execute(i) for i in range(4)]
        assert ray.get(refs, timeout=30) == [2, 3, 4, 5]
        assert ray.get(refs[::-1]) == [5, 4, 3, 2]
        with pytest.raises(ValueError, match="must be a list of CompiledDAGRefs"):
            ray.get([ref, ray.put(1)])

        async def main():
            return await cg.execute(10), await cg.execute_async(20)

        assert asyncio.run(main()) == (12, 22)


@pytest.mark.timeout(120)
def test_patched_compile_is_a_dagc_compiled_dag_with_rays_api(pair, patched_ray):
    import ray
    from ray.dag import InputNode, MultiOutputNode
    from ray.experimental.compiled_dag_ref import CompiledDAGRef

    a, b = pair
    with InputNode() as inp:
        dag = MultiOutputNode([a.inc.bind(inp), b.inc.bind(inp)])
    cdag = dag.experimental_compile()
    try:
        assert isinstance(cdag, dagc.CompiledDag) and isinstance(cdag, rc.RayCompiledDag)
        assert "a0" in str(cdag.schedule) and cdag.source("driver")  # dagc's API too
        refs = cdag.execute(1)
        assert len(refs) == 2 and all(isinstance(r, CompiledDAGRef) for r in refs)
        assert str(refs[1]) == (
            f"CompiledDAGRef({cdag.get_id()}, execution_index=0, channel_index=1)"
        )
        assert cdag._execution_index == 0
        assert ray.get(refs) == [2, 2]
        assert ray.get(refs[0], timeout=10) == 2
        assert ray.get(refs[0], timeout=-1) == 2  # Ray's -1: wait forever
        more = [cdag.execute(i) for i in range(3)]
        assert ray.get([r[0] for r in more]) == [1, 2, 3]
        assert dagc.get([r[1] for r in more]) == [1, 2, 3]
        with pytest.raises(ValueError, match="must be a list of CompiledDAGRefs"):
            ray.get([refs[0], None])
        with pytest.raises(ValueError, match="multiple times"):
            dag.experimental_compile()
    finally:
        cdag.teardown()
    assert cdag.is_teardown


@pytest.mark.timeout(120)
def test_task_error_is_ray_task_error_and_its_cause(pair, no_shm_leak):
    import ray
    from ray.dag import InputNode

    a, _ = pair
    with InputNode() as inp:
        dag = a.fail_if_even.bind(inp)
    for compile_ in (dagc.compile, lambda d: rc._experimental_compile(d)):
        cdag = compile_(dag)
        try:
            with pytest.raises(ray.exceptions.RayTaskError, match="2 is even") as ei:
                ray.get(cdag.execute(2))
            e = ei.value
            assert isinstance(e, ValueError) and isinstance(e, dagc.TaskError)
            assert e.function_name == "fail_if_even" and "2 is even" in e.traceback_str
            assert e.as_instanceof_cause() is e and isinstance(e.cause, ValueError)
            assert ray.get(cdag.execute(3)) == 3  # later executions still work
        finally:
            cdag.teardown()
        dag.is_cgraph_output_node = False


@pytest.mark.timeout(120)
def test_timeout_and_capacity_are_ray_errors(pair, patched_ray):
    import ray
    from ray.dag import InputNode

    a, _ = pair
    with InputNode() as inp:
        dag = a.sleep.bind(inp)
    cdag = dag.experimental_compile(_max_inflight_executions=2)
    try:
        r1 = cdag.execute(1.5)
        with pytest.raises(
            ray.exceptions.RayChannelTimeoutError, match="RAY_CGRAPH_get_timeout which is currently"
        ) as ei:
            ray.get(r1, timeout=0.1)
        assert isinstance(ei.value, TimeoutError)
        assert isinstance(ei.value, dagc.DagTimeoutError)
        r2 = cdag.execute(0)
        with pytest.raises(
            ray.exceptions.RayCgraphCapacityExceeded,
            match="can't have more than 2 in-flight executions, and you "
            "currently have 2 in-flight executions",
        ) as ci:
            cdag.execute(0)
        assert isinstance(ci.value, dagc.CapacityError)
        assert ray.get([r1, r2], timeout=30) == [1.5, 0]
    finally:
        cdag.teardown()


@pytest.mark.timeout(120)
def test_plain_dagc_errors_are_ray_exceptions(pair, no_shm_leak):
    import ray

    a, _ = pair
    with dagc.InputNode() as inp:
        dag = a.sleep.bind(inp)
    cg = dagc.compile(dag, max_inflight=1)
    r = cg.execute(0.5)
    with pytest.raises(ray.exceptions.RayChannelTimeoutError):
        r.get(timeout=0.05)
    with pytest.raises(ray.exceptions.RayCgraphCapacityExceeded):
        cg.execute(0)
    assert r.get(timeout=30) == 0.5
    cg.teardown()
    with pytest.raises(ray.exceptions.RayChannelError):
        cg.execute(0)  # after teardown: DagClosedError


@pytest.mark.timeout(180)
def test_dead_actor_is_ray_actor_died_error(ray_session, no_shm_leak):
    import ray

    cls = _actor_cls()
    a = cls.remote()
    ray.get(a.inc.remote(0))
    with dagc.InputNode() as inp:
        dag = a.sleep.bind(inp)
    cg = dagc.compile(dag)
    try:
        ref = cg.execute(30)
        ray.kill(a)
        t0 = time.monotonic()
        with pytest.raises(ray.exceptions.ActorDiedError) as ei:
            ray.get(ref, timeout=60)
        assert time.monotonic() - t0 < 30
        assert isinstance(ei.value, ray.exceptions.RayChannelError)
        assert isinstance(ei.value, dagc.ActorDiedError)
    finally:
        cg.teardown()


@pytest.mark.timeout(120)
def test_execute_async_awaits_twice(pair, patched_ray):
    from ray.dag import InputNode, MultiOutputNode

    a, b = pair
    with InputNode() as inp:
        dag = MultiOutputNode([a.inc.bind(inp), b.inc.bind(inp)])
    cdag = dag.experimental_compile(enable_asyncio=True)

    async def main():
        futs = await cdag.execute_async(5)
        assert str(futs[0]).startswith("CompiledDAGFuture(")
        assert await asyncio.gather(*futs) == [6, 6]
        ref = cdag.execute(7)  # a plain ref is awaitable too
        return await ref[1]

    try:
        assert asyncio.run(main()) == 8
    finally:
        cdag.teardown()


@pytest.mark.timeout(120)
def test_compile_errors_are_value_errors_with_rays_wording(pair, patched_ray):
    from ray.dag import InputNode, MultiOutputNode

    a, b = pair
    with InputNode() as inp:
        dag = a.inc.bind([inp])  # a DAG node inside a container
    with pytest.raises(
        ValueError,
        match=r"Found 1 DAGNodes from the arg .*? in .*?\.\s*"
        r"Please ensure that the argument is a single DAGNode",
    ) as ei:
        dag.experimental_compile()
    assert isinstance(ei.value, dagc.CompileError) and "argument 0 [0]" in str(ei.value)
    with pytest.raises(ValueError, match="multiple times"):
        dag.experimental_compile()
    with InputNode() as inp:
        dag = MultiOutputNode([a.inc.bind(inp[0]), b.inc.bind(inp)])
    with pytest.raises(
        ValueError,
        match=r"All tasks must either use InputNode\(\) "
        r"directly, or they must index",
    ):
        dag.experimental_compile()


@pytest.mark.timeout(120)
def test_execute_arity_errors_use_rays_wording(pair, patched_ray):
    from ray.dag import InputNode

    a, b = pair
    with InputNode() as inp:
        dag = b.sleep.bind(a.inc.bind(inp[0]))
    cdag = dag.experimental_compile()
    try:
        with pytest.raises(
            ValueError,
            match=r"dag.execute\(\) or dag.execute_async\(\) must "
            r"be called with 1 positional args, got 2",
        ):
            cdag.execute(1, 2)
    finally:
        cdag.teardown()
    with InputNode() as inp:
        dag = b.sleep.bind(a.inc.bind(inp.x))
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.ExecuteArgumentError, match="must be called with kwarg `x`"):
            cg.execute(y=1)


@pytest.mark.timeout(120)
def test_default_communicator_none_needs_named_communicators(pair, patched_ray):
    from ray.dag import InputNode

    a, b = pair
    with InputNode() as inp:
        dag = b.inc.bind(a.inc.bind(inp).with_tensor_transport())
    with pytest.raises(ValueError, match="_default_communicator=None"):
        dag.experimental_compile(_default_communicator=None)


@pytest.mark.timeout(120)
def test_visualize_has_rays_signature(pair, patched_ray, tmp_path, monkeypatch):
    from ray.dag import InputNode

    a, b = pair
    with InputNode() as inp:
        dag = b.inc.bind(a.inc.bind(inp))
    cdag = dag.experimental_compile()
    monkeypatch.chdir(tmp_path)
    try:
        text = cdag.visualize(format="ascii")
        assert "inc" in text
        with pytest.raises(ValueError, match="channel_details"):
            cdag.visualize(format="ascii", channel_details=True)
        dot = cdag.visualize(filename="g", format="dot")
        assert dot.startswith("digraph") and (tmp_path / "g").read_text() == dot
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no Graphviz 'dot': warns
            dot2 = cdag.visualize(channel_details=True)  # Ray's defaults: png
        assert dot2 == dot and (tmp_path / "compiled_graph").exists()
    finally:
        cdag.teardown()


@pytest.mark.timeout(120)
def test_teardown_kill_actors(ray_session, patched_ray):
    import ray
    from ray.dag import InputNode

    cls = _actor_cls()
    a = cls.remote()
    ray.get(a.inc.remote(0))
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    cdag = dag.experimental_compile()
    assert ray.get(cdag.execute(1)) == 2
    cdag.teardown(kill_actors=True)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.inc.remote(0), timeout=60)


# -- DAGs compiled inside actors, DAGC_PATCH_RAY=1, the quickstart (their own Ray) ---------

_INSIDE_ACTOR = """
import ray
from ray.dag import InputNode, MultiOutputNode

@ray.remote
class Worker:
    def add_one(self, x):
        return x + 1

@ray.remote
class Replica:
    def __init__(self):
        self.w = Worker.remote()
        with InputNode() as inp:
            dag = MultiOutputNode([self.w.add_one.bind(inp)])
        self.cdag = dag.experimental_compile()

    def call(self, x):
        return type(self.cdag).__module__, ray.get(self.cdag.execute(x))

    def close(self):
        self.cdag.teardown()

ray.init(address="local", num_cpus=4, include_dashboard=False)
with InputNode() as inp:
    dag = Worker.remote().add_one.bind(inp)
cdag = dag.experimental_compile()
print("driver", type(cdag).__module__, ray.get(cdag.execute(1)))
cdag.teardown()
r = Replica.remote()
print("actor", *ray.get(r.call.remote(2), timeout=120))
ray.get(r.close.remote(), timeout=60)
ray.shutdown()
"""


def _run_own_ray(args, tmp_path, env_extra=None, timeout=240):
    """Run a driver with a Ray of its own (RAY_ADDRESS=local; the current-cluster file
    of this test session's Ray put back afterwards)."""
    from tests.helpers import ray_address_file_kept

    env = dict(
        os.environ,
        RAY_ADDRESS="local",
        PYTHONPATH=REPO,
        RAY_USAGE_STATS_ENABLED="0",
        **(env_extra or {}),
    )
    env.pop("DAGC_PATCH_RAY", None)
    env.update(env_extra or {})
    with ray_address_file_kept():
        return subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
        )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_patch_reaches_dags_compiled_inside_actors(tmp_path):
    """``python -m dagc.ray_compat PROGRAM`` (DAGC_PATCH_RAY=1): a program that never
    imports dagc compiles with dagc, in the driver and - through the worker setup hook
    the patch adds at ray.init - inside its actors."""
    prog = tmp_path / "prog.py"
    prog.write_text(_INSIDE_ACTOR)
    out = _run_own_ray([sys.executable, "-m", "dagc.ray_compat", str(prog)], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("driver", "actor"))]
    assert lines == ["driver dagc.ray_graph 2", "actor dagc.ray_graph [3]"], out.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_quickstart_example_runs(tmp_path):
    """examples/ray_quickstart.py: Ray's documented quickstart plus one patch_ray() line."""
    out = _run_own_ray(
        [sys.executable, os.path.join(REPO, "examples", "ray_quickstart.py")], tmp_path
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "compiled with dagc" in out.stdout, out.stdout
