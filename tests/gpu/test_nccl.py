"""NcclCommunicator on one GPU: set-up, grouped send/recv to itself, all-reduce, stream and
event ordering against the compute stream, and GPU values through CommWriter/CommReader and
Collective. One rank only: two NCCL ranks cannot share the one GPU of the test machine
(NCCL_ERROR_INVALID_USAGE), so multi-rank ordering is covered on CPU through gloo.

Skipped without CUDA or cupy. Runs in well under a minute.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import secrets
import time

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import torch

from dagc.runtime.channels import Control, Reader, Waiter, Writer, shm
from dagc.runtime.comm.backends import make_communicator
from dagc.runtime.comm.collective import Collective
from dagc.runtime.comm.nccl import NcclCommunicator
from dagc.runtime.comm.p2p import CommReader, CommWriter
from dagc.runtime.failure import Failure, capture

# the dagc modules above import neither CUDA nor cupy: the module is skipped here
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("cupy")
pytest.importorskip("cupy.cuda.nccl")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def comm():
    c = make_communicator("nccl")
    assert isinstance(c, NcclCommunicator) and c.device == "cuda"
    import pickle

    c = pickle.loads(pickle.dumps(c))  # shipped unconfigured, like the runtime
    rdv = c.prepare()
    pickle.dumps(rdv)
    t0 = time.monotonic()
    c.setup(0, 1, rdv, timeout=60.0)
    assert time.monotonic() - t0 < 60
    yield c
    c.destroy()
    c.destroy()  # idempotent


def _slow_value(n: int = 2048) -> torch.Tensor:
    """A tensor produced by enough GPU work that an unordered reader would see it unfinished."""
    a = torch.randn(n, n, device="cuda")
    for _ in range(8):
        a = torch.tanh(a @ a / n)
    return a[:4, :4].contiguous()


def test_setup_uses_its_own_stream(comm):
    assert comm.rank == 0 and comm.world_size == 1
    assert comm._stream is not None
    assert comm._stream != torch.cuda.current_stream()


def test_allreduce_one_rank_ordered_against_compute(comm):
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the caller's current stream is `side`
        x = _slow_value()
        want = x.clone()
        comm.allreduce(x, "sum")  # comm stream waits for `side` first
        y = x * 2  # `side` waits for the all-reduce
    side.synchronize()
    torch.testing.assert_close(y, want * 2)
    for op in ("max", "min", "product", "avg"):
        t = torch.tensor([1.5, -2.0], device="cuda")
        comm.allreduce(t, op)
        assert t.tolist() == [1.5, -2.0], op
    i = torch.tensor([7, 3], device="cuda")
    comm.allreduce(i, "avg")
    assert i.tolist() == [7, 3]


def test_grouped_send_recv_to_itself(comm):
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        src = _slow_value().to(dtype) if dtype != torch.bool else _slow_value() > 0
        want = src.clone()
        dst = torch.empty_like(src)
        with comm.grouped():
            ws = comm.isend(src, 0)
            wr = comm.irecv(dst, 0)
        wr.wait()  # current stream now ordered after it
        ws.wait()
        out = (dst.to(torch.float32) + 1).cpu()
        torch.testing.assert_close(out, want.to(torch.float32).cpu() + 1)


def test_blocking_ops_refused_inside_a_group(comm):
    t = torch.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match="isend"):
        with comm.grouped():
            comm.send(t, 0)
    with pytest.raises(ValueError, match="contiguous CUDA"):
        comm.allreduce(torch.ones(2), "sum")


def test_values_through_comm_ends_on_gpu(comm):
    prefix = f"dagc-{secrets.token_hex(8)}-"
    ctl = Control(prefix + "ctl", create=True)
    try:
        waiter = Waiter(ctl, ["driver", "a0"], mode="block")
        w = Writer(prefix + "c0", 1, 4, 1 << 16, waiter)
        r = Reader(prefix + "c0", 0, waiter)
        cw = CommWriter(w, comm, {"a0": 0}, ("a0",), actor="a0")
        cr = CommReader(r, comm, 0, "cuda")
        base = _slow_value()
        values = [
            base,
            {"h": [base * 2, torch.arange(5, device="cuda")], "tag": "x"},
            (base.t(), torch.ones(3)),  # not contiguous; a CPU tensor goes to GPU
            capture(ValueError("upstream"), "a0", "fwd", 1),
        ]
        for v in values:
            with comm.grouped():  # a send to oneself needs one NCCL group
                hs = cw.isend(v, "a0")
                hr = cr.irecv()
            got = hr.wait()
            hs.wait()
            if isinstance(v, Failure):
                assert isinstance(got, Failure) and got.message == "upstream"
            elif isinstance(v, torch.Tensor):
                assert got.is_cuda
                torch.testing.assert_close(got, v)
            elif isinstance(v, dict):
                assert got["tag"] == "x"
                torch.testing.assert_close(got["h"][0], v["h"][0])
                assert torch.equal(got["h"][1], v["h"][1])
            else:
                assert got[0].is_contiguous() and got[1].is_cuda
                torch.testing.assert_close(got[0], v[0])
                torch.testing.assert_close(got[1].cpu(), v[1])
        w.close()
        r.close()
    finally:
        ctl.release()
        shm.unlink_prefix(prefix)


def test_collective_on_gpu(comm):
    coll = Collective(comm, "sum", actor="a0", step=0)
    x = _slow_value()
    before = x.clone()
    out = coll(x)
    assert out is not x and out.is_cuda
    torch.testing.assert_close(out, before)
    torch.testing.assert_close(x, before)  # input untouched
    f = capture(KeyError("k"), "a0", "fwd", 2)
    assert coll(f) is f
    bad = coll("not a tensor")
    assert isinstance(bad, Failure) and bad.type_name == "TypeError"
    torch.testing.assert_close(coll(torch.ones(3, device="cuda")).cpu(), torch.ones(3))


def test_allgather_reducescatter_on_gpu(comm):
    # one rank: an all-gather is a copy, a reduce-scatter a reduce over one rank
    x = _slow_value(4096).reshape(-1, 2)
    before = x.clone()
    g = Collective(comm, None, actor="a0", step=0, kind="allgather")(x)
    assert g.is_cuda and g.shape == x.shape and g.data_ptr() != x.data_ptr()
    torch.testing.assert_close(g, before)
    r = Collective(comm, "max", actor="a0", step=1, kind="reducescatter")(x)
    torch.testing.assert_close(r, before)
    a, b = Collective(comm, "sum", actor="a0", step=2)(torch.ones(3, device="cuda"), x)
    torch.testing.assert_close(a.cpu(), torch.ones(3))
    torch.testing.assert_close(b, before)
    torch.testing.assert_close(x, before)  # inputs untouched
    # and the communicator's own ops, in place on given buffers
    out = torch.empty_like(x)
    comm.allgather(x, out)
    comm.reducescatter(x, out, "avg")
    torch.testing.assert_close(out, before)


def _join_alone(q):
    import torch  # noqa: F401  (imported first, as in the test workers)

    from dagc.runtime.comm.nccl import NcclCommunicator

    c = NcclCommunicator()
    rdv = c.prepare()
    t0 = time.monotonic()
    try:
        c.setup(0, 2, rdv, timeout=3.0)  # rank 1 never comes
        q.put(("no error", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put((type(e).__name__, time.monotonic() - t0))


def test_setup_times_out_when_a_rank_never_joins():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_join_alone, args=(q,), daemon=True)
    p.start()
    try:
        kind, elapsed = q.get(timeout=40)
    except queue.Empty:
        kind, elapsed = "hang", None
    finally:
        p.kill()
        p.join(timeout=5)
    assert kind == "TimeoutError", (kind, elapsed)
    assert elapsed < 6
