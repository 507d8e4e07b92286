"""Tensor transport and collectives end to end on CPU actors (gloo).

Every DAG shape runs with ``overlap_communication`` off and on: overlap rewrites each
communicator op of the generated loops, so each shape is a separate case for it.
"""

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import ray
import torch
from ray.experimental.collective import allgather, allreduce, reducescatter
from ray.experimental.util.types import ReduceOp

import dagc
from dagc import InputNode, MultiOutputNode


@ray.remote
class TensorWorker:
    def __init__(self, k=1.0):
        self.k = k

    def make(self, n):
        return torch.full((n,), self.k)

    def scale(self, t):
        return t * self.k

    def nested(self, n):
        return {
            "a": torch.arange(n, dtype=torch.float32),
            "meta": ("x", n),
            "list": [torch.ones(2, 2) * self.k, 7],
        }

    def sum_nested(self, d):
        return float(d["a"].sum() + d["list"][0].sum()) + d["list"][1]

    def add(self, a, b):
        return a + b

    def grad(self, n):
        return torch.full((n,), self.k)

    def fail(self, t):
        raise RuntimeError("stage failed")

    def total(self, t):
        return float(t.sum())

    def rows(self, n):
        return torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) * self.k


@pytest.fixture(scope="module")
def tw(ray_session):
    ws = [TensorWorker.remote(float(k + 1)) for k in range(3)]
    ray.get([w.make.remote(1) for w in ws])
    return ws


@pytest.mark.parametrize("overlap", [False, True])
def test_p2p_tensor_edge(tw, overlap):
    a, b = tw[:2]
    with InputNode() as inp:
        t = a.make.bind(inp).with_tensor_transport("nccl")
        dag = b.scale.bind(t)
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        assert any(c.transport == "comm" for c in cg.schedule.channels)
        for n in (3, 10, 1000):
            out = cg.execute(n).get(timeout=30)
            assert torch.equal(out, torch.full((n,), 2.0))


@pytest.mark.parametrize("overlap", [False, True])
def test_nested_tensors_multi_reader_and_driver(tw, overlap):
    a, b, c = tw
    with InputNode() as inp:
        d = a.nested.bind(inp).with_tensor_transport("auto")
        dag = MultiOutputNode([b.sum_nested.bind(d), c.sum_nested.bind(d), d])
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        for n in (4, 5, 6):  # the loops must survive an execution's end, waits included
            s1, s2, d = cg.execute(n).get(timeout=30)
            assert s1 == s2 == n * (n - 1) / 2 + 4.0 + 7
            assert torch.equal(d["a"], torch.arange(n, dtype=torch.float32))


@pytest.mark.parametrize("overlap", [False, True])
def test_bidirectional_exchange(tw, overlap):
    a, b = tw[:2]
    with InputNode() as inp:
        x = a.make.bind(inp).with_tensor_transport("nccl")
        y = b.make.bind(inp).with_tensor_transport("nccl")
        dag = MultiOutputNode([a.add.bind(a.make.bind(inp), y), b.add.bind(x, y)])
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        for _ in range(3):
            r1, r2 = cg.execute(2).get(timeout=30)
            assert r1.tolist() == [3.0, 3.0] and r2.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("overlap", [False, True])
def test_allreduce_mixed_with_p2p(tw, overlap):
    a, b, c = tw
    with InputNode() as inp:
        grads = allreduce.bind([w.grad.bind(inp) for w in (a, b, c)])
        moved = c.scale.bind(a.make.bind(inp).with_tensor_transport("nccl"))
        dag = MultiOutputNode([*grads, moved])
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        for n in (2, 5):
            *rs, m = cg.execute(n).get(timeout=30)
            for r in rs:
                assert r.tolist() == [6.0] * n
            assert m.tolist() == [3.0] * n


