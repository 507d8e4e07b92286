"""Big values on the shared-memory ring (issue 12): one copy per hop, zero-copy leased reads
that never block and are never overwritten, big-value segments that shrink back, and a
full /dev/shm as a clear error (an injected allocation failure, and a real small tmpfs
where this machine lets the test mount one)."""

import errno
import os
import secrets
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest

from dagc.errors import DagcError
from dagc.runtime import channels as ch
from dagc.runtime.channels import segment, shm

MiB = 1 << 20


@pytest.fixture
def prefix():
    p = f"dagc-{secrets.token_hex(12)}-"
    yield p
    shm.unlink_prefix(p)


def _setup(prefix, nreaders=1, slots=4, capacity=1024):
    ctl = ch.Control(prefix + "ctl", create=True)
    waiter = ch.Waiter(ctl, ["driver"] + [f"r{i}" for i in range(nreaders)], "adaptive")
    w = ch.Writer(prefix + "c0", nreaders, slots, capacity, waiter)
    rs = [ch.Reader(prefix + "c0", i, waiter) for i in range(nreaders)]
    return w, rs


def _names(prefix):
    return sorted(p for p in os.listdir(shm.SHM_DIR) if p.startswith(prefix))


def _needs_shm(nbytes: int):
    free = shm.shm_space()[0]
    if free < nbytes:
        pytest.skip(
            f"/dev/shm has {free / MiB:.0f} MiB free, this test needs {nbytes / MiB:.0f} MiB"
        )


def _in_mapping(arr, r) -> bool:
    """True when ``arr``'s memory lies inside one of reader ``r``'s mappings (a view of
    the slot or of a big-value segment), False for a private copy."""
    addr = arr.__array_interface__["data"][0]
    spans = [(r.addr, r.size)] + [(shm.address(b.mm), b.size) for b in r._big.values()]
    return any(lo <= addr < lo + n for lo, n in spans)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nreaders", [1, 2])
