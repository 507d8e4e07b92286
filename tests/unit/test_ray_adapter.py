"""RayCommunicator (runtime/comm/ray_adapter.py) in one process: ranks are threads, the Ray
communicator is a small in-memory one, streams are tests/fakes/fake_cuda.py's. The same
adapter under real actors (Ray's CPUCommunicator and a user's) is tests/e2e/
test_ray_communicator.py."""

from __future__ import annotations

import pickle
import threading
import time
import types

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import torch
from ray.experimental.channel.communicator import Communicator as RayComm
from ray.experimental.util.types import ReduceOp

from dagc.runtime.comm import ray_adapter as ra
from dagc.runtime.comm.gloo import GlooCommunicator
from tests.fakes import fake_cuda as fc
from tests.unit.test_nccl_fake import run_ranks


class Handle:
    def __init__(self, key):
        self._ray_actor_id = types.SimpleNamespace(hex=lambda: key)


class Shared:
    """What the ranks of one MemComm group share."""

    def __init__(self, n):
        self.n = n
        self.cv = threading.Condition()
        self.mail = {}
        self.rounds = {}


class MemComm(RayComm):
    """A Ray Communicator over threads; ``streams``: send/recv stream contexts (fake CUDA);
    ``full``: has allgather/reducescatter of its own."""

    def __init__(self, handles, shared, streams=False, full=True, recv_gives=None):
        self.handles, self.shared = handles, shared
        self.streams, self.full, self.recv_gives = streams, full, recv_gives
        self.rank = None
        self.calls = []
        self.destroyed = 0

    def copy(self):
        """What each member's unpickled copy is (the shared part is this process's)."""
        return MemComm(self.handles, self.shared, self.streams, self.full, self.recv_gives)

    def initialize(self, rank):
        self.rank = rank
        if self.streams:
            self._s, self._r = fc.Stream(), fc.Stream()

    def get_actor_handles(self):
        return self.handles

    def get_rank(self, actor):
        keys = [h._ray_actor_id.hex() for h in self.handles]
        return keys.index(actor._ray_actor_id.hex())

    def get_self_rank(self):
        return self.rank

    def get_world_size(self):
        return len(self.handles)

    def send(self, value, peer_rank):
        self.calls.append(("send", peer_rank))
        with self.shared.cv:
            self.shared.mail.setdefault((self.rank, peer_rank), []).append(value.clone())
            self.shared.cv.notify_all()

    def recv(self, shape, dtype, peer_rank, allocator=None):
        self.calls.append(("recv", peer_rank))
        with self.shared.cv:
            q = self.shared.mail.setdefault((peer_rank, self.rank), [])
            assert self.shared.cv.wait_for(lambda: q, 5)
            got = q.pop(0)
        if self.recv_gives == "none":
            return None
        if self.recv_gives == "own":
            return got
        buf = allocator(shape, dtype)
        buf.copy_(got)
        return buf

    def _all(self, tag, t):
        sh = self.shared
        with sh.cv:
            r = sh.rounds.setdefault(tag, {})
            r[self.rank] = t.clone()
            sh.cv.notify_all()
            assert sh.cv.wait_for(lambda: len(r) == sh.n, 5)
        return [r[i] for i in range(sh.n)]

    def allreduce(self, send_buf, recv_buf, op=ReduceOp.SUM):
        assert send_buf is not recv_buf
        self.calls.append(("allreduce", op))
        parts = self._all(("ar", len(self.calls)), send_buf)
        f = {
            ReduceOp.SUM: torch.add,
            ReduceOp.MAX: torch.maximum,
            ReduceOp.MIN: torch.minimum,
            ReduceOp.PRODUCT: torch.mul,
        }[op]
        out = parts[0]
        for p in parts[1:]:
            out = f(out, p)
        recv_buf.copy_(out)

    def allgather(self, send_buf, recv_buf):
        if not self.full:
            raise NotImplementedError
        recv_buf.copy_(torch.cat(self._all(("ag", len(self.calls)), send_buf)))

    def reducescatter(self, send_buf, recv_buf, op=ReduceOp.SUM):
        if not self.full:
            raise NotImplementedError
        full = torch.stack(self._all(("rs", len(self.calls)), send_buf)).sum(0)
        recv_buf.copy_(full.view(self.shared.n, *recv_buf.shape)[self.rank])

    @property
    def send_stream(self):
        if not self.streams:
            raise NotImplementedError
        return fc.StreamContext(self._s)

    @property
    def recv_stream(self):
        if not self.streams:
            raise NotImplementedError
        return fc.StreamContext(self._r)

    def destroy(self):
        self.destroyed += 1

    def get_transport_name(self):
        return "accelerator"

    @classmethod
    def generate_communicator_id(cls):
        return "x"


