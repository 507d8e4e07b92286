"""The communicator layer on CPU: GlooCommunicator, CommWriter/CommReader over real
shared-memory channels, and Collective - in spawned processes, without Ray.

A module-scoped pool of three spawned worker processes runs the per-rank halves of each test
(torch is imported once per worker, not once per test). Every wait has a timeout; a test
that times out kills the pool (a fresh one serves the next test) and fails saying which
ranks hung. Ranks map to workers: rank r runs on worker r.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import pickle
import queue
import secrets
import time
import traceback
from collections import namedtuple

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import torch

from dagc.runtime.channels import Control, Reader, Waiter, Writer, create_segment, shm
from dagc.runtime.comm.backends import make_communicator
from dagc.runtime.comm.base import Communicator
from dagc.runtime.comm.collective import Collective
from dagc.runtime.comm.gloo import GlooCommunicator
from dagc.runtime.comm.p2p import CommReader, CommWriter
from dagc.runtime.comm.packing import fill as _fill
from dagc.runtime.comm.packing import strip as _strip
from dagc.runtime.failure import Failure, capture

WORKERS = 3
SETUP_TIMEOUT = 10.0
PROCS = ["driver", "a0", "a1", "a2"]
ACTORS = ("a0", "a1", "a2")  # actor a<r> has rank r


@dataclasses.dataclass(frozen=True)
class Batch:
    x: object
    name: str
    extra: object = None


Pair = namedtuple("Pair", "left right")


# =========================================================================================
# worker side (runs in the spawned processes)

_GROUPS: dict = {}  # group id -> communicator prepared on this worker (rank 0)


def _serve(idx, inbox, outbox):
    import torch  # noqa: F401  (warm the import before the first task)

    outbox.put((idx, True, "ready"))
    while True:
        msg = inbox.get()
        if msg is None:
            return
        name, args = msg
        try:
            outbox.put((idx, True, TASKS[name](*args)))
        except BaseException:  # noqa: BLE001 - reported to the test
            outbox.put((idx, False, traceback.format_exc()))


def t_prepare(gid, kwargs):
    comm = GlooCommunicator(**kwargs)
    _GROUPS[gid] = comm
    return comm.prepare()


def _join(gid, rank, ws, rdv, timeout=SETUP_TIMEOUT):
    """rank 0 sets up the instance it prepared; the others a pickled fresh copy."""
    comm = _GROUPS.pop(gid, None) if rank == 0 else None
    if comm is None:
        comm = pickle.loads(pickle.dumps(GlooCommunicator()))
    comm.setup(rank, ws, rdv, timeout)
    return comm


def _ends(prefix):
    ctl = Control(prefix + "ctl")
    return ctl, Waiter(ctl, PROCS, mode="block")


def t_p2p(gid, rank, ws, rdv):
    comm = _join(gid, rank, ws, rdv)
    try:
        tensors = [
            torch.arange(6, dtype=torch.float32).reshape(2, 3) + rank,
            torch.tensor([rank, 7, -1], dtype=torch.int64),
            torch.tensor([True, False, rank == 0]),
            torch.full((4,), 1.5 + rank, dtype=torch.bfloat16),
        ]
        got = []
        if rank == 0:
            for t in tensors:
                comm.send(t, 1)
            for t in tensors:
                buf = torch.empty_like(t)
                comm.recv(buf, 1)
                got.append(buf)
        else:
            for t in tensors:
                buf = torch.empty_like(t)
                comm.recv(buf, 0)
                got.append(buf)
            for t in tensors:
                comm.send(t, 0)
        return got
    finally:
        comm.destroy()


def t_async_order(gid, rank, ws, rdv):
    comm = _join(gid, rank, ws, rdv)
    try:
        if rank == 0:
            works = [comm.isend(torch.full((3,), float(i)), 1) for i in range(4)]
            for w in reversed(works):
                w.wait()
            return None
        bufs = [torch.empty(3) for _ in range(4)]
        works = [comm.irecv(b, 0) for b in bufs]
        for i in (2, 0, 3, 1):
            works[i].wait()
        return [b.tolist() for b in bufs]
    finally:
        comm.destroy()


def t_allreduce(gid, rank, ws, rdv):
    comm = _join(gid, rank, ws, rdv)
    try:
        out = {}
        for op in ("sum", "avg", "max", "min", "product"):
            t = torch.tensor([rank + 1.0, -(rank + 1.0), 2.0])
            comm.allreduce(t, op)
            out[op] = t.tolist()
        t = torch.tensor([rank * 3 + 1], dtype=torch.int64)
        comm.allreduce(t, "avg")
        out["avg_int"] = t.tolist()
        return out
    finally:
        comm.destroy()


def _values(rank):
    """What the writer sends, in order, on a comm channel (built the same on every rank)."""
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    shared = torch.ones(2, dtype=torch.int32)
    return [
        t,  # bare tensor
        {
            "a": [t * 2, torch.tensor([1, 2]), "text"],
            "n": 5,  # dict of list of tensors
            "b": {"deep": (torch.zeros(1), None)},
        },
        Batch(x=torch.full((2, 2), 3.0), name="batch", extra=[1, 2]),  # frozen dataclass
        Pair(torch.tensor([9.0]), torch.tensor([8.0])),  # namedtuple
        (shared, shared),  # one tensor, twice
        torch.empty(0, 5),  # no elements
        t.t(),  # not contiguous
        42,  # no tensors at all
        capture(ValueError("upstream broke"), "a0", "fwd", 3),  # a Failure: no tensors
        [torch.tensor([True, False]), torch.ones(3, dtype=torch.bfloat16)],
    ]


def t_channel(gid, rank, ws, rdv, prefix, overlap):
    """rank 0 writes _values() on channel c0 to every other rank; they read them."""
    comm = _join(gid, rank, ws, rdv)
    ctl, waiter = _ends(prefix)
    readers = ACTORS[1:ws]
    try:
        if rank == 0:
            w = Writer(prefix + "c0", len(readers), 4, 1 << 16, waiter, create=False)
            cw = CommWriter(w, comm, {a: i for i, a in enumerate(ACTORS)}, readers, actor="a0")
            handles = []
            for v in _values(rank):
                for peer in readers:
                    if overlap:
                        handles.append(cw.isend(v, peer))
                    else:
                        cw.send(v, peer)
            for h in handles:
                h.wait()
            # a value whose non-tensor part cannot pickle reaches the readers as a Failure
            for peer in readers:
                cw.send({"t": torch.ones(2), "f": lambda: 0}, peer)
            w.close()
            return None
        r = Reader(prefix + "c0", rank - 1, waiter)
        cr = CommReader(r, comm, 0, "cpu")
        if overlap:
            hs = [cr.irecv() for _ in _values(rank)]
            got = [h.wait() for h in hs]
        else:
            got = [cr.recv() for _ in _values(rank)]
        bad = cr.recv()
        r.close()
        return got, (type(bad).__name__, getattr(bad, "type_name", ""), getattr(bad, "message", ""))
    finally:
        comm.destroy()
        ctl.release()


def t_deferred(gid, rank, ws, rdv, prefix):
    """An irecv issued before its metadata exists must not block: the reader then writes
    the 'go' the writer waits for before it produces the value (the hoisted-receive case)."""
    comm = _join(gid, rank, ws, rdv)
    ctl, waiter = _ends(prefix)
    try:
        if rank == 0:
            go = Reader(prefix + "go", 0, waiter)
            w = Writer(prefix + "c0", 1, 4, 1 << 16, waiter, create=False)
            cw = CommWriter(w, comm, {"a0": 0, "a1": 1}, ("a1",))
            x = go.read()
            cw.isend(torch.full((3,), float(x)), "a1").wait()
            cw.send({"second": torch.tensor([x + 1])}, "a1")
            go.close()
            w.close()
            return None
        go = Writer(prefix + "go", 1, 4, 1 << 10, waiter, create=False)
        r = Reader(prefix + "c0", 0, waiter)
        cr = CommReader(r, comm, 0, "cpu")
        h1 = cr.irecv()  # nothing published yet: deferred
        h2 = cr.irecv()
        deferred = not h1.posted and not h2.posted
        go.write(5)
        second = h2.wait()  # posts h1 first, in issue order
        first = h1.wait()
        go.close()
        r.close()
        return deferred, first.tolist(), second["second"].tolist()
    finally:
        comm.destroy()
        ctl.release()


def t_collective(gid, rank, ws, rdv, inputs):
    comm = _join(gid, rank, ws, rdv)
    try:
        out = []
        for i, (kind, op) in enumerate(inputs[rank]):
            coll = Collective(comm, op, actor=ACTORS[rank], step=i)
            if kind == "fail":
                v = capture(KeyError(f"bad input on rank {rank}"), ACTORS[rank], "fwd", 1)
            elif kind == "none":
                v = None
            elif kind == "shape":
                v = torch.ones(rank + 1)
            elif kind == "int16":  # a dtype gloo cannot reduce
                v = torch.ones(2, dtype=torch.int16)
            else:
                v = torch.tensor([float(rank + 1), 2.0])
            before = v.clone() if isinstance(v, torch.Tensor) else None
            res = coll(v)
            if before is not None:
                assert torch.equal(v, before), "the collective modified its input"
                assert res is not v
            if res.__class__ is Failure:
                out.append(("failure", res.type_name, res.message, res.actor))
            else:
                out.append(("ok", res.tolist()))
        return out
    finally:
        comm.destroy()


class _OnlyAllreduce(Communicator):
    """A custom communicator with send/recv/allreduce only: the base class's allgather and
    reducescatter defaults are what runs."""

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size

    def allreduce(self, tensor, op="sum"):
        self.inner.allreduce(tensor, op)


def t_gather_scatter(gid, rank, ws, rdv):
    gloo = _join(gid, rank, ws, rdv)
    try:
        out = {}
        for name, comm in (("gloo", gloo), ("default", _OnlyAllreduce(gloo))):
            t = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * rank
            g = torch.empty(3 * ws, 2)
            comm.allgather(t, g)
            out[name, "allgather"] = g.tolist()
            b = torch.tensor([rank % 2 == 0, False, True])
            gb = torch.empty(3 * ws, dtype=torch.bool)
            comm.allgather(b, gb)
            out[name, "allgather_bool"] = gb.tolist()
            for op in ("sum", "max", "avg"):
                r = torch.empty(1, 2)
                comm.reducescatter(t, r, op)
                out[name, op] = r.tolist()
            assert torch.equal(t, torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * rank)
        steps = [
            ("allgather", None, [torch.ones(2, 2) * rank]),
            ("reducescatter", "sum", [torch.arange(3.0) + rank]),
            ("allreduce", "sum", [torch.ones(2) * rank, torch.ones(1, 3)]),
            ("allreduce", "sum", [torch.ones(2), torch.ones(2, dtype=torch.int64)]),
            ("reducescatter", "sum", [torch.ones(4)]),
            ("allgather", None, [torch.tensor(1.0)]),
            ("allgather", None, [torch.ones(rank + 1)]),
            ("allgather", None, [torch.ones(1) * rank]),
        ]
        for i, (kind, op, values) in enumerate(steps):
            res = Collective(gloo, op, actor=ACTORS[rank], step=i, kind=kind)(*values)
            if res.__class__ is Failure:
                out[i] = ("failure", res.type_name, res.message)
            elif isinstance(res, tuple):
                out[i] = ("ok", [x.tolist() for x in res])
            else:
                out[i] = ("ok", res.tolist())
        return out
    finally:
        gloo.destroy()


def t_timeout(gid, rank, ws, rdv, timeout):
    t0 = time.monotonic()
    try:
        _join(gid, rank, ws, rdv, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return type(e).__name__, str(e)[:300], time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


def _loop_hook(exc, value):
    """What an actor loop installs as on_encode_error (worker.Loop._encode_error)."""
    return capture(
        TypeError(
            f"a0:Stage produced a {type(value).__name__} that cannot be "
            f"pickled to send it on: {exc}. Return picklable values."
        ),
        "a0",
        "<send>",
        -1,
    )


def _encode_rounds():
    """Per round: a good value, one whose non-tensor part cannot pickle, a good one."""
    import threading

    return [
        [
            torch.full((2,), 10.0 * i + 1),
            {"t": torch.full((2,), -1.0), "lock": threading.Lock()},
            {"t": torch.full((3,), 10.0 * i + 3), "n": i},
        ]
        for i in range(3)
    ]


def t_encode_error(gid, rank, ws, rdv, prefix, mode):
    """As in an actor loop (on_encode_error installed on the metadata writer), rank 0 sends
    _encode_rounds() to every other rank with ``mode`` send / isend / overlap (isend and
    irecv); the readers report what each receive returned."""
    comm = _join(gid, rank, ws, rdv)
    ctl, waiter = _ends(prefix)
    readers = ACTORS[1:ws]
    rounds = _encode_rounds()
    try:
        if rank == 0:
            w = Writer(prefix + "c0", len(readers), 4, 1 << 16, waiter, create=False)
            w.on_encode_error = _loop_hook
            cw = CommWriter(w, comm, {a: i for i, a in enumerate(ACTORS)}, readers, actor="a0")
            for values in rounds:
                for v in values:
                    if mode == "send":
                        for peer in readers:
                            cw.send(v, peer)
                    else:
                        for h in [cw.isend(v, peer) for peer in readers]:
                            h.wait()
            w.close()
            return None
        r = Reader(prefix + "c0", rank - 1, waiter)
        cr = CommReader(r, comm, 0, "cpu")
        out = []
        for values in rounds:
            if mode == "overlap":
                got = [h.wait() for h in [cr.irecv() for _ in values]]
            else:
                got = [cr.recv() for _ in values]
            for g in got:
                if g.__class__ is Failure:
                    out.append(("failure", g.type_name, g.message, g.actor, g.method))
                elif isinstance(g, dict):
                    out.append(("dict", g["t"].tolist(), g["n"]))
                else:
                    out.append(("tensor", g.tolist()))
        r.close()
        return out
    finally:
        comm.destroy()
        ctl.release()


TASKS = {
    f.__name__: f
    for f in (
        t_prepare,
        t_p2p,
        t_async_order,
        t_allreduce,
        t_channel,
        t_deferred,
        t_collective,
        t_gather_scatter,
        t_timeout,
        t_encode_error,
    )
}


# =========================================================================================
# test side


class Pool:
    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(
                target=_serve,
                args=(i, self.inboxes[i], self.outbox),
                daemon=True,
                name=f"dagc-test-rank{i}",
            )
            for i in range(n)
        ]
        for p in self.procs:
            p.start()
        self.broken = False
        # start-up (a torch import per worker) is not part of any test's time limit
        deadline = time.monotonic() + 120
        ready = set()
        while len(ready) < n:
            try:
                idx, _, _ = self.outbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise AssertionError(
                    f"test workers {sorted(set(range(n)) - ready)} did not start within 120 s"
                ) from None
            ready.add(idx)

    def run(self, name: str, per_rank: dict, timeout: float = 15.0) -> dict:
        for idx, args in per_rank.items():
            self.inboxes[idx].put((name, args))
        results, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < len(per_rank):
            try:
                idx, ok, res = self.outbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.broken = True
                done = set(results) | set(errors)
                raise AssertionError(
                    f"{name}: ranks {sorted(set(per_rank) - done)} did not "
                    f"finish within {timeout} s (hang?); errors: {errors}"
                ) from None
            (results if ok else errors)[idx] = res
        if errors:
            raise AssertionError(
                f"{name} failed on ranks {sorted(errors)}:\n" + "\n".join(errors.values())
            )
        return results

    def close(self) -> None:
        for q in self.inboxes:
            try:
                q.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + 1  # then kill: nothing of theirs needs saving
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=3)


_POOL: list = []


@pytest.fixture(scope="module")
def _pool_holder():
    yield _POOL
    while _POOL:
        _POOL.pop().close()


@pytest.fixture
def pool(_pool_holder):
    if _pool_holder and _pool_holder[0].broken:
        _pool_holder.pop().close()
    if not _pool_holder:
        _pool_holder.append(Pool(WORKERS))
    yield _pool_holder[0]


def run_group(pool, task, ws, *args, timeout=15.0, comm_kwargs=None):
    """prepare on rank 0's worker, then run ``task`` on ranks 0..ws-1 (each sets up)."""
    gid = secrets.token_hex(6)
    rdv = pool.run("t_prepare", {0: (gid, comm_kwargs or {})})[0]
    per_rank = {r: (gid, r, ws, rdv, *args) for r in range(ws)}
    return pool.run(task, per_rank, timeout=timeout)