def test_held_views_are_never_overwritten_and_never_block(prefix, nreaders):
    """Hold 100 results of a 1 MiB echo while 2,000 more go through: every held value is
    intact, the first ``budget`` of them are zero-copy views of the slot (read-only), the
    rest copies, and no write ever waits (each gets a deadline a stall would miss)."""
    slots = 4
    w, rs = _setup(prefix, nreaders, slots=slots, capacity=MiB)
    held = {r.index: [] for r in rs}
    for i in range(2100):
        w.write(np.full(MiB // 8, i, dtype=np.int64), time.monotonic() + 5)
        for r in rs:
            v = r.read(time.monotonic() + 5)
            assert v[0] == i and v[-1] == i
            if i % 21 == 0 and len(held[r.index]) < 100:
                held[r.index].append((i, v))
    for r in rs:
        vals = held[r.index]
        assert len(vals) == 100 and not any(v.flags.writeable for _, v in vals)
        budget = segment.lease_budget(slots)
        for j, (i, v) in enumerate(vals):
            assert (v == i).all(), f"held value {i} changed under reader {r.index}"
            assert not v.flags.writeable
            assert _in_mapping(v, r) == (j < budget), (j, budget)
    assert w.stats()["big_segments"] == 0  # 1 MiB fits a slot: no segment grew
    held.clear()
    del v, vals
    for r in rs:  # every lease went with its views
        assert r._leases == {} and not any(r.mv[r.lease0 : r.lease0 + w.nphys])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("capacity", [1024, 65 * MiB], ids=["big-segment", "in-slot"])
def test_big_payloads_are_copied_once_and_read_in_place(prefix, capacity):
    """No intermediate ``bytes`` of the payload on either side: writing a 64 MiB array (as
    a value, and inside a dict next to a CPU tensor) allocates nothing the size of it
    (one copy, straight into the slot), and reading it allocates nothing either (views)."""
    torch = pytest.importorskip("torch")
    _needs_shm(256 * MiB)
    w, (r,) = _setup(prefix, capacity=capacity)
    arr = np.arange(8 * MiB, dtype=np.float64)  # 64 MiB
    ten = torch.arange(4 * MiB, dtype=torch.float32)  # 16 MiB
    for value in (arr, {"x": arr, "t": ten}):
        tracemalloc.start()
        try:
            w.write(value, time.monotonic() + 30)
            wpeak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            got = r.read(time.monotonic() + 30)
            rpeak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert wpeak < MiB, f"the writer allocated {wpeak} bytes"
        assert rpeak < MiB, f"the reader allocated {rpeak} bytes"
        x = got if isinstance(got, np.ndarray) else got["x"]
        assert _in_mapping(x, r) and not x.flags.writeable
        assert np.array_equal(x, arr)
        if isinstance(got, dict):
            assert torch.equal(got["t"], ten)
        del got, x


@pytest.mark.timeout(120)
def test_big_segments_shrink_after_a_burst(prefix):
    """After a burst of big values, ``shrink_after`` messages without one unmap every
    big-value segment at the writer and the reader: /dev/shm use is back to the ring's."""
    w, (r,) = _setup(prefix, slots=4, capacity=1024)
    for i in range(6):  # two in flight: two slots, two segments
        w.write(np.full(MiB, i, dtype=np.uint8))
        w.write(np.full(2 * MiB, i, dtype=np.uint8))
        assert r.read()[0] == i and r.read()[-1] == i
    assert w.stats()["big_segments"] == 2 and r.stats()["big_segments"] == 2
    assert w.stats()["big_bytes"] >= 3 * MiB
    assert _maps(prefix) != []
    for i in range(segment.SHRINK_AFTER + 1):
        w.write(i)
        assert r.read() == i
    assert w.stats()["big_segments"] == 0 and w.stats()["big_bytes"] == 0
    assert r.stats()["big_segments"] == 0
    assert _maps(prefix) == [], "a big-value segment is still mapped"
    assert _names(prefix) == [prefix + "c0", prefix + "ctl"]
    w.write(np.ones(3 * MiB, dtype=np.uint8))  # and big values still go through
    assert r.read().sum() == 3 * MiB


def _maps(prefix):
    with open("/proc/self/maps") as f:
        return [ln for ln in f if prefix in ln and ".x" in ln]


def _enospc_above(limit):
    real = shm._fallocate

    def fallocate(fd, offset, length):
        if length > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    return fallocate


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [512 << 10, 64 * MiB], ids=["rest-of-slot", "big-segment"])
def test_full_shm_is_an_error_for_that_value_only(prefix, monkeypatch, size):
    """An allocation /dev/shm cannot hold (ENOSPC injected into the reservation) fails that
    one write with ShmFullError — a DagcError and a MemoryError naming the size needed,
    what is free and the fix — before anything is written or published; smaller values
    still go, and the big one goes once there is room."""
    _needs_shm(2 * size + 64 * MiB)
    w, (r,) = _setup(prefix, capacity=MiB)
    monkeypatch.setattr(shm, "_fallocate", _enospc_above(64 << 10))
    with pytest.raises(shm.ShmFullError) as ei:
        w.write(np.ones(size, dtype=np.uint8))
    e = ei.value
    assert isinstance(e, DagcError) and isinstance(e, MemoryError)
    assert e.needed >= size - 4096 and e.total > 0
    msg = str(e)
    assert f"{size / MiB:,.1f} MiB" in msg and "free of" in msg
    assert "--shm-size" in msg and "max_inflight" in msg
    assert not r.ready() and _names(prefix) == [prefix + "c0", prefix + "ctl"]
    w.write("small")  # the channel goes on
    assert r.read() == "small"
    w.on_encode_error = lambda exc, value: ("stand-in", type(exc).__name__)
    assert w.write(np.ones(size, dtype=np.uint8)) is True
    assert r.read() == ("stand-in", "ShmFullError")
    monkeypatch.undo()  # room again: the big value goes
    w.write(np.full(size, 7, dtype=np.uint8))
    got = r.read()
    assert got.size == size and got[0] == got[-1] == 7


_TMPFS_CHILD = textwrap.dedent("""
    import secrets, sys, numpy as np
    from dagc.runtime import channels as ch
    from dagc.runtime.channels import shm
    shm.SHM_DIR = sys.argv[1]
    p = f"dagc-{secrets.token_hex(12)}-"
    ctl = ch.Control(p + "ctl", create=True)
    waiter = ch.Waiter(ctl, ["w", "r"], "adaptive")
    w = ch.Writer(p + "c0", 1, 4, 1 << 20, waiter)
    r = ch.Reader(p + "c0", 0, waiter)
    w.write(np.full(4 << 20, 1, dtype=np.uint8))              # fits
    assert r.read().sum() == 4 << 20
    try:
        w.write(np.ones(32 << 20, dtype=np.uint8))            # does not
    except shm.ShmFullError as e:
        print("FULL", e.needed, e.free, e.total)
    w.write(np.full(2 << 20, 3, dtype=np.uint8))              # smaller still goes
    assert r.read()[-1] == 3
    print("OK")
""")


@pytest.mark.timeout(60)
def test_small_tmpfs_is_an_error_not_a_sigbus(tmp_path):
    """A real /dev/shm of 16 MiB (a tmpfs mounted for the test; a container's default is
    64 MiB): a 32 MiB value is a ShmFullError, never the SIGBUS that writing past a tmpfs
    limit is, and smaller values still go. Run in a child so a SIGBUS cannot take pytest."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip(
            "mounting a tmpfs needs root (CAP_SYS_ADMIN); the injected ENOSPC test "
            "covers the same path"
        )
    rc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=1777", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if rc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({rc.stderr.strip()}); the injected ENOSPC "
            f"test covers the same path"
        )
    try:
        out = subprocess.run(
            [sys.executable, "-c", _TMPFS_CHILD, str(mnt)],
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        full = [ln for ln in out.stdout.splitlines() if ln.startswith("FULL")]
        assert full and out.stdout.strip().endswith("OK"), out.stdout
        needed, free, total = map(int, full[0].split()[1:])
        assert needed > 32 << 20 > free and total == 16 << 20
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
