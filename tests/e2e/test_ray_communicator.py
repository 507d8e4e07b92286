"""Ray Compiled Graph Communicator objects driven by dagc (runtime/comm/ray_adapter.py).

Two communicators: Ray's own ``CPUCommunicator`` (collectives through a barrier actor; its
point-to-point tensors go through shared memory, as in Ray) and ``MailboxComm``, a small one
written here whose send/recv/allreduce/allgather really move tensors (through a mailbox
actor) and whose reducescatter is missing (dagc builds it on allreduce). Each is passed the
three ways Ray code passes one, through ``dagc.compile`` and under ``dagc.patch_ray()``.
"""

import asyncio
import uuid
from collections import defaultdict

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import ray
import torch
from ray.experimental.channel.communicator import Communicator as RayComm
from ray.experimental.channel.cpu_communicator import CPUCommunicator
from ray.experimental.collective import allgather, allreduce, reducescatter
from ray.experimental.util.types import ReduceOp

import dagc
from dagc import InputNode, MultiOutputNode

T = 30


@ray.remote(num_cpus=0)
class Mailbox:
    """FIFO queues by key: what MailboxComm sends through."""

    def __init__(self):
        self.q = defaultdict(asyncio.Queue)
        self.puts = 0

    async def put(self, key, value):
        self.puts += 1
        self.q[key].put_nowait(value)

    async def get(self, key):
        return await self.q[key].get()

    async def count(self):
        return self.puts


class MailboxComm(RayComm):
    """A user's communicator for "an accelerator NCCL does not serve": CPU tensors through
    a mailbox actor. reducescatter is not implemented (Ray allows that)."""

    def __init__(self, handles, box_name):
        self._handles = list(handles)
        self._box_name = box_name
        self._rank = None
        self._box = None

    def initialize(self, rank):
        self._rank = rank
        self._box = ray.get_actor(self._box_name)

    def get_actor_handles(self):
        return self._handles

    def get_rank(self, actor):
        ids = [h._ray_actor_id for h in self._handles]
        if actor._ray_actor_id not in ids:
            raise ValueError("Actor is not in the MailboxComm group.")
        return ids.index(actor._ray_actor_id)

    def get_self_rank(self):
        return self._rank

    def get_world_size(self):
        return len(self._handles)

    def send(self, value, peer_rank):
        ray.get(self._box.put.remote(("p2p", self._rank, peer_rank), value.clone()))

    def recv(self, shape, dtype, peer_rank, allocator=None):
        got = ray.get(self._box.get.remote(("p2p", peer_rank, self._rank)))
        assert tuple(got.shape) == tuple(shape) and got.dtype == dtype
        buf = allocator(shape, dtype) if allocator else torch.empty(shape, dtype=dtype)
        buf.copy_(got)
        return buf

    def _exchange(self, tag, t):
        ws = self.get_world_size()
        for p in range(ws):
            if p != self._rank:
                ray.get(self._box.put.remote((tag, self._rank, p), t.clone()))
        return [
            t if p == self._rank else ray.get(self._box.get.remote((tag, p, self._rank)))
            for p in range(ws)
        ]

    def allreduce(self, send_buf, recv_buf, op=ReduceOp.SUM):
        assert send_buf is not recv_buf  # Ray passes distinct buffers; so does dagc
        parts = self._exchange("ar", send_buf)
        out = parts[0].clone()
        for x in parts[1:]:
            out = {
                ReduceOp.SUM: torch.add,
                ReduceOp.MAX: torch.maximum,
                ReduceOp.MIN: torch.minimum,
                ReduceOp.PRODUCT: torch.mul,
            }[op](out, x)
        recv_buf.copy_(out)

    def allgather(self, send_buf, recv_buf):
        recv_buf.copy_(torch.cat(self._exchange("ag", send_buf)))

    def reducescatter(self, send_buf, recv_buf, op=ReduceOp.SUM):
        raise NotImplementedError

    @property
    def recv_stream(self):
        import contextlib

        return contextlib.nullcontext()

    @property
    def send_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def destroy(self):
        pass

    def get_transport_name(self):
        return "accelerator"

    @classmethod
    def generate_communicator_id(cls):
        return str(uuid.uuid4())


@ray.remote
class W:
    def __init__(self, k):
        self.k = k

    def make(self, n):
        return torch.full((n,), float(self.k))

    def sized(self, n):  # n == 2: a shape of its own
        return torch.ones(n + (self.k if n == 2 else 0)) * self.k

    def scale(self, t):
        return t * self.k

    def total(self, t):
        return float(t.sum())

    def fail(self, n):
        if n == 2:
            raise RuntimeError(f"w{self.k} failed")
        return self.make(n)

    def not_tensor(self, n):
        return [1.0] * n if n == 2 else self.make(n)

    def rows(self, n):
        return torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) * self.k


@pytest.fixture(scope="module")
def ws(ray_session):
    out = [W.remote(k + 1) for k in range(3)]
    ray.get([w.make.remote(1) for w in out])
    return out