@pytest.fixture
def shm_prefix():
    prefix = f"dagc-{secrets.token_hex(8)}-"
    ctl = Control(prefix + "ctl", create=True)
    yield prefix
    ctl.release()
    shm.unlink_prefix(prefix)


def make_channel(name: str, nreaders: int, capacity: int = 1 << 16) -> None:
    create_segment(name, nreaders, 4, capacity).close()


def same(a, b) -> bool:
    """Deep equality where tensors compare by dtype, shape and values."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, Failure):
        return (a.type_name, a.message, a.actor, a.step) == (
            b.type_name,
            b.message,
            b.actor,
            b.step,
        )
    return a == b


def check_values(got) -> None:
    want = _values(0)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert same(g, w), f"value {i}: got {g!r}, want {w!r}"
    shared = got[4]
    assert shared[0] is shared[1], "one tensor sent twice must come back as one tensor"
    assert got[6].is_contiguous()


# -- gloo communicator ---------------------------------------------------------------------
def test_gloo_send_recv_both_directions(pool):
    res = run_group(pool, "t_p2p", 2)
    for rank, peer in ((0, 1), (1, 0)):
        want = [
            torch.arange(6, dtype=torch.float32).reshape(2, 3) + peer,
            torch.tensor([peer, 7, -1], dtype=torch.int64),
            torch.tensor([True, False, peer == 0]),
            torch.full((4,), 1.5 + peer, dtype=torch.bfloat16),
        ]
        for g, w in zip(res[rank], want):
            assert same(g, w), (rank, g, w)


def test_gloo_isend_irecv_wait_out_of_order(pool):
    res = run_group(pool, "t_async_order", 2)
    assert res[1] == [[float(i)] * 3 for i in range(4)]  # matched in issue order


def test_gloo_allreduce_ops_three_ranks(pool):
    res = run_group(pool, "t_allreduce", 3)
    want = {
        "sum": [6.0, -6.0, 6.0],
        "avg": [2.0, -2.0, 2.0],
        "max": [3.0, -1.0, 2.0],
        "min": [1.0, -3.0, 2.0],
        "product": [6.0, -6.0, 8.0],
        "avg_int": [4],
    }  # (1 + 4 + 7) // 3
    for rank in range(3):
        assert res[rank] == want, rank


def test_gloo_setup_times_out_when_a_rank_never_joins(pool):
    timeout = 1.5
    # only ranks 0 and 1 of a group of 3 show up
    gid = secrets.token_hex(6)
    rdv = pool.run("t_prepare", {0: (gid, {})})[0]
    res = pool.run("t_timeout", {r: (gid, r, 3, rdv, timeout) for r in (0, 1)}, timeout=timeout + 8)
    for rank in (0, 1):
        kind, msg, elapsed = res[rank]
        assert kind == "TimeoutError", (rank, kind, msg)
        assert "set-up" in msg and "rank" in msg
        assert elapsed < timeout + 3, elapsed


def test_gloo_single_rank_in_process_and_destroy_idempotent():
    comm = make_communicator("gloo")
    assert isinstance(comm, GlooCommunicator) and comm.device == "cpu"
    comm.destroy()  # before set-up: harmless
    copy = pickle.loads(pickle.dumps(comm))  # what the runtime ships
    rdv = copy.prepare()
    assert set(rdv) >= {"host", "port", "prefix"}
    pickle.dumps(rdv)
    copy.setup(0, 1, rdv, 5.0)
    t = torch.tensor([1.0, 2.0])
    copy.allreduce(t, "avg")
    assert t.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown reduce op"):
        copy.allreduce(t, "median")
    pickle.loads(pickle.dumps(copy))  # live state never travels
    copy.destroy()
    copy.destroy()
    with pytest.raises(ValueError, match="unknown communicator backend"):
        make_communicator("mpi")


# -- comm channel ends ---------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
def test_comm_channel_values_one_reader(pool, shm_prefix, overlap):
    make_channel(shm_prefix + "c0", 1)
    res = run_group(pool, "t_channel", 2, shm_prefix, overlap)
    check_values(res[1][0])
    kind, type_name, msg = res[1][1]
    assert (kind, type_name) == ("Failure", "TypeError") and "cannot be pickled" in msg


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
def test_comm_channel_values_two_readers(pool, shm_prefix, overlap):
    make_channel(shm_prefix + "c0", 2)
    res = run_group(pool, "t_channel", 3, shm_prefix, overlap)
    for rank in (1, 2):
        check_values(res[rank][0])
        assert res[rank][1][:2] == ("Failure", "TypeError")


@pytest.mark.parametrize("mode", ["send", "isend", "overlap"])
def test_unpicklable_metadata_is_a_failure_for_every_reader_and_sends_nothing(
    pool, shm_prefix, mode
):
    """With the loop's on_encode_error installed (as worker.py does), a value holding a
    tensor and a lock reaches both readers as a Failure naming the lock, no tensor is sent
    for it (before the fix the writer still sent them: gloo hung, or the next receive paired
    with the stale send), and the next values arrive intact."""
    make_channel(shm_prefix + "c0", 2)
    res = run_group(pool, "t_encode_error", 3, shm_prefix, mode, timeout=20)
    for rank in (1, 2):
        got = res[rank]
        assert len(got) == 9
        for i in range(3):
            good1, bad, good2 = got[3 * i : 3 * i + 3]
            assert good1 == ("tensor", [10.0 * i + 1] * 2), (rank, i, good1)
            assert good2 == ("dict", [10.0 * i + 3] * 3, i), (rank, i, good2)
            kind, type_name, msg, actor, method = bad
            assert (kind, type_name, actor, method) == ("failure", "TypeError", "a0", "<send>"), bad
            assert msg.startswith("a0:Stage produced a dict that cannot be pickled"), msg
            assert "value['lock'] (lock) cannot be pickled" in msg, msg
            assert "_thread.lock" in msg and "tensor-transport edge (to a1, a2)" in msg, msg


class _RecordingComm(Communicator):
    """In-process stand-in for a communicator: sends queue per rank; a receive with nothing
    queued fails at once (instead of hanging, as gloo would)."""

    def __init__(self):
        self.rank, self.world_size = 0, 3
        self.queues = {1: [], 2: []}

    def send(self, tensor, peer):
        self.queues[peer].append(tensor.clone())

    def recv(self, tensor, peer):
        raise AssertionError("the writer's end never receives here")


class _PeerView(Communicator):
    """Rank ``rank``'s view of a _RecordingComm: recv pops what was sent to it."""

    def __init__(self, comm, rank):
        self.comm, self.rank, self.world_size = comm, rank, 3

    def recv(self, tensor, peer):
        q = self.comm.queues[self.rank]
        assert q, f"rank {self.rank} receives a tensor that was never sent"
        tensor.copy_(q.pop(0))