@pytest.mark.parametrize("overlap", [False, True])
def test_allgather_reducescatter_and_bucketed_allreduce(tw, overlap):
    ws = tw
    with InputNode() as inp:
        rows = [w.rows.bind(inp) for w in ws]
        gathered = allgather.bind(rows)
        scattered = reducescatter.bind([w.rows.bind(inp) for w in ws], op=ReduceOp.MAX)
        # one all-reduce over two tensors per actor: a result for each
        bucket = allreduce.bind([[w.grad.bind(inp) for w in ws], [w.rows.bind(inp) for w in ws]])
        top = ws[2].scale.bind(gathered[2])  # results feed methods too
        dag = MultiOutputNode([*gathered, *scattered, *[x for pair in bucket for x in pair], top])
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        text = str(cg.schedule)
        assert "allgather t" in text and "reducescatter.max t" in text
        assert "allreduce.sum(t12, t13) -> 2" in cg.source(ws[0])
        for n in (3, 6):
            out = cg.execute(n).get(timeout=30)
            base = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
            g, s, b, top = out[:3], out[3:6], out[6:12], out[12]
            want = torch.cat([base * k for k in (1.0, 2.0, 3.0)])
            for x in g:
                assert torch.equal(x, want)
            assert torch.equal(top, want * 3.0)
            full_max = base * 3.0
            for r, x in enumerate(s):
                assert torch.equal(x, full_max.view(3, n // 3, 2)[r])
            for grad, rws in zip(b[0::2], b[1::2]):
                assert torch.equal(grad, torch.full((n,), 6.0))
                assert torch.equal(rws, base * 6.0)
        with pytest.raises(dagc.TaskError, match="must divide by the group size 3"):
            cg.execute(4).get(timeout=30)  # 4 rows do not scatter on 3
        assert cg.execute(3).get(timeout=30)[0].shape == (9, 2)  # and the DAG goes on


@pytest.mark.parametrize("overlap", [False, True])
def test_failure_crosses_communicator_and_collective(tw, overlap):
    a, b, c = tw
    with InputNode() as inp:
        bad = a.fail.bind(a.make.bind(inp)).with_tensor_transport("nccl")
        dag = MultiOutputNode([b.scale.bind(bad)])
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        with pytest.raises(RuntimeError, match="stage failed"):
            cg.execute(2).get(timeout=30)
        with pytest.raises(dagc.TaskError):
            cg.execute(2).get(timeout=30)


@pytest.mark.parametrize("overlap", [False, True])
def test_pipeline_parallel_example_runs(overlap):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "pipeline_parallel.py"
    spec = importlib.util.spec_from_file_location("pp_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dag = mod.build()
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        for _ in range(2):
            out = cg.execute(*mod.example_input()).get(timeout=120)
            assert len(out) == mod.MICROBATCHES
            assert out[0].shape == (mod.BATCH // mod.MICROBATCHES,)
        sched = str(cg.schedule)
        assert ("icrecv" in sched and "isend" in sched) == overlap


class CountingGloo(dagc.GlooCommunicator if hasattr(dagc, "GlooCommunicator") else object):
    """A user communicator: gloo underneath, counting the tensors it sends."""

    sent = 0

    def send(self, tensor, peer):
        CountingGloo.sent += 1
        return super().send(tensor, peer)


@pytest.mark.parametrize("overlap", [False, True])
def test_user_communicator_instance_as_option(tw, overlap):
    a, b = tw[:2]
    with InputNode() as inp:
        dag = b.scale.bind(a.make.bind(inp).with_tensor_transport("nccl"))
    with dagc.compile(dag, communicator=CountingGloo(), overlap_communication=overlap) as cg:
        assert [g.backend for g in cg._ir.comm_groups] == ["custom-option"]
        for n in (3, 4):
            assert cg.execute(n).get(timeout=30).tolist() == [2.0] * n


@pytest.mark.parametrize("overlap", [False, True])
def test_bad_communicator_option_is_clear_error(tw, overlap):
    a, b = tw[:2]
    with InputNode() as inp:
        dag = b.scale.bind(a.make.bind(inp).with_tensor_transport("nccl"))
    with pytest.raises(ValueError, match="communicator"):
        dagc.compile(dag, communicator="mpi", overlap_communication=overlap)
    with pytest.raises(dagc.CompileError, match="GPU"):
        dagc.compile(dag, communicator="nccl", overlap_communication=overlap)
