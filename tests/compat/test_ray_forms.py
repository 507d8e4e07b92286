"""What Ray's DAG API builds, on dagc (issue 13): fail fast across a MultiOutputNode's
outputs, leaf nodes refused as Ray refuses them, ``with_tensor_transport(device=...)``
honoured, and forms dagc does not compile refused with a CompileError naming the node.
"""

import time

import pytest

import dagc
from dagc import ray_compat as rc


def _actor_cls():
    import ray

    @ray.remote
    class FormsWorker:
        def inc(self, x):
            return x + 1

        def fail_if_even(self, x):
            if x % 2 == 0:
                raise ValueError(f"{x} is even")
            return x

        def slow_if_even(self, x):
            if x % 2 == 0:
                time.sleep(3)
            return x

        def tensor(self, x):
            import torch

            return {"t": torch.full((2,), float(x)), "n": x}

        def where(self, v):
            return v["t"].device.type, float(v["t"][0]), v["n"]

        def two(self, x):
            return x, x + 1

    return FormsWorker


@pytest.fixture(scope="module")
def trio(ray_session):
    cls = _actor_cls()
    ws = [cls.remote() for _ in range(3)]
    ray_session.get([w.inc.remote(0) for w in ws])
    return ws


@pytest.fixture
def patched(no_shm_leak):
    with dagc.patched_ray(workers=False):
        yield


# -- fail fast -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_fail_fast_does_not_wait_for_slower_outputs(trio, no_shm_leak):
    """DESIGN "Fail fast": one failed output answers the execution; a 3 s branch is not
    waited for; later executions read through the late output and come back whole."""
    a, b, _ = trio
    with dagc.InputNode() as inp:
        dag = dagc.MultiOutputNode([b.slow_if_even.bind(inp), a.fail_if_even.bind(inp)])
    with dagc.compile(dag) as cg:
        assert cg.execute(1).get(timeout=30) == [1, 1]
        t0 = time.monotonic()
        ref = cg.execute(2)
        with pytest.raises(ValueError, match="2 is even") as ei:
            ref.get(timeout=30)
        assert time.monotonic() - t0 < 2.0, "get() waited for the slow branch"
        assert isinstance(ei.value, dagc.TaskError)
        with pytest.raises(ValueError, match="2 is even"):
            ref.get()  # again: the same error
        assert [cg.execute(i).get(timeout=30) for i in (3, 5)] == [[3, 3], [5, 5]]


@pytest.mark.timeout(120)
def test_fail_fast_with_rays_refs(trio, patched):
    """Ray's API: each output's ref raises at once when any output of its execution failed."""
    import ray
    from ray.dag import InputNode, MultiOutputNode

    a, b, _ = trio
    with InputNode() as inp:
        dag = MultiOutputNode([b.slow_if_even.bind(inp), a.fail_if_even.bind(inp)])
    cdag = dag.experimental_compile()
    try:
        t0 = time.monotonic()
        refs = cdag.execute(4)
        with pytest.raises(ray.exceptions.RayTaskError, match="4 is even"):
            ray.get(refs[0])  # the slow output's ref
        with pytest.raises(ValueError, match="4 is even"):
            ray.get(refs, timeout=30)
        assert time.monotonic() - t0 < 2.0
        assert ray.get(cdag.execute(7), timeout=30) == [7, 7]
    finally:
        cdag.teardown()


@pytest.mark.timeout(120)
def test_failed_executions_keep_their_place_until_read(trio, no_shm_leak):
    """Executions answered early count against max_inflight until their late outputs are
    read; execute() then makes room by reading them (never a ring fuller than its slots)."""
    a, b, _ = trio
    with dagc.InputNode() as inp:
        dag = dagc.MultiOutputNode([b.slow_if_even.bind(inp), a.fail_if_even.bind(inp)])
    with dagc.compile(dag, max_inflight=2) as cg:
        for x in (2, 4, 6):
            with pytest.raises(ValueError, match=f"{x} is even"):
                cg.execute(x).get(timeout=30)
        assert cg.execute(1).get(timeout=30) == [1, 1]


# -- leaf nodes ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_leaf_nodes_are_refused_with_rays_value_error(trio, no_shm_leak):
    """dagc refuses leaf nodes, as Ray does (a leaf would never run and its error never be
    seen), with Ray's ValueError wording; the CompileError names the leaf."""
    a, b, _ = trio
    with dagc.InputNode() as inp:
        out = a.inc.bind(inp)
        b.fail_if_even.bind(inp)  # reaches no output: a leaf
    with pytest.raises(ValueError, match="Compiled DAG doesn't support leaf nodes") as ei:
        dagc.compile(out)
    assert isinstance(ei.value, dagc.CompileError)
    assert "fail_if_even" in str(ei.value) and "There are 1 leaf nodes" in str(ei.value)


@pytest.mark.timeout(120)
def test_an_unused_return_is_a_leaf_only_under_rays_rule(trio, no_shm_leak):
    """An unused return of a call whose other return is used: the call runs and its error
    reaches get() through the used return, so dagc.compile takes it; experimental_compile
    under the patch refuses it, as Ray does."""
    a, b, _ = trio
    with dagc.InputNode() as inp:
        x, _y = a.two.options(num_returns=2).bind(inp)
        dag = b.inc.bind(x)
    with dagc.compile(dag) as cg:
        assert cg.execute(1).get(timeout=30) == 2
    with dagc.InputNode() as inp:
        x, _y = a.two.options(num_returns=2).bind(inp)
        dag = b.inc.bind(x)
    with dagc.patched_ray(workers=False):
        with pytest.raises(ValueError, match=r"There are 1 leaf nodes.*two \(return 1\)"):
            dag.experimental_compile()