def _metadata_ends(shm_prefix, transport: str):
    """A metadata channel "c0" with two readers, on a shared-memory ring or over TCP (a
    reader on another node): (writer, readers, control ends to release)."""
    if transport == "tcp":
        from dagc.runtime.channels.tcp import TcpReader, TcpWriter, new_secret

        secret = new_secret()
        w = TcpWriter("c0", 2, 4, secret, tls=None)
        host, port = w.listen("127.0.0.1")
        return w, [TcpReader(host, port, secret, i, channel="c0", tls=None) for i in (0, 1)], []
    make_channel(shm_prefix + "c0", 2)
    ctl, waiter = _ends(shm_prefix)
    w = Writer(shm_prefix + "c0", 2, 4, 1 << 16, waiter, create=False)
    return w, [Reader(shm_prefix + "c0", i, waiter) for i in (0, 1)], [ctl]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_unpicklable_metadata_sends_no_tensor_over_either_metadata_channel(shm_prefix, transport):
    """The same, in one process, with the metadata on a shared-memory ring or on a TCP
    channel (a reader on another node): write() says the value was replaced, so
    CommWriter sends no tensor at all for it."""
    import threading

    comm = _RecordingComm()
    w, rs, ends = _metadata_ends(shm_prefix, transport)
    try:
        w.on_encode_error = _loop_hook
        cw = CommWriter(w, comm, {"a0": 0, "a1": 1, "a2": 2}, ("a1", "a2"), actor="a0")
        crs = [CommReader(r, _PeerView(comm, rank), 0) for rank, r in ((1, rs[0]), (2, rs[1]))]
        cw.send({"t": torch.ones(2), "lock": threading.Lock()}, "a1")
        assert comm.queues == {1: [], 2: []}, "a tensor was sent for a value that failed"
        cw.isend({"t": torch.ones(2), "lock": threading.Lock()}, "a2").wait()
        assert comm.queues == {1: [], 2: []}, "a tensor was sent for a value that failed"
        for cr in crs:
            bad = cr.recv()
            assert bad.__class__ is Failure and "value['lock'] (lock)" in bad.message
        for peer in ("a1", "a2"):
            cw.send(torch.full((3,), 7.0), peer)
        for cr in crs:
            assert cr.recv().tolist() == [7.0] * 3
        assert comm.queues == {1: [], 2: []}
        # the flag CommWriter relies on: write() says when on_encode_error's value went out
        w.on_encode_error = _loop_hook
        assert w.write({"lock": threading.Lock()}) is True
        assert w.write({"fine": 1}) is None
    finally:
        for e in [w, *rs]:
            e.close()
        for e in ends:
            e.release()