@pytest.fixture
def box(ray_session):
    name = f"dagc-test-box-{uuid.uuid4().hex[:8]}"
    b = Mailbox.options(name=name).remote()
    ray.get(b.count.remote())
    yield name, b
    ray.kill(b)


def _cpu_comm(actors):
    return CPUCommunicator(len(actors), list(actors))


def _kill_barriers(comm):
    for b in list(comm.barriers):  # the driver's copy never ran an op: the actors'
        ray.kill(b)  # copies killed theirs in destroy()


# -- point to point -------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True])
def test_p2p_through_a_users_communicator(ws, box, overlap):
    a, b = ws[:2]
    comm = MailboxComm([a, b], box[0])
    with InputNode() as inp:
        dag = b.scale.bind(a.make.bind(inp).with_tensor_transport(transport=comm))
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        assert [g.backend for g in cg._ir.comm_groups] == ["custom0"]
        before = ray.get(box[1].count.remote())
        for n in (3, 5):
            assert cg.execute(n).get(timeout=T).tolist() == [2.0] * n
        assert ray.get(box[1].count.remote()) - before == 2  # the tensors went through it


def test_p2p_ranks_are_the_communicators_not_dagcs(ws, box):
    """The communicator lists b before a: dagc's rank 0 (a) is its rank 1."""
    a, b = ws[:2]
    comm = MailboxComm([b, a], box[0])
    with InputNode() as inp:
        x = a.make.bind(inp).with_tensor_transport(transport=comm)
        y = b.make.bind(inp).with_tensor_transport(transport=comm)
        dag = MultiOutputNode([b.scale.bind(x), a.scale.bind(y)])
    with dagc.compile(dag) as cg:
        for n in (2, 3):
            bx, ay = cg.execute(n).get(timeout=T)
            assert bx.tolist() == [2.0] * n and ay.tolist() == [2.0] * n


def test_p2p_with_rays_cpu_communicator_goes_through_shared_memory(ws):
    a, b = ws[:2]
    comm = _cpu_comm([a, b])
    with InputNode() as inp:
        dag = b.scale.bind(a.make.bind(inp).with_tensor_transport(transport=comm))
    with dagc.compile(dag) as cg:
        assert not cg._ir.comm_groups  # as in Ray: no communicator for "cpu"
        assert cg.execute(4).get(timeout=T).tolist() == [2.0] * 4


# -- collectives ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True])
def test_allreduce_with_rays_cpu_communicator(ws, overlap):
    a, b, c = ws
    comm = _cpu_comm([a, b, c])
    try:
        with InputNode() as inp:
            red = allreduce.bind([w.make.bind(inp) for w in ws], transport=comm)
            dag = MultiOutputNode([w.total.bind(r) for w, r in zip(ws, red)])
        with dagc.compile(dag, overlap_communication=overlap) as cg:
            assert [g.backend for g in cg._ir.comm_groups] == ["custom0"]
            for n in (2, 4):
                assert cg.execute(n).get(timeout=T) == [6.0 * n] * 3
    finally:
        _kill_barriers(comm)


def test_allreduce_under_patch_ray_fetching_some_outputs(ws):
    """Ray code unchanged: ``experimental_compile``, refs fetched one at a time, some
    executions' second output never fetched before the next ones."""
    a, b = ws[:2]
    comm = _cpu_comm([a, b])
    try:
        with dagc.patched_ray(workers=False):
            with InputNode() as inp:
                red = allreduce.bind(
                    [a.make.bind(inp), b.make.bind(inp)], transport=comm, op=ReduceOp.MAX
                )
                dag = MultiOutputNode([a.scale.bind(red[0]), b.total.bind(red[1])])
            cg = dag.experimental_compile()
            try:
                first = [cg.execute(n) for n in (1, 2, 3)]
                assert [ray.get(r[0], timeout=T).tolist() for r in first] == [
                    [2.0] * n for n in (1, 2, 3)
                ]
                assert ray.get(first[2][1], timeout=T) == 6.0  # 0 and 1 never fetched
                assert ray.get(cg.execute(5)[1], timeout=T) == 10.0
            finally:
                cg.teardown()
    finally:
        _kill_barriers(comm)


def test_default_communicator_under_patch_ray(ws):
    """``_default_communicator=CPUCommunicator``: collectives without a transport use it;
    point-to-point tensor edges move as they would under 'create' (it moves none)."""
    a, b = ws[:2]
    comm = _cpu_comm([a, b])
    try:
        with dagc.patched_ray(workers=False):
            with InputNode() as inp:
                red = allreduce.bind([a.make.bind(inp), b.make.bind(inp)])
                moved = b.scale.bind(a.make.bind(inp).with_tensor_transport())
                dag = MultiOutputNode([*red, moved])
            cg = dag.experimental_compile(_default_communicator=comm)
            try:
                backends = sorted(g.backend for g in cg._ir.comm_groups)
                assert backends == ["custom-option", "gloo"]
                r0, r1, m = ray.get(cg.execute(3), timeout=T)
                assert r0.tolist() == r1.tolist() == [3.0] * 3 and m.tolist() == [2.0] * 3
            finally:
                cg.teardown()
    finally:
        _kill_barriers(comm)


