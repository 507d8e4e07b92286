"""Which memory order the shared-memory ring is made for (shm.ring_fence), decided from the
machine type: x86-64 needs no barrier, aarch64 gets a full barrier at each point of the
protocol that needs one (before a store another process acts on, after a load it acts on),
any other machine gets a clear refusal instead of a ring."""

import platform
import secrets
import time

import numpy as np
import pytest

from dagc.errors import DagcError
from dagc.runtime import channels as ch
from dagc.runtime.channels import segment, shm


@pytest.fixture
def prefix():
    p = f"dagc-{secrets.token_hex(12)}-"
    yield p
    shm.unlink_prefix(p)


def _machine(monkeypatch, name: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: name)


def _waiter(prefix):
    ctl = ch.Control(prefix + "ctl", create=True)
    return ctl, ch.Waiter(ctl, ["driver", "r0"], "adaptive")


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_x86_64_rings_take_no_barrier(prefix, monkeypatch, machine):
    _machine(monkeypatch, machine)
    calls = []
    monkeypatch.setattr(shm, "fence", lambda: calls.append(1))
    ctl, waiter = _waiter(prefix)
    w = ch.Writer(prefix + "c0", 1, 4, 1024, waiter)
    r = ch.Reader(prefix + "c0", 0, waiter)
    try:
        assert w._fence is None and r._fence is None
        w.write(1)
        assert r.read() == 1 and calls == []
    finally:
        r.close()
        w.close()
        ctl.release()


@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
def test_aarch64_rings_fence_before_publishing_and_before_handing_back(
    prefix, monkeypatch, machine
):
    """Each fence is seen from inside: the writer's two come before write_seq moves (one
    after it loaded the readers' read_seqs, one after the payload and slot map went in); the
    reader's two come after it saw write_seq and before its read_seq moves."""
    _machine(monkeypatch, machine)
    assert shm.ring_fence() is shm.fence
    shm.fence()  # the real barrier runs on this machine
    seen = []  # (who, write_seq, read_seq) at each fence
    ends = {}

    def spy():
        w = ends["w"].w
        seen.append((ends["now"], w[segment.W_WSEQ], w[segment.rseq_word(0)]))

    monkeypatch.setattr(shm, "fence", spy)
    ctl, waiter = _waiter(prefix)
    w = ends["w"] = ch.Writer(prefix + "c0", 1, 4, 256, waiter)
    r = ch.Reader(prefix + "c0", 0, waiter)
    try:
        assert w._fence is spy and r._fence is spy
        values = [7, "x" * 100, np.arange(10_000)]  # in-band, pickle, big-value segment
        ends["now"] = "writer"
        for v in values:
            w.write(v, time.monotonic() + 5)
        assert seen == [("writer", m, 0) for m in range(3) for _ in range(2)]
        del seen[:]
        ends["now"] = "reader"
        for m, v in enumerate(values):
            got = r.read(time.monotonic() + 5)
            assert seen[-2:] == [("reader", 3, m)] * 2
            assert np.array_equal(got, v)
        assert len(seen) == 6 and r._leases  # the big array is a leased view ...
        del got  # ... whose release fences first
        assert seen[6:] == [("reader", 3, 3)] and not r._leases
    finally:
        r.close()
        w.close()
        ctl.release()


@pytest.mark.parametrize("machine", ["ppc64le", "riscv64", "armv7l", ""])
def test_other_machines_get_a_clear_refusal(prefix, monkeypatch, machine):
    """No ring is made (nothing in /dev/shm): the error names the machine and what to do."""
    _machine(monkeypatch, machine)
    ctl, waiter = _waiter(prefix)
    try:
        with pytest.raises(shm.RingUnsupportedError) as ei:
            ch.Writer(prefix + "c0", 1, 4, 1024, waiter)
        msg = str(ei.value)
        assert isinstance(ei.value, DagcError)
        assert f"({machine or 'unknown'})" in msg, msg
        assert "x86-64 or aarch64" in msg and "Ray Compiled Graph" in msg, msg
        assert not shm.names(prefix + "c0")
        monkeypatch.setattr(platform, "machine", lambda: "x86_64")
        segment.create_segment(prefix + "c0", 1, 4, 1024).close()
        _machine(monkeypatch, machine)
        with pytest.raises(shm.RingUnsupportedError):
            ch.Reader(prefix + "c0", 0, waiter)
    finally:
        ctl.release()
