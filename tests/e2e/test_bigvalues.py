"""Big values through a compiled DAG (issue 12): held results never block and never change,
a value an actor keeps stays correct, a full /dev/shm fails that execution only, big-value
segments shrink back after a burst, and a process's memory stays within one copy per hop."""

import errno
import os
import re
import resource

import numpy as np
import pytest
import ray

import dagc
from dagc import InputNode
from dagc.runtime.channels import segment, shm

MiB = 1 << 20


@ray.remote
class Holder:
    def __init__(self):
        self.cache = None
        self.kept = []

    def echo(self, x):
        return x

    def keep(self, x):
        self.cache = x  # the user keeps a received value
        if x[0] % 100 == 0 and len(self.kept) < 30:
            self.kept.append(x)
        return int(x[0])

    def check(self):
        """(first element, still all equal to it, writeable) of every value kept."""
        vals = self.kept + [self.cache]
        return [(int(v[0]), bool((v == v[0]).all()), bool(v.flags.writeable)) for v in vals]

    def make(self, n):
        return np.full(n, 5, dtype=np.uint8)

    def maxrss(self):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def pid(self):
        return os.getpid()


def _fail_big_fallocate(instance=None, limit=64 << 10):
    real = shm.__dict__.setdefault("_test_real_fallocate", shm._fallocate)

    def fallocate(fd, offset, length):
        if length > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    shm._fallocate = fallocate


def _restore_fallocate(instance=None):
    real = shm.__dict__.pop("_test_real_fallocate", None)
    if real is not None:
        shm._fallocate = real


def _big_mapped(pid: int, token: str, pattern: str = r"c\d+\.x\d+") -> int:
    """Bytes of this DAG's big-value segments (or of any of its segments whose name
    ends in ``pattern``) process ``pid`` maps."""
    pat = re.compile(rf"/dev/shm/dagc-{token}-{pattern}")
    n = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if pat.search(line):
                lo, hi = line.split()[0].split("-")
                n += int(hi, 16) - int(lo, 16)
    return n


def _needs_shm(nbytes: int):
    free = shm.shm_space()[0]
    if free < nbytes:
        pytest.skip(
            f"/dev/shm has {free / MiB:.0f} MiB free, this test needs {nbytes / MiB:.0f} MiB"
        )


@pytest.fixture
def holders(ray_session):
    hs = [Holder.remote() for _ in range(2)]
    ray_session.get([h.pid.remote() for h in hs], timeout=60)
    yield hs
    for h in hs:
        ray_session.kill(h)


