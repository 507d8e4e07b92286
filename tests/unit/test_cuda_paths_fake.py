"""The CUDA branches of collective.py, p2p.py and packing.py run unmodified on the fake
GPU of tests/fakes/fake_device.py (CPU tensors that say they are on ``cuda:i``) over the
fake NCCL of tests/fakes/fake_cuda.py (ranks are threads). Each test checks the values and
what happened, in order, on each rank's compute stream (its current one) and comm stream:
host -> GPU copies before the comm stream is made to wait, results used only after the
compute stream waits for the comm stream's event, GPU -> host copies after that.
"""

from __future__ import annotations

import pickle
import threading

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import torch

from dagc.runtime.comm.collective import Collective
from dagc.runtime.comm.p2p import CommReader, CommWriter
from dagc.runtime.comm.packing import OnDevice, device_of, target_device, to_device
from dagc.runtime.failure import Failure, capture
from tests.fakes import fake_cuda as fc
from tests.fakes import fake_device as fd
from tests.unit.test_nccl_fake import group, run_ranks

OPS = ("send", "recv", "allReduce", "allGather", "reduceScatter")


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    fd.install(monkeypatch)
    yield fc


def trace(comm, cur: int) -> list:
    """What touched this rank's compute stream (``cur``) and ``comm``'s stream, in order,
    as (what, "compute" | "comm")."""
    role = {cur: "compute", comm._stream.cuda_stream: "comm"}
    out = []
    for e in fc.entries():
        k = e[0]
        if k == "record" and e[2] in role:
            out.append(("record", role[e[2]]))
        elif k in ("wait", "record_stream") and e[1] in role:
            out.append((k, role[e[1]]))
        elif k in OPS and e[-1] in role:
            out.append((k, role[e[-1]]))
        elif k == "to" and e[2] in role:
            out.append((f"to {e[1]}", role[e[2]]))
    return out


def nccl(op: str, outs: int = 0) -> list:
    """One blocking op of NcclCommunicator: the comm stream waits for compute, runs ``op``,
    and compute waits for it (``outs``: extra output buffers kept for the comm stream)."""
    return (
        [("record", "compute"), ("wait", "comm")]
        + [("record_stream", "comm")] * (1 + outs)
        + [(op, "comm"), ("record", "comm"), ("wait", "compute")]
    )


def on_rank(n, fn):
    """``fn(r, comm, compute stream id)`` on each rank's thread, its GPU current there."""
    cs = group(n)

    def go(r):
        fc.set_device(r)
        return fn(r, cs[r], fc.current_stream().cuda_stream)

    got = run_ranks(n, go)
    for g in got:
        if isinstance(g, BaseException):
            raise g
    return cs, got


def is_gpu(t, r) -> bool:
    return isinstance(t, fc.CudaTensor) and t.device == torch.device("cuda", r)


# -- collectives ------------------------------------------------------------------------------


def test_allreduce_of_a_host_tensor_copies_it_to_the_gpu_before_the_comm_stream_waits():
    def rank(r, c, cur):
        coll = Collective(c, "sum", f"a{r}", kind="allreduce")
        assert is_gpu(coll._flag_dev, r)  # the flag words travel on the GPU
        x = torch.tensor([1.0, 2.0]) * (r + 1)
        out = coll(x)
        return out, x, trace(c, cur)

    _, got = on_rank(2, rank)
    for r, (out, x, tr) in enumerate(got):
        assert is_gpu(out, r) and out.cpu().tolist() == [3.0, 6.0]
        assert x.tolist() == [1.0 * (r + 1), 2.0 * (r + 1)]  # the input is not modified
        assert tr == nccl("allReduce") + [(f"to cuda:{r}", "compute")] + nccl("allReduce")


def test_allreduce_of_several_host_tensors_reduces_one_flat_gpu_buffer():
    def rank(r, c, cur):
        a, b = torch.full((2,), r + 1.0), torch.arange(4.0).reshape(2, 2)
        return Collective(c, "max", kind="allreduce")(a, b), trace(c, cur)

    _, got = on_rank(2, rank)
    for r, ((a, b), tr) in enumerate(got):
        assert is_gpu(a, r) and is_gpu(b, r)
        assert a.cpu().tolist() == [2.0, 2.0] and b.cpu().tolist() == [[0, 1], [2, 3]]
        moves = [(f"to cuda:{r}", "compute")] * 2
        assert tr == nccl("allReduce") + moves + nccl("allReduce")


