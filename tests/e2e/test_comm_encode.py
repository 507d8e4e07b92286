"""A tensor-transport value whose non-tensor part cannot be pickled (issue 10, item 2).

The producing actor returns a dict holding a tensor and a lock. Before the fix its loop's
on_encode_error put a Failure in the metadata ring while CommWriter still sent the tensor:
the readers returned the Failure without receiving it, so gloo's send hung (or, with NCCL,
the next execution's receive paired with the stale send). Now every reader gets a TaskError
naming the lock, on that execution only, and the next execution is correct - with one or
two readers, blocking sends or isend/irecv (overlap).
"""

import threading

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import ray
import torch

import dagc
from dagc import InputNode, MultiOutputNode
from tests.faults.actors import BadUnpickle


@ray.remote
class Producer:
    def make(self, n):
        """n >= 0: a tensor of n elements (value n); n < 0: the same plus a lock;
        ("bad", n): the same plus an object that pickles but cannot be unpickled."""
        if isinstance(n, tuple):
            return {"t": torch.full((n[1],), float(n[1])), "n": n[1], "bad": BadUnpickle()}
        value = {"t": torch.full((abs(n),), float(abs(n))), "n": n}
        if n < 0:
            value["lock"] = threading.Lock()
        return value


@ray.remote
class Consumer:
    def __init__(self, k):
        self.k = k

    def total(self, d):
        return (self.k, float(d["t"].sum()), d["n"])


@pytest.fixture(scope="module")
def actors(ray_session):
    p = Producer.remote()
    cs = [Consumer.remote(k) for k in (1, 2)]
    ray.get([p.make.remote(1)] + [c.total.remote({"t": torch.ones(1), "n": 0}) for c in cs])
    yield p, cs
    for h in (p, *cs):
        ray.kill(h)


@pytest.mark.parametrize("overlap", [False, True], ids=["send", "overlap"])
@pytest.mark.parametrize("nreaders", [1, 2])
def test_unpicklable_part_of_a_tensor_value_is_a_task_error_then_all_is_well(
    actors, nreaders, overlap
):
    p, cs = actors
    with InputNode() as inp:
        d = p.make.bind(inp).with_tensor_transport("nccl")  # gloo on CPU actors
        dag = MultiOutputNode([c.total.bind(d) for c in cs[:nreaders]])
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        assert any(c.transport == "comm" for c in cg.schedule.channels)
        for n in (3, 5):
            with pytest.raises(dagc.TaskError) as ei:
                cg.execute(-n).get(timeout=30)
            msg = str(ei.value)
            assert "cannot be pickled" in msg and "value['lock']" in msg, msg
            assert "_thread.lock" in msg and "tensor-transport edge" in msg, msg
            assert isinstance(ei.value, TypeError)
            # the next execution pairs every receive with its own send
            want = [(k, float(n * n), n) for k in (1, 2)[:nreaders]]
            assert cg.execute(n).get(timeout=30) == want
        refs = [cg.execute(m) for m in (2, -2, 4)]  # in flight together
        assert refs[0].get(timeout=30) == [(k, 4.0, 2) for k in (1, 2)[:nreaders]]
        with pytest.raises(dagc.TaskError, match="value\\['lock'\\]"):
            refs[1].get(timeout=30)
        assert refs[2].get(timeout=30) == [(k, 16.0, 4) for k in (1, 2)[:nreaders]]


@pytest.mark.parametrize("overlap", [False, True], ids=["send", "overlap"])
@pytest.mark.parametrize("nreaders", [1, 2])
def test_skeleton_that_fails_to_unpickle_on_the_reader_is_a_task_error_then_all_is_well(
    actors, nreaders, overlap
):
    """The writer pickles the skeleton fine and sends the tensors; each reader fails to
    unpickle it. Each reader still receives the tensors (the specs decode), so the next
    execution's receives pair with its own sends, even with sizes that differ."""
    p, cs = actors
    with InputNode() as inp:
        d = p.make.bind(inp).with_tensor_transport("nccl")  # gloo on CPU actors
        dag = MultiOutputNode([c.total.bind(d) for c in cs[:nreaders]])
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        for bad, n in ((7, 3), (2, 5)):
            with pytest.raises(dagc.TaskError) as ei:
                cg.execute(("bad", bad)).get(timeout=30)
            msg = str(ei.value)
            assert "could not be unpickled" in msg and "BadUnpickle cannot be loaded" in msg
            assert "on channel c" in msg, msg  # names the metadata channel
            want = [(k, float(n * n), n) for k in (1, 2)[:nreaders]]
            assert cg.execute(n).get(timeout=30) == want
        refs = [cg.execute(m) for m in (2, ("bad", 6), 4)]  # in flight together
        assert refs[0].get(timeout=30) == [(k, 4.0, 2) for k in (1, 2)[:nreaders]]
        with pytest.raises(dagc.TaskError, match="BadUnpickle cannot be loaded"):
            refs[1].get(timeout=30)
        assert refs[2].get(timeout=30) == [(k, 16.0, 4) for k in (1, 2)[:nreaders]]