def copies_of(proto, n):
    """``proto`` as the runtime ships it to ``n`` members: its pickled state (no live
    parts), each with a copy of the Ray communicator."""
    out = []
    for _ in range(n):
        c = ra.RayCommunicator.__new__(ra.RayCommunicator)
        c.__setstate__(proto.__getstate__())
        c.ray_comm = proto.ray_comm.copy()
        out.append(c)
    return out


def form(n, order=None, timeout=5.0, **kw):
    """``n`` adapters set up on threads; dagc rank r is the actor Ray lists at
    ``order[r]`` (default: reversed, so every peer needs translating)."""
    order = order or list(range(n))[::-1]
    handles = [Handle(f"actor{i}") for i in range(n)]
    proto = ra.adapt(MemComm(handles, Shared(n), **kw))
    copies = copies_of(proto, n)
    rdv = pickle.loads(pickle.dumps(copies[0].prepare()))

    def setup(r):
        c = copies[r]
        c._own_ray_rank = lambda: c.ray_comm.get_rank(handles[order[r]])
        c.setup(r, n, rdv, timeout)
        return c

    got = run_ranks(n, setup)
    for g in got:
        if isinstance(g, BaseException):
            raise g
    return got


def test_adapt_passes_dagc_communicators_and_refuses_other_objects():
    g = GlooCommunicator()
    assert ra.adapt(g) is g
    with pytest.raises(ValueError, match="a dagc.Communicator or a Ray Communicator"):
        ra.adapt(object(), "transport")


def test_the_same_actor_twice_and_a_wrong_world_size_are_refused():
    h = Handle("a")
    with pytest.raises(ValueError, match="same actor twice"):
        ra.RayCommunicator(MemComm([h, h], Shared(2)))
    bad = MemComm([Handle("a"), Handle("b")], Shared(2))
    bad.get_world_size = lambda: 3
    with pytest.raises(ValueError, match="get_world_size\\(\\) is 3"):
        ra.RayCommunicator(bad)


def test_set_up_finds_each_members_ray_rank_and_p2p_translates_peers():
    cs = form(3)
    assert [(c.rank, c.ray_rank) for c in cs] == [(0, 2), (1, 1), (2, 0)]
    assert [c.ray_comm.get_self_rank() for c in cs] == [2, 1, 0]  # initialize(Ray rank)
    assert cs[0].device == torch.device("cpu")

    def rank(r):
        c = cs[r]
        if r == 0:
            c.send(torch.tensor([1.0, 2.0]), 2)
            c.isend(torch.tensor([3.0]), 1).wait()
            return None
        t = torch.zeros(2 if r == 2 else 1)
        (c.recv if r == 2 else (lambda t, p: c.irecv(t, p).wait()))(t, 0)
        return t.tolist()

    assert run_ranks(3, rank) == [None, [3.0], [1.0, 2.0]]
    assert cs[0].ray_comm.calls == [("send", 0), ("send", 1)]  # Ray ranks of dagc 2, 1
    assert cs[2].ray_comm.calls == [("recv", 2)]


@pytest.mark.parametrize("full", [True, False])
def test_collectives_native_and_built_on_allreduce(full):
    cs = form(2, full=full)

    def rank(r):
        c = cs[r]
        t = torch.tensor([1.0 + r, 5.0 * r])
        c.allreduce(t, "max")
        g = torch.empty(4)
        c.allgather(torch.tensor([float(c.ray_rank)] * 2), g)
        s = torch.empty(1, 2)
        c.reducescatter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), s, "sum")
        with pytest.raises(ValueError, match="unknown reduce op"):
            c.allreduce(t, "median")
        return t.tolist(), g.tolist(), s.tolist(), c.rank

    got = run_ranks(2, rank)
    for t, g, s, r in got:
        assert t == [2.0, 5.0]
        assert g == [0.0, 0.0, 1.0, 1.0]  # in Ray rank order
        assert s == [[2.0, 4.0]] if cs[r].ray_rank == 0 else s == [[6.0, 8.0]]
    assert cs[0].rank == 0 and cs[1].rank == 1  # dagc ranks put back
    assert cs[0]._no_allgather is (not full)