def test_allgather_and_reducescatter_allocate_their_outputs_on_the_gpu():
    def rank(r, c, cur):
        g = Collective(c, kind="allgather")(torch.tensor([[r, r + 10]], dtype=torch.int64))
        rs = Collective(c, "sum", kind="reducescatter")(torch.arange(4.0) * (r + 1))
        return g, rs, trace(c, cur)

    _, got = on_rank(2, rank)
    for r, (g, rs, tr) in enumerate(got):
        assert is_gpu(g, r) and g.cpu().tolist() == [[0, 10], [1, 11]]
        assert is_gpu(rs, r) and rs.cpu().tolist() == [[0.0, 3.0], [6.0, 9.0]][r]
        move = [(f"to cuda:{r}", "compute")]
        assert tr == (
            nccl("allReduce")
            + move
            + nccl("allGather", outs=1)
            + nccl("allReduce")
            + move
            + nccl("reduceScatter", outs=1)
        )


def test_gpu_inputs_are_not_moved_and_a_non_contiguous_one_is_made_contiguous_on_the_gpu():
    def rank(r, c, cur):
        x = fc.cuda(torch.arange(4.0).reshape(2, 2), r)
        s = Collective(c, "sum", kind="allreduce")(x)
        g = Collective(c, kind="allgather")(x.t())
        return s, g, trace(c, cur)

    _, got = on_rank(2, rank)
    for r, (s, g, tr) in enumerate(got):
        assert is_gpu(s, r) and s.cpu().tolist() == [[0, 2], [4, 6]]
        assert is_gpu(g, r) and g.cpu().tolist() == [[0, 2], [1, 3]] * 2
        assert not any(k.startswith("to ") for k, _ in tr)


def test_a_failed_participant_sends_its_failure_to_the_others_through_the_gpu():
    def rank(r, c, cur):
        v = capture(KeyError("boom"), "a1", "f", 3) if r == 1 else torch.ones(2)
        return Collective(c, "sum", f"a{r}", kind="allreduce")(v), trace(c, cur)

    _, got = on_rank(2, rank)
    (f0, tr0), (f1, tr1) = got
    assert f0.__class__ is Failure and f1.__class__ is Failure
    assert (f0.type_name, f0.actor, f0.step) == ("KeyError", "a1", 3)  # rank 1's own
    assert f0.message == f1.message
    # the pickled Failure goes to the GPU before its all-reduce; no data all-reduce follows
    for r, tr in enumerate((tr0, tr1)):
        assert tr == nccl("allReduce") + [(f"to cuda:{r}", "compute")] + nccl("allReduce")


def test_inputs_that_differ_in_shape_fail_on_every_participant_before_data_moves():
    def rank(r, c, cur):
        return Collective(c, kind="allgather")(torch.zeros(2 + r, 3)), trace(c, cur)

    _, got = on_rank(2, rank)
    for f, tr in got:
        assert f.__class__ is Failure and "differ in shape" in f.message
        assert tr == nccl("allReduce")  # the flag words only


def test_a_peer_that_dies_mid_collective_raises_once_the_group_is_destroyed():
    """Rank 1 never calls: rank 0 waits in the flag all-reduce, as a kernel would, until
    the group is torn down; then the collective raises (the communicator broke)."""
    c0, _c1 = group(2)
    box: dict = {}

    def stuck():
        fc.set_device(0)
        try:
            box["got"] = Collective(c0, "sum", kind="allreduce")(torch.ones(3))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=stuck, daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive()
    c0.destroy()
    t.join(5)
    assert not t.is_alive() and "got" not in box
    assert isinstance(box["error"], fc.FakeNcclError) and "aborted" in str(box["error"])


# -- point to point ---------------------------------------------------------------------------


class Meta:
    """The metadata channel of a comm edge (what the shared-memory ring is): values are
    pickled through it, one writer, one reader."""

    def __init__(self):
        self.q: list = []
        self.cv = threading.Condition()
        self.on_encode_error = None

    def write(self, v) -> bool:
        with self.cv:
            self.q.append(pickle.dumps(v, 5))
            self.cv.notify_all()
        return False

    def read(self, deadline=None):
        with self.cv:
            assert self.cv.wait_for(lambda: self.q, fc.TIMEOUT), "no metadata came"
            return pickle.loads(self.q.pop(0))

    def ready(self) -> bool:
        return bool(self.q)