def _explode(msg):
    raise RuntimeError(msg)


class _LoadsBadly:
    """Pickles fine; raises when unpickled (as a class the reader cannot import would)."""

    def __reduce__(self):
        return (_explode, ("_LoadsBadly cannot be loaded",))


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_skeleton_that_fails_to_unpickle_still_drains_its_tensors(shm_prefix, transport):
    """The writer pickles the skeleton and sends the tensors; the readers cannot unpickle
    it. Each reader receives the tensors all the same (the specs decode apart from the
    skeleton), drops them, and returns a Failure naming the channel: nothing is left
    queued for the next value, whose sizes differ (blocking recv and irecv alike)."""
    comm = _RecordingComm()
    w, rs, ends = _metadata_ends(shm_prefix, transport)
    try:
        cw = CommWriter(w, comm, {"a0": 0, "a1": 1, "a2": 2}, ("a1", "a2"), actor="a0")
        crs = [CommReader(r, _PeerView(comm, rank), 0) for rank, r in ((1, rs[0]), (2, rs[1]))]
        for blocking in (True, False):
            value = {"t": torch.ones(5), "u": torch.zeros(2, 2), "bad": _LoadsBadly()}
            cw.send(value, "a1")
            cw.isend(value, "a2").wait()
            assert [len(q) for q in comm.queues.values()] == [2, 2]  # the writer sent
            for cr in crs:
                bad = cr.recv() if blocking else cr.irecv().wait()
                assert bad.__class__ is Failure, bad
                assert "on channel c0 could not be unpickled" in bad.message, bad.message
                assert "_LoadsBadly cannot be loaded" in bad.message, bad.message
            assert comm.queues == {1: [], 2: []}, "the readers left tensors behind"
            for peer in ("a1", "a2"):
                cw.send({"t": torch.full((3,), 7.0), "n": 1}, peer)
            for cr in crs:
                got = cr.recv() if blocking else cr.irecv().wait()
                assert got["t"].tolist() == [7.0] * 3 and got["n"] == 1
    finally:
        for e in [w, *rs]:
            e.close()
        for e in ends:
            e.release()