# -- with_tensor_transport(device=...) -------------------------------------------------------


@pytest.mark.timeout(180)
def test_tensor_transport_device_is_honoured(trio, no_shm_leak):
    """device="cpu": the reader gets its tensors on the CPU, over the shared-memory ring
    ("shm") and over the communicator ("auto": gloo on CPU actors)."""
    a, b, _ = trio
    for transport in ("shm", "auto"):
        with dagc.InputNode() as inp:
            dag = b.where.bind(
                a.tensor.bind(inp).with_tensor_transport(transport=transport, device="cpu")
            )
        traced = dagc.trace(dag)
        assert "[device=cpu]" in traced.as_text()
        with dagc.compile(dag) as cg:
            assert cg.execute(3).get(timeout=60) == ("cpu", 3.0, 3)


@pytest.mark.timeout(120)
def test_tensor_transport_device_cuda_needs_a_gpu_reader(trio, no_shm_leak):
    a, b, _ = trio
    with dagc.InputNode() as inp:
        dag = b.where.bind(a.tensor.bind(inp).with_tensor_transport(device="cuda"))
    with pytest.raises(dagc.CompileError, match=r"device='cuda'.*holds no GPU.*num_gpus=1"):
        dagc.compile(dag)


def test_to_device_moves_only_what_must_move():
    torch = pytest.importorskip("torch")
    from dagc.runtime.comm.packing import OnDevice, to_device

    cpu = torch.device("cpu")
    v = {"a": [torch.ones(2)], "b": 3}
    assert to_device(v, cpu) is v  # nothing to move: the same object
    assert to_device(5, cpu) == 5

    class End:
        def read(self, deadline=None):
            return v

        def ready(self):
            return True

    end = OnDevice(End(), "cpu")
    assert end.read() is v and end.ready()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no GPU"):
            OnDevice(End(), "cuda")


# -- every form: compiled, or refused naming the node --------------------------------------


@pytest.mark.timeout(180)
def test_rays_forms_compile_or_are_refused_naming_the_node(trio, patched):
    import ray
    from ray.dag import InputNode
    from ray.experimental.channel.torch_tensor_type import TorchTensorType

    a, b, c = trio
    # num_returns=2 and a TorchTensorType hint set directly (Ray 2.60's
    # `node.type_hint = ...`; older Ray's with_type_hint) compile
    with InputNode() as inp:
        t = a.tensor.bind(inp)
        t.type_hint = TorchTensorType(device="cpu")
        dag = b.where.bind(t)
    cdag = dag.experimental_compile()
    try:
        assert ray.get(cdag.execute(2), timeout=60) == ("cpu", 2.0, 2)
    finally:
        cdag.teardown()

    @ray.remote
    def f(x):
        return x

    with InputNode() as inp:
        dag = f.bind(inp)
    cdag = dag.experimental_compile()  # Ray refuses function nodes; dagc runs them
    assert ray.get(cdag.execute(3), timeout=60) == 3
    cdag.teardown()
    with InputNode() as inp:
        dag = _actor_cls().bind().inc.bind(inp)  # an actor created inside the DAG
    with pytest.raises(dagc.CompileError, match=r"Actor.bind\(\).*Actor.remote\(\)"):
        dag.experimental_compile()
    with InputNode() as inp:
        x, y = a.two.options(num_returns=2).bind(inp)
        dag = ray.dag.MultiOutputNode([b.inc.bind(y), c.inc.bind(x)])
    cdag = dag.experimental_compile()
    try:
        assert ray.get(cdag.execute(1), timeout=60) == [3, 2]
    finally:
        cdag.teardown()


@pytest.mark.timeout(60)
def test_a_ray_cpu_communicator_edge_goes_through_shared_memory(trio):
    """Ray's "cpu" communicators carry no point-to-point tensors (as in Ray): the edge is a
    shared-memory channel, and no communicator group is formed for it."""
    from ray.experimental.channel.communicator import Communicator as RayCommunicator

    a, b, _ = trio
    RayComm = type("RayComm", (RayCommunicator,), {"get_transport_name": lambda self: "cpu"})
    RayComm.__abstractmethods__ = frozenset()  # a stand-in: never used to send
    with dagc.InputNode() as inp:
        dag = b.where.bind(a.tensor.bind(inp).with_tensor_transport(transport=RayComm()))
    t = dagc.trace(dag)
    assert not t.side.communicators
    assert t.ir.op("t0").transport is None


def test_patch_visible_in_rays_api():
    """experimental_compile under the patch keeps Ray's exact signature (every keyword)."""
    import inspect

    from ray.dag.dag_node import DAGNode

    with dagc.patched_ray(workers=False):
        ours = inspect.signature(DAGNode.experimental_compile)
        assert DAGNode.experimental_compile is rc._experimental_compile
    assert list(ours.parameters)[1:] == [
        "_submit_timeout",
        "_buffer_size_bytes",
        "enable_asyncio",
        "_max_inflight_executions",
        "_max_buffered_results",
        "_overlap_gpu_communication",
        "_default_communicator",
    ]
