"""Ray's words where Ray code matches on them (issue 22, part 3).

Code written for Ray Compiled Graph matches on the first sentence of Ray's messages
(``pytest.raises(..., match=...)``, log filters, retry rules). dagc's messages start with
Ray's sentence and go on with dagc's detail: under ``dagc.compile`` and under
``dagc.patch_ray()`` alike. Each case here is matched with Ray's exact sentence.
"""

import re
import time

import pytest

import dagc

RAY_DIED = "The actor died unexpectedly before finishing this task."
RAY_CLOSED = "Channel closed."
RAY_INPUTS = (
    "Compiled Graph expects input to be accessed using all of attributes 0, 1, 2, but 1 is "
    "unused. Ensure all input attributes are used and contribute to the computation of the "
    "Compiled Graph output."
)


def _cls():
    import ray

    @ray.remote
    class WordsWorker:
        def inc(self, x):
            return x + 1

        def add(self, x, y=0):
            return x + y

        def sleep(self, x):
            time.sleep(x)
            return x

    return WordsWorker


@pytest.fixture(scope="module")
def worker(ray_session):
    w = _cls().remote()
    ray_session.get(w.inc.remote(0))
    return w


@pytest.fixture(params=["dagc.compile", "patch_ray"])
def compile_(request, no_shm_leak):
    """How the DAG is compiled: dagc's own API, or Ray's under the patch."""
    if request.param == "dagc.compile":
        yield dagc.compile
        return
    with dagc.patched_ray(workers=False):
        yield lambda dag: dag.experimental_compile()


def test_ray_sentences_are_rays_own():
    """The sentences dagc starts with are the ones installed Ray itself uses."""
    import inspect

    from ray.dag import compiled_dag_node
    from ray.exceptions import ActorDiedError

    assert ActorDiedError.BASE_ERROR_MSG == RAY_DIED == dagc.errors.RAY_ACTOR_DIED
    assert dagc.errors.RAY_CHANNEL_CLOSED == RAY_CLOSED
    src = inspect.getsource(compiled_dag_node._check_unused_dag_input_attributes)
    assert "Compiled Graph expects input to be accessed " in src
    assert "Ensure all input attributes are used and contribute " in src


@pytest.mark.timeout(180)
def test_actor_died_mid_execution(ray_session, compile_):
    import ray
    from ray.dag import InputNode

    a = _cls().remote()
    ray.get(a.inc.remote(0))
    with InputNode() as inp:
        dag = a.sleep.bind(inp)
    cg = compile_(dag)
    try:
        assert ray.get(cg.execute(0), timeout=30) == 0
        ref = cg.execute(30)
        ray.kill(a)
        with pytest.raises(ray.exceptions.ActorDiedError, match=re.escape(RAY_DIED)) as ei:
            ray.get(ref, timeout=60)
        msg = str(ei.value)
        assert msg.startswith(RAY_DIED), msg
        assert "a0:WordsWorker died" in msg, msg  # dagc's detail follows Ray's sentence
        with pytest.raises(ray.exceptions.ActorDiedError, match=re.escape(RAY_DIED)):
            cg.execute(1)
    finally:
        cg.teardown()


@pytest.mark.timeout(120)
def test_channel_closed_after_teardown(worker, compile_):
    import ray
    from ray.dag import InputNode

    with InputNode() as inp:
        dag = worker.sleep.bind(inp)
    cg = compile_(dag)
    ref = cg.execute(0.5)
    cg.teardown()
    with pytest.raises(ray.exceptions.RayChannelError, match=re.escape(RAY_CLOSED)) as ei:
        cg.execute(1)
    assert str(ei.value).startswith(RAY_CLOSED) and "torn down" in str(ei.value)
    with pytest.raises(ray.exceptions.RayChannelError, match=re.escape(RAY_CLOSED)):
        ray.get(ref, timeout=30)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bound", [True, False], ids=["inp1-bound-to-a-leaf", "inp1-taken"])
def test_unused_input_attribute(worker, compile_, bound):
    """inp[0] and inp[2] reach the output, inp[1] does not: Ray's message, not a leaf-node
    error (bound to a method whose result goes nowhere) and not a silent compile (taken,
    never bound)."""
    import ray
    from ray.dag import InputNode, MultiOutputNode

    b = _cls().remote()
    ray.get(b.inc.remote(0))
    with InputNode() as inp:
        x, y, z = inp[0], inp[1], inp[2]
        dag = MultiOutputNode([worker.inc.bind(x), worker.inc.bind(z)])
        if bound:
            b.inc.bind(y)
    with pytest.raises(ValueError, match=re.escape(RAY_INPUTS)) as ei:
        compile_(dag)
    assert isinstance(ei.value, dagc.CompileError)
    assert "leaf" not in str(ei.value) and "inp[1]" in str(ei.value)


@pytest.mark.timeout(120)
def test_every_input_attribute_used_compiles(worker, compile_):
    import ray
    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        dag = MultiOutputNode([worker.inc.bind(inp[0]), worker.inc.bind(inp[1])])
    cg = compile_(dag)
    try:
        assert ray.get(cg.execute(1, 5), timeout=30) == [2, 6]
    finally:
        cg.teardown()