def value(r):
    return {"x": torch.arange(4.0) + r, "y": [torch.ones(2, 3).t()], "n": r}


def test_a_host_value_is_sent_from_the_gpu_and_received_into_the_readers_gpu():
    meta = Meta()

    def rank(r, c, cur):
        if r == 0:
            CommWriter(meta, c, {"b": 1}, ("b",), "a").send(value(7), "b")
            return None, trace(c, cur)
        got = CommReader(meta, c, 0, "cuda").recv()
        return got, trace(c, cur)

    _, ((_, tr0), (got, tr1)) = on_rank(2, rank)
    assert tr0 == [("to cuda:0", "compute")] * 2 + nccl("send") * 2
    assert tr1 == nccl("recv") * 2  # received straight into GPU buffers
    assert got["n"] == 7 and is_gpu(got["x"], 1) and is_gpu(got["y"][0], 1)
    assert got["x"].cpu().tolist() == [7.0, 8.0, 9.0, 10.0]
    assert got["y"][0].cpu().tolist() == [[1.0, 1.0]] * 3


def test_overlapped_transfer_then_a_host_device_hint_orders_the_copy_after_the_comm_stream():
    """isend/irecv: the Works' events are recorded on the comm stream; ``wait`` makes the
    compute stream wait for them, and only then does OnDevice("cpu") copy to the host."""
    meta = Meta()

    def rank(r, c, cur):
        if r == 0:
            w = CommWriter(meta, c, {"b": 1}, ("b",), "a").isend(value(1), "b")
            issued = trace(c, cur)
            w.wait()
            return issued, trace(c, cur)
        end = OnDevice(CommReader(meta, c, 0, "cuda"), "cpu")
        got = end.irecv().wait()
        return got, trace(c, cur)

    _, ((issued, tr0), (got, tr1)) = on_rank(2, rank)
    send = nccl("send")[:-1]  # isend: the comm stream's event, no wait yet
    assert issued == [("to cuda:0", "compute")] * 2 + send * 2
    assert tr0 == issued + [("wait", "compute")] * 2
    recv = nccl("recv")[:-1]
    assert tr1 == recv * 2 + [("wait", "compute")] * 2 + [("to cpu", "compute")] * 2
    assert type(got["x"]) is torch.Tensor and got["x"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert type(got["y"][0]) is torch.Tensor and got["y"][0].shape == (3, 2)


def test_a_failure_on_a_comm_edge_moves_no_tensor_and_reaches_the_reader_as_is():
    meta = Meta()
    boom = capture(ValueError("upstream"), "a", "f", 0)

    def rank(r, c, cur):
        if r == 0:
            CommWriter(meta, c, {"b": 1}, ("b",), "a").send(boom, "b")
            return None, trace(c, cur)
        return OnDevice(CommReader(meta, c, 0, "cuda"), "cpu").recv(), trace(c, cur)

    _, ((_, tr0), (got, tr1)) = on_rank(2, rank)
    assert tr0 == [] and tr1 == []
    assert got.__class__ is Failure and got.message == boom.message


# -- packing: device_of, with_tensor_transport(device=...) -------------------------------------


def test_device_of_a_cuda_communicator_without_a_device_index_is_the_current_gpu():
    class Comm:
        device = "cuda"

    fc.set_device(3)
    assert device_of(Comm()) == torch.device("cuda", 3)
    assert device_of(Comm(), torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_a_cuda_hint_moves_host_values_to_the_current_gpu_and_leaves_gpu_ones():
    fc.set_device(1)
    meta = Meta()
    end = OnDevice(meta, "cuda")
    assert end.ready is not None and end.dev == torch.device("cuda", 1)
    on_gpu = fc.cuda(torch.ones(2), 1)
    meta.write(value(0))
    got = end.read()
    assert is_gpu(got["x"], 1) and is_gpu(got["y"][0], 1) and got["n"] == 0
    assert to_device(on_gpu, end.dev) is on_gpu
    v = {"a": on_gpu}
    assert to_device(v, end.dev) is v  # nothing to move: the value itself
    assert to_device(on_gpu, torch.device("cpu")).__class__ is torch.Tensor
    assert [e[1] for e in fc.entries("to")] == ["cuda:1", "cuda:1", "cpu"]


def test_a_cuda_hint_without_a_gpu_is_a_clear_error():
    fd.NO_GPU["value"] = True
    assert target_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"device='gpu'.*sees no GPU.*num_gpus=1"):
        OnDevice(Meta(), "gpu")