def test_unpicklable_part_names_the_path():
    import threading

    from dagc.runtime.comm.packing import unpicklable_part as _unpicklable_part

    lock = threading.Lock()
    assert _unpicklable_part({"a": [1, (2, lock)]}) == ("value['a'][1][1]", lock)
    assert _unpicklable_part(Batch(x=[lock], name="n")) == ("value.x[0]", lock)
    assert _unpicklable_part([1, 2]) is None


def test_irecv_does_not_block_on_missing_metadata(pool, shm_prefix):
    make_channel(shm_prefix + "c0", 1)
    make_channel(shm_prefix + "go", 1, 1 << 10)
    res = run_group(pool, "t_deferred", 2, shm_prefix)
    assert res[1] == (True, [5.0, 5.0, 5.0], [6])


# -- collectives ---------------------------------------------------------------------------
def test_collective_ops_return_new_tensors(pool):
    ops = [("ok", "sum"), ("ok", "max"), ("ok", "avg")]
    res = run_group(pool, "t_collective", 3, {r: ops for r in range(3)})
    for rank in range(3):
        assert res[rank] == [("ok", [6.0, 6.0]), ("ok", [3.0, 2.0]), ("ok", [2.0, 2.0])]


def test_collective_with_a_failed_participant_does_not_hang(pool):
    inputs = {
        0: [("ok", "sum"), ("ok", "sum"), ("ok", "sum"), ("ok", "sum")],
        1: [("fail", "sum"), ("ok", "sum"), ("none", "sum"), ("ok", "sum")],
        2: [("fail", "sum"), ("ok", "sum"), ("ok", "sum"), ("ok", "sum")],
    }
    res = run_group(pool, "t_collective", 3, inputs, timeout=20)
    # step 0: ranks 1 and 2 failed; each keeps its own, rank 0 gets rank 1's (the lowest)
    assert res[0][0] == ("failure", "KeyError", "'bad input on rank 1'", "a1")
    assert res[1][0] == ("failure", "KeyError", "'bad input on rank 1'", "a1")
    assert res[2][0] == ("failure", "KeyError", "'bad input on rank 2'", "a2")
    # step 1: the group is still consistent afterwards
    for rank in range(3):
        assert res[rank][1] == ("ok", [6.0, 6.0])
    # step 2: a non-tensor input is a TypeError everywhere, named where it happened
    for rank in range(3):
        kind, type_name, msg, actor = res[rank][2]
        assert (kind, type_name, actor) == ("failure", "TypeError", "a1"), res[rank][2]
        assert "expects a torch.Tensor, got NoneType" in msg
    for rank in range(3):
        assert res[rank][3] == ("ok", [6.0, 6.0])