@pytest.mark.parametrize("overlap", [False, True])
def test_several_collectives_scheduled_on_one_users_communicator(ws, box, overlap):
    comm = MailboxComm(ws, box[0])
    with InputNode() as inp:
        s = allreduce.bind([w.make.bind(inp) for w in ws], transport=comm)
        g = allgather.bind([w.rows.bind(inp) for w in ws], transport=comm)
        rs = reducescatter.bind([w.rows.bind(inp) for w in ws], transport=comm)  # fallback
        m = allreduce.bind(
            [w.scale.bind(x) for w, x in zip(ws, s)], transport=comm, op=ReduceOp.MAX
        )
        dag = MultiOutputNode([*m, *g, *rs])
    with dagc.compile(dag, overlap_communication=overlap) as cg:
        assert len(cg._ir.comm_groups) == 1  # one group, four collectives
        for n in (3, 6):
            out = cg.execute(n).get(timeout=T)
            base = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
            for x in out[:3]:
                assert x.tolist() == [18.0] * n  # max(6*1, 6*2, 6*3)
            for x in out[3:6]:
                assert torch.equal(x, torch.cat([base, base * 2, base * 3]))
            for r, x in enumerate(out[6:]):
                assert torch.equal(x, (base * 6).view(3, n // 3, 2)[r])


@pytest.mark.parametrize("make", ["cpu", "mailbox"])
@pytest.mark.parametrize(
    "case,match",
    [
        ("sized", "differ in shape"),
        ("fail", "w1 failed"),
        ("not_tensor", "expects a torch.Tensor, got list"),
    ],
)
def test_wrong_shape_failed_input_and_non_tensor_are_errors_not_hangs(ws, box, make, case, match):
    """Only a0's input goes wrong, and only for n == 2: every participant gets the error,
    and the next execution's collective works."""
    a, b = ws[:2]
    comm = _cpu_comm([a, b]) if make == "cpu" else MailboxComm([a, b], box[0])
    try:
        with InputNode() as inp:
            red = allreduce.bind([getattr(a, case).bind(inp), b.make.bind(inp)], transport=comm)
            dag = MultiOutputNode([a.total.bind(red[0]), b.total.bind(red[1])])
        with dagc.compile(dag) as cg:
            for _ in range(2):
                with pytest.raises(Exception, match=match):
                    cg.execute(2).get(timeout=T)
                assert cg.execute(3).get(timeout=T) == [9.0, 9.0]
    finally:
        if make == "cpu":
            _kill_barriers(comm)


# -- refused, clearly ---------------------------------------------------------------------


def test_the_same_actor_twice_is_a_compile_error(ws, box):
    a, b = ws[:2]
    comm = MailboxComm([a, a], box[0])
    with InputNode() as inp:
        dag = b.scale.bind(a.make.bind(inp).with_tensor_transport(transport=comm))
    with pytest.raises(dagc.CompileError, match="same actor twice"):
        dagc.compile(dag)
    with (
        pytest.raises(dagc.CompileError, match="same actor twice"),
        dagc.patched_ray(workers=False),
    ):
        dag.experimental_compile()


def test_an_actor_outside_the_group_is_a_compile_error(ws, box):
    a, b, c = ws
    comm = MailboxComm([a, b], box[0])
    with InputNode() as inp:
        dag = c.scale.bind(a.make.bind(inp).with_tensor_transport(transport=comm))
    with pytest.raises(dagc.CompileError, match=r"a1:W uses the MailboxComm but is not in"):
        dagc.compile(dag)


def test_an_actor_outside_the_default_communicator_fails_set_up_at_once(ws, box):
    """Passed as the default, the users are only known once lowered: the outsider says so
    at set-up and its peers stop waiting at once (well inside the set-up timeout)."""
    import time

    a, b, c = ws
    comm = MailboxComm([a, b], box[0])
    with InputNode() as inp:
        dag = c.scale.bind(a.make.bind(inp).with_tensor_transport())
    t0 = time.monotonic()
    with pytest.raises(Exception, match="outside the MailboxComm's group"):
        dagc.compile(dag, communicator=comm, start_timeout=60)
    assert time.monotonic() - t0 < 30
    with InputNode() as inp:  # the actors are free again
        dag = b.scale.bind(a.make.bind(inp).with_tensor_transport(transport=comm))
    with dagc.compile(dag) as cg:
        assert cg.execute(2).get(timeout=T).tolist() == [2.0, 2.0]


def test_other_objects_are_still_refused(ws):
    a, b = ws[:2]
    with InputNode() as inp:
        dag = b.scale.bind(a.make.bind(inp).with_tensor_transport("nccl"))
    with pytest.raises(ValueError, match="Ray Communicator"):
        dagc.compile(dag, communicator=object())
    with (
        pytest.raises(dagc.CompileError, match="Ray Communicator"),
        dagc.patched_ray(workers=False),
    ):
        dag.experimental_compile(_default_communicator=object())
