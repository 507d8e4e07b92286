"""Methods bound on one actor run in bind order (Ray Compiled Graph's rule), end to end."""

import uuid

import pytest
import ray

import dagc
from dagc import InputNode, MultiOutputNode


@ray.remote
class Counter:
    def __init__(self):
        self.i = 0

    def inc(self, x):
        self.i += x
        return self.i

    def double_and_inc(self, x):
        self.i *= 2
        self.i += x
        return self.i


@ray.remote
class PipeStage:
    """Logs the order its forward and backward passes run in."""

    def __init__(self):
        self.log = []

    def fwd(self, x, mb):
        self.log.append(f"F{mb}")
        return x + 1

    def bwd(self, x, mb):
        self.log.append(f"B{mb}")
        return x * 2

    def take_log(self):
        log, self.log = self.log, []
        return log


@pytest.fixture
def fresh(ray_session):
    """Actors made for one test (their state is the point), killed after it."""
    made = []

    def make(cls, **options):
        h = cls.options(**options).remote() if options else cls.remote()
        made.append(h)
        return h

    yield make
    for h in made:
        ray.kill(h)


def test_issue_example_runs_in_bind_order(fresh):
    """Ray gives [4, 1]: a1.inc, a2.double_and_inc, a2.inc, a1.double_and_inc, in bind order.
    Numbering ops depth-first from the output ran a2.inc and a1.double_and_inc first: [1, 4]."""
    a1, a2 = fresh(Counter), fresh(Counter)
    ray.get([a1.inc.remote(0), a2.inc.remote(0)])
    with InputNode() as inp:
        branch1 = a1.inc.bind(inp)
        branch1 = a2.double_and_inc.bind(branch1)
        branch2 = a2.inc.bind(inp)
        branch2 = a1.double_and_inc.bind(branch2)
        dag = MultiOutputNode([branch2, branch1])
    with dagc.compile(dag) as cg:
        assert cg.execute(1).get(timeout=30) == [4, 1]
        assert "(bind 0)" in str(cg.schedule)  # the table shows why the order differs


def one_f_one_b(s0, s1, transport=None):
    """Stage s0: F0 F1 B0 B1; stage s1: F0 B0 F1 B1 (1F1B), as bound here."""
    move = (lambda n: n.with_tensor_transport(transport)) if transport else (lambda n: n)
    with InputNode() as inp:
        f0 = move(s0.fwd.bind(inp[0], 0))
        f1 = move(s0.fwd.bind(inp[1], 1))
        b0 = move(s1.bwd.bind(s1.fwd.bind(f0, 0), 0))
        b1 = move(s1.bwd.bind(s1.fwd.bind(f1, 1), 1))
        return MultiOutputNode([s0.bwd.bind(b0, 0), s0.bwd.bind(b1, 1)])


@pytest.mark.parametrize(
    "transport,overlap", [(None, False), ("nccl", True)], ids=["shm", "tensor-overlap"]
)
def test_hand_written_microbatch_order_is_kept(fresh, transport, overlap):
    s0, s1 = fresh(PipeStage), fresh(PipeStage)
    dag = one_f_one_b(s0, s1, transport)
    args = (0, 1)
    if transport:
        torch = pytest.importorskip("torch")
        args = (torch.zeros(2), torch.ones(2))
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        for _ in range(2):
            out = cg.execute(*args).get(timeout=60)
            if transport:
                out = [o.tolist() for o in out]
            assert out == ([[8.0, 8.0], [12.0, 12.0]] if transport else [8, 12])
            assert ray.get(s0.take_log.remote(), timeout=30) == ["F0", "F1", "B0", "B1"]
            assert ray.get(s1.take_log.remote(), timeout=30) == ["F0", "B0", "F1", "B1"]


def test_bind_order_contradicting_the_data_is_compile_error(fresh):
    """Two copies of one actor's handle count binds separately; here the copy's first bind
    needs the result of the original's second one: no order satisfies both."""
    name = f"bind-order-{uuid.uuid4().hex[:8]}"
    a, b = fresh(Counter, name=name), fresh(Counter)
    a_copy = ray.get_actor(name)
    with InputNode() as inp:
        first = a.inc.bind(inp)  # a: bind 0
        second = a.double_and_inc.bind(first)  # a: bind 1
        dag = a_copy.inc.bind(b.inc.bind(second))  # the copy's bind 0, after both
    with pytest.raises(dagc.CompileError) as ei:
        dagc.compile(dag)
    msg = str(ei.value)
    assert (
        "Counter.inc (t3, bound 1st on a0) is bound before a0:Counter.double_and_inc "
        "(t1, bound 2nd on a0) but needs its result (t1 -> t2 -> t3)" in msg
    )
    assert "through one handle of the actor" in msg