def test_collective_bad_inputs_fail_everywhere_and_the_group_survives(pool):
    inputs = {
        r: [("shape", "sum"), ("ok", "sum"), ("int16", "max"), ("ok", "sum")] for r in range(3)
    }
    res = run_group(pool, "t_collective", 3, inputs)
    for rank in range(3):
        kind, type_name, msg, actor = res[rank][0]
        assert (kind, type_name, actor) == ("failure", "ValueError", ACTORS[rank])
        assert "differ in shape" in msg
        assert res[rank][1] == ("ok", [6.0, 6.0])
        assert res[rank][2][:2] == ("failure", "RuntimeError"), res[rank][2]
        assert res[rank][3] == ("ok", [6.0, 6.0])


def test_allgather_reducescatter_gloo_and_defaults(pool):
    res = run_group(pool, "t_gather_scatter", 3)
    base = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    gathered = [[x + 10 * r for x in row] for r in range(3) for row in base]
    for rank in range(3):
        got = res[rank]
        for name in ("gloo", "default"):
            assert got[name, "allgather"] == gathered
            assert got[name, "allgather_bool"] == [
                True,
                False,
                True,
                False,
                False,
                True,
                True,
                False,
                True,
            ]
            # rank r keeps row r of the reduced (3, 2) tensor
            assert got[name, "sum"] == [[3 * x + 30 for x in base[rank]]]
            assert got[name, "max"] == [[x + 20 for x in base[rank]]]
            assert got[name, "avg"] == [[x + 10 for x in base[rank]]]
        assert got[0] == (
            "ok",
            [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]],
        )
        assert got[1] == ("ok", [3.0 * rank + 3.0])
        assert got[2] == ("ok", [[3.0, 3.0], [[3.0, 3.0, 3.0]]])
        kind, type_name, msg = got[3]  # one bucket, one dtype
        assert (kind, type_name) == ("failure", "TypeError") and "share one dtype" in msg
        kind, type_name, msg = got[4]
        assert (kind, type_name) == ("failure", "ValueError")
        assert "dim 0 of the input (4) must divide by the group size 3" in msg
        assert got[5][:2] == ("failure", "ValueError") and "at least one dimension" in got[5][2]
        assert got[6][:2] == ("failure", "ValueError") and "differ in shape" in got[6][2]
        assert got[7] == ("ok", [0.0, 1.0, 2.0])  # and the group is still in step