def test_max_and_min_from_sum_where_the_communicator_cannot():
    cs = form(2)
    for c in cs:
        c._minmax_by_sum = True

    def rank(r):
        t = torch.tensor([3 * r - 1, 7 - r], dtype=torch.int64)
        cs[r].allreduce(t, "max")
        u = torch.tensor([3 * r - 1, 7 - r], dtype=torch.int64)
        cs[r].allreduce(u, "min")
        return t.tolist(), u.tolist(), [op for _, op in cs[r].ray_comm.calls]

    for t, u, ops in run_ranks(2, rank):
        assert t == [2, 7] and u == [-1, 6] and ops == [ReduceOp.SUM, ReduceOp.SUM]


def test_streams_carry_isend_and_irecv_and_their_works_order_the_caller(monkeypatch):
    fc.install(monkeypatch)
    cs = form(2, streams=True)
    assert cs[0]._streams

    def rank(r):
        c = cs[r]
        if r == 0:
            w = c.isend(torch.tensor([9.0]), 1)
            w.wait()
            return None
        t = torch.zeros(1)
        w = c.irecv(t, 0)
        assert w.event.stream == c.ray_comm._r.cuda_stream and w.is_completed()
        w.wait()
        return t.tolist(), w.event.id, fc.current_stream().cuda_stream, c.ray_comm._r

    _, (t, ev, cur, rs) = run_ranks(2, rank)
    assert t == [9.0]
    assert ("wait_stream", rs.cuda_stream, cur) in fc.entries("wait_stream")
    assert ("wait", cur, ev) in fc.entries("wait")


@pytest.mark.parametrize("gives,match", [("none", "returned None"), ("own", None)])
def test_recv_that_returns_its_own_tensor_is_copied_or_refused(gives, match):
    cs = form(2, recv_gives=gives)

    def rank(r):
        if r == 0:
            cs[0].send(torch.tensor([1.0, 2.0]), 1)
            cs[0].send(torch.tensor([1.0, 2.0, 3.0]), 1)
            return None
        t = torch.zeros(2)
        cs[1].recv(t, 0)
        cs[1].recv(torch.zeros(2), 0)  # 3 elements arrive
        return t.tolist()

    _, got = run_ranks(2, rank)
    if match:
        assert isinstance(got, RuntimeError) and match in str(got)
    else:
        assert isinstance(got, RuntimeError) and "returned a (3,)" in str(got)


def test_an_actor_outside_the_group_stops_every_member_at_once():
    handles = [Handle("a"), Handle("b")]
    proto = ra.adapt(MemComm(handles, Shared(2)))
    copies = copies_of(proto, 2)
    rdv = copies[0].prepare()
    outsider = Handle("z")

    def setup(r):
        c = copies[r]
        c._own_ray_rank = lambda: c.ray_comm.get_rank(outsider if r == 1 else handles[0])
        c.setup(r, 2, rdv, 30.0)

    t0 = time.monotonic()
    e0, e1 = run_ranks(2, setup)
    assert time.monotonic() - t0 < 10
    assert "outside the MemComm's group" in str(e1)
    assert "another member failed" in str(e0) and "outside" in str(e0)
    for c in copies:
        c.destroy()


def test_a_member_that_never_comes_times_out_and_destroy_is_idempotent():
    handles = [Handle("a"), Handle("b")]
    c = ra.adapt(MemComm(handles, Shared(2)))
    rdv = c.prepare()
    c._own_ray_rank = lambda: 0
    with pytest.raises(TimeoutError, match=r"ranks \[1\] never joined"):
        c.setup(0, 2, rdv, 0.3)
    c.destroy()
    cs = form(2)
    cs[0].destroy()
    cs[0].destroy()
    assert cs[0].ray_comm.destroyed == 1
    with pytest.raises(RuntimeError, match="not set up"):
        ra.adapt(MemComm(handles, Shared(2))).allreduce(torch.zeros(1), "sum")
    assert "Ray rank" in repr(cs[1]) and "not set up" in repr(ra.adapt(MemComm(handles, Shared(2))))
