"""The scheduler against real actors: a profile's costs fed back into a compile, predicted
vs measured in cg.schedule, profile() with overlap_communication, @dagc.reorderable found
by the probe and used by reorder="critical-path". No timing is asserted (the benchmarks
measure); only what the schedule says and that results are right."""

import time

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import ray
import torch

import dagc
from dagc import InputNode, MultiOutputNode

T = 30


@ray.remote
class Node:
    def __init__(self):
        self.calls = []

    def make(self, n):
        return torch.full((n,), 1.0)

    def add(self, t, n):
        return t + n

    @dagc.reorderable
    def fast(self, x):
        self.calls.append("fast")
        time.sleep(0.005)
        return x + 1

    @dagc.reorderable
    def feed(self, x):
        self.calls.append("feed")
        return x * 2

    def slow(self, x):
        time.sleep(0.02)
        return x - 1

    def plain_fast(self, x):
        self.calls.append("fast")
        return x + 1

    def plain_feed(self, x):
        self.calls.append("feed")
        return x * 2

    def order(self):
        out, self.calls = self.calls, []
        return out


@pytest.fixture(scope="module")
def nodes(ray_session):
    ns = [Node.remote() for _ in range(2)]
    ray.get([n.order.remote() for n in ns], timeout=60)
    yield ns
    for n in ns:
        ray.kill(n)


def test_profile_with_overlap_does_not_hang(nodes):
    """Overlap issues a1's receive before its input read: at rest each loop has the next
    execution's receive deferred. The profile's swap used to leave it in the queue, and
    the swapped-in loop's own receive then waited for metadata that never came."""
    a, b = nodes
    with InputNode() as inp:
        t = a.make.bind(inp).with_tensor_transport("nccl")
        dag = b.add.bind(t, inp)
    with dagc.compile(dag, overlap_communication=True, get_timeout=T) as cg:
        col = [str(x) for _, x in cg.schedule.of("a1")]
        assert col.index("icrecv t0<a0") < col.index("recv in<driver")
        assert torch.equal(cg.execute(3).get(timeout=T), torch.full((3,), 4.0))
        for _ in range(2):  # swap in and out twice
            prof = cg.profile(4, 3)
            assert "none complete" not in str(prof)
        assert torch.equal(cg.execute(2).get(timeout=T), torch.full((2,), 3.0))


def test_profile_costs_feed_the_next_compile(nodes):
    a, b = nodes
    with InputNode() as inp:
        dag = MultiOutputNode([a.fast.bind(inp), b.slow.bind(a.feed.bind(inp))])
    with dagc.compile(dag) as cg:
        prof = cg.profile(5, 1)
        assert "4 complete" in str(prof) or "5 complete" in str(prof)  # multi-output
        costs = prof.costs()
        assert costs.unit == "µs" and costs.actions["a1 slow t2"] > 10_000
        trace = prof.trace()["traceEvents"]
        assert any(e.get("name") == "slow" for e in trace)
        text = str(cg.schedule)  # measured beside predicted
        assert "meas start" in text and "median of 5 profiled executions" in text
    with dagc.compile(dag, costs=prof) as cg:
        text = str(cg.schedule)
        assert "predicted from profile of" in text and "µs" in text
        assert cg.execute(2).get(timeout=T) == [3, 3]
        cg.profile(3, 1)
        assert "measured" in cg.schedule.timing_table()


def test_reorder_critical_path_on_reorderable_methods(nodes):
    a, b = nodes
    with InputNode() as inp:
        dag = MultiOutputNode([a.fast.bind(inp), b.slow.bind(a.feed.bind(inp))])
    costs = {"fast": 5, "feed": 1, "slow": 20}
    ray.get(a.order.remote(), timeout=T)
    with dagc.compile(dag, costs=costs) as cg:  # bind order
        assert cg.execute(1).get(timeout=T) == [2, 1]
    assert ray.get(a.order.remote(), timeout=T) == ["fast", "feed"]
    with dagc.compile(dag, costs=costs, reorder="critical-path") as cg:
        assert "feed t1 (bind 1)" in str(cg.schedule)
        assert cg.execute(1).get(timeout=T) == [2, 1]
    assert ray.get(a.order.remote(), timeout=T) == ["feed", "fast"]
    # the same methods unmarked: the option changes nothing
    with InputNode() as inp:
        dag = MultiOutputNode([a.plain_fast.bind(inp), b.slow.bind(a.plain_feed.bind(inp))])
    with dagc.compile(
        dag, costs={"plain_fast": 5, "plain_feed": 1, "slow": 20}, reorder="critical-path"
    ) as cg:
        assert "(bind" not in str(cg.schedule).split("calls:")[0]
        assert cg.execute(1).get(timeout=T) == [2, 1]
    assert ray.get(a.order.remote(), timeout=T) == ["fast", "feed"]
