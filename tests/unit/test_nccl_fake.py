"""NcclCommunicator (runtime/comm/nccl.py) run unmodified on the fake CUDA/NCCL layer of
tests/fakes/fake_cuda.py: ranks are threads, CPU tensors stand in for device memory, and
every stream, event and NCCL call is logged, so the tests check what was called, in what
order, on which stream. What only a GPU shows (real concurrency, throughput) is
tests/gpu/'s.
"""

from __future__ import annotations

import pickle
import threading

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import torch

from dagc.runtime.comm.backends import make_communicator
from dagc.runtime.comm.nccl import NcclCommunicator
from tests.fakes import fake_cuda as fc


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    fc.install(monkeypatch)
    yield fc


def run_ranks(n, fn, timeout=20.0):
    """``fn(rank)`` on ``n`` threads at once; their results in rank order (an exception a
    rank raised is its result)."""
    out = [None] * n

    def go(r):
        try:
            out[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out[r] = e

    ts = [threading.Thread(target=go, args=(r,), daemon=True) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a rank is still running"
    return out


def group(n, timeout=5.0):
    """``n`` set-up NcclCommunicators, made as the runtime makes them (pickled to each
    member, rank 0 prepares the rendezvous)."""
    proto = make_communicator("nccl")
    assert isinstance(proto, NcclCommunicator) and proto.device == "cuda"
    copies = [pickle.loads(pickle.dumps(proto)) for _ in range(n)]
    rdv = copies[0].prepare()
    assert len(rdv["unique_id"]) == 128
    rdv = pickle.loads(pickle.dumps(rdv))

    def setup(r):
        fc.set_device(r)
        copies[r].setup(r, n, rdv, timeout)
        return copies[r]

    got = run_ranks(n, setup)
    for g in got:
        if isinstance(g, BaseException):
            raise g
    return got


def mine(entries, stream_ids):
    """The log entries that touch any of ``stream_ids``, reduced to (kind, stream)."""
    out = []
    for e in entries:
        if e[0] == "record" and e[2] in stream_ids:
            out.append(("record", e[2]))
        elif e[0] == "wait" and e[1] in stream_ids:
            out.append(("wait", e[1]))
        elif e[0] == "record_stream" and e[1] in stream_ids:
            out.append(("record_stream", e[1]))
        elif e[0] in ("send", "recv") and e[4] in stream_ids:
            out.append((e[0], e[4]))
        elif e[0] in ("allReduce", "allGather") and e[-1] in stream_ids:
            out.append((e[0], e[-1]))
        elif e[0] == "reduceScatter" and e[-1] in stream_ids:
            out.append((e[0], e[-1]))
    return out


# -- set-up and destruction --------------------------------------------------------------


def test_setup_forms_the_group_with_its_own_stream_and_destroy_aborts(fake):
    c0, c1 = group(2)
    assert (c0.rank, c0.world_size, c1.rank, c1.world_size) == (0, 2, 1, 2)
    assert c0._index == 0 and c1._index == 1  # the device each rank set
    assert c0._stream is not c1._stream
    assert [e for e in fake.entries("init")] in (
        [("init", 0, 2), ("init", 1, 2)],
        [("init", 1, 2), ("init", 0, 2)],
    )
    with pytest.raises(RuntimeError, match="already set up"):
        c0.setup(0, 2, {"unique_id": (1,) * 128}, 1.0)
    state = pickle.loads(pickle.dumps(c0))  # live parts never travel
    assert state._comm is None and state._stream is None and state.rank == -1
    c0.destroy()
    c0.destroy()  # idempotent
    assert fake.entries("abort") == [("abort", 0)]
    assert c0._comm is None and c0._stream is None and c0._ev_in is None


def test_destroy_falls_back_to_nccl_destroy_when_abort_fails(fake):
    c0, c1 = group(2)
    fake.BEHAVIOUR["abort"] = "fail"
    c0.destroy()
    c1.destroy()
    assert fake.entries("destroy") in ([("destroy", 0), ("destroy", 1)],)


def test_setup_failure_and_timeout_are_errors(fake):
    fake.BEHAVIOUR["init"] = "fail"
    c = make_communicator("nccl")
    with pytest.raises(RuntimeError, match="set-up failed.*unhandled system error"):
        c.setup(0, 2, {"unique_id": (0,) * 128}, 5.0)
    fake.BEHAVIOUR["init"] = "hang"
    with pytest.raises(TimeoutError, match="timed out after 0.2 s"):
        make_communicator("nccl").setup(0, 2, {"unique_id": (0,) * 128}, 0.2)


def test_a_member_that_never_joins_times_out_set_up(fake):
    c = make_communicator("nccl")
    with pytest.raises(TimeoutError, match="some member never joined"):
        c.setup(0, 2, c.prepare(), 0.3)


# -- point to point -------------------------------------------------------------------------


def test_send_recv_pair_and_order_the_comm_stream_against_compute(fake):
    c0, c1 = group(2)
    fake.LOG.clear()
    x = fc.cuda(torch.arange(6, dtype=torch.float32))

    def rank(r):
        if r == 0:
            c0.send(x, 1)
            c0.send(x * 2, 1)
            return None
        a, b = fc.cuda(torch.empty(6)), fc.cuda(torch.empty(6))
        c1.recv(a, 0)
        c1.recv(b, 0)
        return a, b, fc.current_stream().cuda_stream

    _, (a, b, cur1) = run_ranks(2, rank)
    assert torch.equal(a, x) and torch.equal(b, x * 2)  # in issue order
    s1 = c1._stream.cuda_stream
    want = [
        ("record", cur1),
        ("wait", s1),
        ("record_stream", s1),
        ("recv", s1),
        ("record", s1),
        ("wait", cur1),
    ] * 2
    assert mine(fake.entries(), {cur1, s1}) == want
    sends = [e for e in fake.entries("send")]
    assert [(e[1], e[2], e[3], e[4]) for e in sends] == [(0, 1, 24, c0._stream.cuda_stream)] * 2


def test_isend_irecv_return_works_that_order_the_current_stream(fake):
    c0, c1 = group(2)
    x = fc.cuda(torch.tensor([1, 2, 3], dtype=torch.int64))

    def rank(r):
        if r == 0:
            w = c0.isend(x, 1)
            assert w.is_completed()
            w.wait()
            return None
        t = fc.cuda(torch.zeros(3, dtype=torch.int64))
        w = c1.irecv(t, 0)
        ev = w.event
        assert ev.stream == c1._stream.cuda_stream  # recorded on the comm stream
        w.wait()
        assert w.tensor is None  # released once waited on
        return t, ev.id, fc.current_stream().cuda_stream

    _, (t, ev, cur) = run_ranks(2, rank)
    assert t.tolist() == [1, 2, 3]
    assert ("wait", cur, ev) in fake.entries("wait")  # the caller's stream waits on it


def test_grouped_send_to_oneself_records_events_after_group_end(fake):
    (c,) = group(1)
    x = fc.cuda(torch.tensor([4.0, 5.0]))
    y = fc.cuda(torch.zeros(2))
    fake.LOG.clear()
    with c.grouped():
        with c.grouped():  # nested: one group
            w1 = c.isend(x, 0)
        w2 = c.irecv(y, 0)
        with pytest.raises(RuntimeError, match="use isend inside grouped"):
            c.send(x, 0)
        with pytest.raises(RuntimeError, match="use irecv inside grouped"):
            c.recv(y, 0)
        assert not any(
            e[0] == "record" and e[2] == c._stream.cuda_stream for e in fake.entries()
        )  # nothing recorded yet
    w1.wait()
    w2.wait()
    assert y.tolist() == [4.0, 5.0]
    kinds = [
        e[0] for e in fake.entries() if e[0] in ("groupStart", "groupEnd", "send", "recv", "record")
    ]
    end = kinds.index("groupEnd")
    assert kinds.count("groupStart") == 1 and "send" in kinds[end:] and "recv" in kinds[end:]
    assert kinds[-2:] == ["record", "record"]  # the Works' events, after the group


def test_a_size_mismatch_between_send_and_recv_is_an_error(fake):
    c0, c1 = group(2)

    def rank(r):
        if r == 0:
            c0.send(fc.cuda(torch.zeros(4)), 1)
            return None
        c1.recv(fc.cuda(torch.zeros(5)), 0)

    _, err = run_ranks(2, rank)
    assert isinstance(err, fc.FakeNcclError) and "receives 20 bytes" in str(err)


def test_only_contiguous_cuda_tensors_are_taken(fake):
    (c,) = group(1)
    with pytest.raises(ValueError, match="contiguous CUDA tensors, got cpu tensor"):
        c.send(torch.zeros(2), 0)
    nc = fc.cuda(torch.zeros(4, 4)).t()
    with pytest.raises(ValueError, match="non-contiguous"):
        c.recv(nc, 0)


# -- collectives ----------------------------------------------------------------------------


def test_allreduce_every_op_and_dtype(fake):
    cs = group(3)
    ops = ("sum", "product", "max", "min", "avg")

    def rank(r):
        out = {}
        for op in ops:
            t = fc.cuda(torch.tensor([1.0 + r, -2.0 * r]))
            cs[r].allreduce(t, op)
            out[op] = t.tolist()
        i = fc.cuda(torch.tensor([7 + r, 3], dtype=torch.int64))
        cs[r].allreduce(i, "avg")  # NCCL has no integer AVG
        out["int_avg"] = i.tolist()
        b = fc.cuda(torch.tensor([r == 1, False]))
        cs[r].allreduce(b, "max")
        out["bool"] = b.tolist()
        with pytest.raises(TypeError, match="NCCL cannot all-reduce torch.complex64"):
            cs[r].allreduce(fc.cuda(torch.zeros(2, dtype=torch.complex64)), "sum")
        with pytest.raises(ValueError, match="unknown reduce op"):
            cs[r].allreduce(fc.cuda(torch.zeros(2)), "median")
        return out

    got = run_ranks(3, rank)
    for g in got:
        assert not isinstance(g, BaseException), g
        assert g["sum"] == [6.0, -6.0] and g["product"] == [6.0, 0.0]
        assert g["max"] == [3.0, 0.0] and g["min"] == [1.0, -4.0]
        assert g["avg"] == [2.0, -2.0] and g["int_avg"] == [8, 3]
        assert g["bool"] == [True, False]
    codes = [(e[3], e[4]) for e in fake.entries("allReduce") if e[1] == 0]
    assert codes == [(7, 0), (7, 1), (7, 2), (7, 3), (7, 4), (4, 0), (1, 2)]


def test_allgather_and_reducescatter_on_the_comm_stream(fake):
    cs = group(2)
    fake.LOG.clear()

    def rank(r):
        c = cs[r]
        src = fc.cuda(torch.full((2, 3), float(r + 1)))
        out = fc.cuda(torch.empty(4, 3))
        c.allgather(src, out)
        rs = fc.cuda(torch.empty(1, 3))
        c.reducescatter(
            fc.cuda(torch.arange(6, dtype=torch.float32).reshape(2, 3) * (r + 1)), rs, "sum"
        )
        ri = fc.cuda(torch.empty(1, 2, dtype=torch.int32))
        c.reducescatter(fc.cuda(torch.tensor([[1, 2], [3, 5]], dtype=torch.int32)), ri, "avg")
        return out, rs, ri

    (g0, rs0, ri0), (g1, rs1, ri1) = run_ranks(2, rank)
    want = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    assert torch.equal(g0, want) and torch.equal(g1, want)
    assert rs0.tolist() == [[0.0, 3.0, 6.0]] and rs1.tolist() == [[9.0, 12.0, 15.0]]
    assert ri0.tolist() == [[1, 2]] and ri1.tolist() == [[3, 5]]
    s0 = cs[0]._stream.cuda_stream
    for kind in ("allGather", "reduceScatter"):
        assert all(e[-1] in (s0, cs[1]._stream.cuda_stream) for e in fake.entries(kind))
    # both the input and the output are kept alive for the comm stream
    assert sum(1 for e in fake.entries("record_stream") if e[1] == s0) == 2 * 3


def test_ranks_that_disagree_on_a_collective_all_fail(fake):
    cs = group(2)

    def rank(r):
        cs[r].allreduce(fc.cuda(torch.zeros(4 + r)), "sum")  # a shape mismatch

    errs = run_ranks(2, rank)
    assert all(isinstance(e, fc.FakeNcclError) and "differ" in str(e) for e in errs)


def test_a_peer_that_dies_mid_collective_is_ended_by_destroy(fake):
    """Rank 1 never arrives: rank 0's all-reduce waits, as a kernel would, until the group
    is destroyed (the runtime's teardown); abort ends the wait with an error."""
    c0, c1 = group(2)
    box = {}

    def stuck():
        try:
            c0.allreduce(fc.cuda(torch.ones(3)), "sum")
            box["done"] = True
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=stuck, daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waiting for the dead peer
    c0.destroy()
    t.join(5)
    assert not t.is_alive()
    assert "aborted" in str(box.get("error"))
    assert fake.entries("abort") == [("abort", 0)]


def test_collective_and_p2p_ends_of_the_runtime_on_the_fake(fake):
    """packing.device_of names the communicator's GPU for NCCL groups."""
    from dagc.runtime.comm.packing import device_of

    (c,) = group(1)
    assert device_of(c) == torch.device("cuda", 0)