@pytest.mark.timeout(120)
def test_what_dagc_accepts_where_ray_refuses(worker, compile_, recwarn):
    """docs/ray_compat.md lists these: kwargs bound to DAG nodes and a DAG without an
    InputNode compile (Ray: ValueError / NotImplementedError); results buffered past
    ``_max_buffered_results`` are kept (Ray: RayCgraphCapacityExceeded)."""
    import ray
    from ray.dag import InputNode

    with InputNode() as inp:
        dag = worker.add.bind(inp, y=worker.inc.bind(inp))  # a DAG node as a kwarg
    cg = compile_(dag)
    try:
        assert ray.get(cg.execute(2), timeout=30) == 5
    finally:
        cg.teardown()
    cg = compile_(worker.inc.bind(41))  # no InputNode
    try:
        assert ray.get(cg.execute(), timeout=30) == 42
    finally:
        cg.teardown()
    with InputNode() as inp:
        dag = worker.inc.bind(inp)
    if compile_ is dagc.compile:
        cg = dagc.compile(dag, max_inflight=4)
    else:
        cg = dag.experimental_compile(_max_inflight_executions=4, _max_buffered_results=1)
    try:
        refs = [cg.execute(i) for i in range(4)]
        assert ray.get(refs[3], timeout=30) == 4  # 0..2 buffered: more than 1
        assert ray.get(refs[:3], timeout=30) == [1, 2, 3]
    finally:
        cg.teardown()


@pytest.mark.timeout(120)
def test_compiling_a_dag_twice(worker, no_shm_leak):
    """dagc.compile compiles the same DAG object again; under the patch,
    experimental_compile refuses it with Ray's words, as Ray's own tests expect."""
    import ray
    from ray.dag import InputNode

    with InputNode() as inp:
        dag = worker.inc.bind(inp)
    for _ in range(2):
        cg = dagc.compile(dag)
        try:
            assert ray.get(cg.execute(1), timeout=30) == 2
        finally:
            cg.teardown()
    with dagc.patched_ray(workers=False):
        with InputNode() as inp:
            dag = worker.inc.bind(inp)
        cg = dag.experimental_compile()
        cg.teardown()
        with pytest.raises(
            ValueError,
            match="It is not allowed to call `experimental_compile` "
            "on the same DAG object multiple times",
        ):
            dag.experimental_compile()
        # a branch of a compiled MultiOutputNode: Ray's walk finds two compiled outputs
        from ray.dag import MultiOutputNode

        other = _cls().remote()
        with InputNode() as inp:
            branch1, branch2 = worker.inc.bind(inp), other.inc.bind(inp)
            dag = MultiOutputNode([branch1, branch2])
        dag.experimental_compile().teardown()
        with pytest.raises(
            ValueError,
            match="The DAG was compiled more than once. The following two nodes call "
            "`experimental_compile`: ",
        ):
            branch2.experimental_compile()
        ray.kill(other)


@pytest.mark.timeout(120)
def test_refs_under_the_patch_follow_rays_rules(worker, no_shm_leak):
    """A ref of experimental_compile's DAG is not copied, deep-copied or pickled, and is
    no task argument, with Ray's words, where Ray's messages name Ray's class; get()
    may be called again (docs/ray_compat.md: what dagc accepts where Ray refuses)."""
    import copy
    import pickle

    import ray
    from ray.dag import InputNode

    @ray.remote
    def f(x):
        return x

    with dagc.patched_ray(workers=False):
        with InputNode() as inp:
            dag = worker.inc.bind(inp)
        cg = dag.experimental_compile()
    try:
        ref = cg.execute(1)
        ray_cls = "<class 'ray.experimental.compiled_dag_ref.CompiledDAGRef'>"
        with pytest.raises(TypeError, match=re.escape(f"ray.ObjectRefGenerator, got {ray_cls}")):
            ray.wait(ref)
        with pytest.raises(TypeError, match=re.escape(f"got list containing {ray_cls}")):
            ray.wait([ref])
        with pytest.raises(TypeError, match="was found to be non-serializable"):
            ray.put([ref])
        with pytest.raises(ValueError, match=r"CompiledDAGRef cannot be copied\."):
            copy.copy(ref)
        with pytest.raises(ValueError, match=r"CompiledDAGRef cannot be deep copied\."):
            copy.deepcopy(ref)
        with pytest.raises(ValueError, match=r"CompiledDAGRef cannot be pickled\."):
            pickle.dumps(ref)
        for call in (f.remote, worker.inc.remote):
            with pytest.raises(TypeError, match="cannot be used as Ray task/actor argument"):
                call(ref)
        assert ray.get(ref, timeout=30) == 2
        assert ray.get(ref, timeout=30) == 2  # Ray: ValueError, called once only
        fut_cls = "<class 'ray.experimental.compiled_dag_ref.CompiledDAGFuture'>"
        assert repr(dagc.ray_graph.RayDagFuture) == fut_cls  # execute_async's futures
    finally:
        cg.teardown()