@pytest.mark.timeout(300)
def test_held_results_of_a_1mib_echo_stay_intact(holders):
    """Hold 100 results of a 1 MiB echo while 10,000 more executions run: every held value
    is intact and read-only, the first ones are zero-copy views of the output channel's
    slots, and no execution ever waits on a held one (each get has a timeout)."""
    a = holders[0]
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dagc.compile(dag) as cg:
        held = []
        for i in range(100):
            held.append((i, cg.execute(np.full(MiB // 8, i, dtype=np.int64)).get(timeout=30)))
        x = np.zeros(MiB // 8, dtype=np.int64)
        for i in range(10_000):
            x[0] = x[-1] = i
            v = cg.execute(x).get(timeout=30)
            assert v[0] == i and v[-1] == i
        del v
        spans = _shm_spans(os.getpid(), cg._session.token)
        for i, v in held:
            assert (v == i).all(), f"held result {i} changed"
            assert not v.flags.writeable
        views = sum(any(lo <= v.ctypes.data < hi for lo, hi in spans) for _, v in held)
        assert views >= segment.lease_budget(8), views  # zero-copy, not copied out
        del held, i, v


def _shm_spans(pid: int, token: str) -> list:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if f"/dev/shm/dagc-{token}-" in line:
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


@pytest.mark.timeout(300)
def test_a_value_an_actor_keeps_stays_correct(holders):
    """``self.cache = x`` in a method: the kept array (a view of the slot it arrived in)
    never changes while 3,000 more executions go through the same channel."""
    a = holders[0]
    with InputNode() as inp:
        dag = a.keep.bind(inp)
    with dagc.compile(dag) as cg:
        x = np.zeros(256 << 10, dtype=np.int64)  # 2 MiB: bigger than a slot
        for i in range(3000):
            x[:] = i
            assert cg.execute(x).get(timeout=30) == i
        kept = ray.get(a.check.remote(), timeout=30)
    assert len(kept) == 31 and kept[-1][0] == 2999
    assert [k for k, _, _ in kept[:-1]] == list(range(0, 3000, 100))
    assert all(intact for _, intact, _ in kept), kept
    assert not any(writeable for _, _, writeable in kept), kept


@pytest.mark.timeout(300)
def test_full_shm_fails_that_execution_and_the_dag_goes_on(holders):
    """No room in /dev/shm (ENOSPC injected into the reservation, in the driver and then in
    an actor): that execution's get() raises a DagcError (a ShmFullError, also a
    MemoryError) naming the size needed, what is free and the fix; the next, smaller
    execution works, and big values go again once there is room."""
    _needs_shm(256 * MiB)
    a, b = holders
    with InputNode() as inp:
        dag = b.echo.bind(a.echo.bind(inp))
    with dagc.compile(dag) as cg:
        big = np.ones(64 * MiB, dtype=np.uint8)
        _fail_big_fallocate()  # the driver's input channel
        try:
            with pytest.raises(dagc.DagcError) as ei:
                cg.execute(big).get(timeout=60)
        finally:
            _restore_fallocate()
        _is_shm_full(ei.value, 64)
        assert cg.execute(7).get(timeout=30) == 7
        ray.get(a.__ray_call__.remote(_fail_big_fallocate), timeout=30)  # a's output
        try:
            with pytest.raises(dagc.DagcError) as ei:
                cg.execute(big).get(timeout=60)
            _is_shm_full(ei.value, 64)
            assert "a" in str(ei.value)
            assert cg.execute(np.arange(10)).get(timeout=30).tolist() == list(range(10))
        finally:
            ray.get(a.__ray_call__.remote(_restore_fallocate), timeout=30)
        got = cg.execute(big).get(timeout=60)
        assert got.size == big.size and got[0] == got[-1] == 1
        del got


def _is_shm_full(e, mib):
    assert isinstance(e, shm.ShmFullError) and isinstance(e, MemoryError), type(e).__mro__
    msg = str(e)
    assert f"{mib:,.1f} MiB" in msg and "free of" in msg, msg
    assert "--shm-size" in msg and "max_inflight" in msg, msg


@pytest.mark.timeout(300)
def test_big_value_segments_shrink_after_a_burst(holders):
    """A burst of 8 MiB values through a 2-actor chain (default options) gives each channel
    big-value segments for what is in flight or held, not max_inflight x the value; after
    the burst, SHRINK_AFTER small executions unmap them in every process:
    ``cg.memory()`` and /proc/<pid>/maps are back to the rings alone."""
    _needs_shm(256 * MiB)
    a, b = holders
    pids = [os.getpid()] + ray.get([h.pid.remote() for h in holders], timeout=30)
    with InputNode() as inp:
        dag = b.echo.bind(a.echo.bind(inp))
    with dagc.compile(dag) as cg:
        token = cg._session.token
        assert cg.execute(0).get(timeout=30) == 0
        rings = [_big_mapped(p, token, ".*") for p in pids]  # every segment, any name
        x = np.ones(8 * MiB, dtype=np.uint8)
        refs = []
        for _ in range(24):  # up to 4 in flight
            refs.append(cg.execute(x))
            if len(refs) == 4:
                assert refs.pop(0).get(timeout=60).size == x.size
        for r in refs:
            assert r.get(timeout=60).size == x.size
        del refs, r
        assert max(_big_mapped(p, token, ".*") - r for p, r in zip(pids, rings)) > 0
        burst = cg.memory()
        # 3 channels (driver -> a -> b -> driver), each value in flight or held at most
        # twice per channel; the old design grew every channel to 8 slots x the value
        assert 0 < burst["big_bytes"] <= 3 * 4 * (x.nbytes + MiB), burst
        assert max(_big_mapped(p, token) for p in pids) > 0
        for i in range(segment.SHRINK_AFTER + 2):
            assert cg.execute(i).get(timeout=30) == i
        assert [_big_mapped(p, token, ".*") for p in pids] == rings  # back to the rings
        after = cg.memory()
        assert after["big_bytes"] == 0, after
        assert 0 < after["shm_bytes"] <= burst["shm_bytes"] - burst["big_bytes"], (burst, after)
        assert [_big_mapped(p, token) for p in pids] == [0, 0, 0]


@pytest.mark.timeout(300)
def test_peak_rss_of_an_actor_is_one_copy_per_hop(holders):
    """One 64 MiB echo: the actor's peak RSS grows by the value it reads (a view of the
    input slot) plus the output slot it writes, plus a small constant; reading the value
    out into a private copy (the old channel) would add a third 64 MiB."""
    _needs_shm(256 * MiB)
    a = holders[1]
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dagc.compile(dag) as cg:
        assert cg.execute(np.ones(10, dtype=np.uint8)).get(timeout=30).sum() == 10
        before = ray.get(a.maxrss.remote(), timeout=30)
        x = np.ones(64 * MiB, dtype=np.uint8)
        got = cg.execute(x).get(timeout=60)
        assert got.size == x.size and got[-1] == 1
        del got
        grew = ray.get(a.maxrss.remote(), timeout=30) - before
    assert grew <= 2 * x.nbytes + 24 * MiB, f"the actor's peak RSS grew by {grew / MiB:.0f} MiB"