# -- pure helpers (no processes) -----------------------------------------------------------
def test_strip_and_fill_round_trip_without_mutating_the_input():
    t = torch.ones(2)
    value = {
        "a": [t, 1, "s"],
        "b": Batch(x=(t, torch.zeros(1)), name="n"),
        "c": Pair(left=None, right=torch.arange(3)),
    }
    out: list = []
    skel = _strip(value, out, {})
    assert len(out) == 3 and out[0] is t
    assert value["a"][0] is t and value["b"].x[0] is t  # input untouched
    rebuilt = _fill(pickle.loads(pickle.dumps(skel)), [x.clone() for x in out])
    assert same(rebuilt, value)
    no_tensors = {"k": [1, 2], "d": Pair(1, 2)}
    assert _strip(no_tensors, [], {}) is no_tensors


def test_interfaces_reject_bad_use():
    with pytest.raises(ValueError, match="unknown reduce op"):
        Collective(GlooCommunicator(), "median")
    with pytest.raises(ValueError, match="unknown collective"):
        Collective(GlooCommunicator(), "sum", kind="broadcast")
    with pytest.raises(ValueError, match="no rank"):
        CommWriter(type("W", (), {"write": None})(), GlooCommunicator(), {"a0": 0}, ("a1",))

    class Custom(Communicator):
        pass

    c = Custom()
    assert c.prepare() == {}
    c.setup(0, 1, {}, 1.0)
    assert (c.rank, c.world_size) == (0, 1)
    with pytest.raises(NotImplementedError, match="send"):
        c.isend(torch.ones(1), 0)
    with pytest.raises(NotImplementedError, match="allreduce"):
        c.allreduce(torch.ones(1))
    c.destroy()
