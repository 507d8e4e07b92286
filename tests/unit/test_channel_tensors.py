"""CPU torch tensors as channel values: on a channel with several readers each reader gets
a tensor of its own (an in-place op in one never shows in another's value), and reading
tensors never uses up torch's one warning about writing through a read-only numpy array
(the user who wraps a received array in a tensor must still get it)."""

import os
import secrets
import subprocess
import sys
import textwrap
import time

import pytest

from dagc.runtime import channels as ch
from dagc.runtime.channels import shm

torch = pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


@pytest.fixture
def prefix():
    p = f"dagc-{secrets.token_hex(12)}-"
    yield p
    shm.unlink_prefix(p)


def _ring(prefix, nreaders, capacity=4096):
    ctl = ch.Control(prefix + "ctl", create=True)
    waiter = ch.Waiter(ctl, ["driver"] + [f"r{i}" for i in range(nreaders)], "adaptive")
    w = ch.Writer(prefix + "c0", nreaders, 4, capacity, waiter)
    return ctl, w, [ch.Reader(prefix + "c0", i, waiter) for i in range(nreaders)]


def _inside(t, r) -> bool:
    """True when tensor ``t``'s memory lies in one of reader ``r``'s mappings."""
    addr = t.data_ptr()
    spans = [(r.addr, r.size)] + [(shm.address(b.mm), b.size) for b in r._big.values()]
    return any(lo <= addr < lo + n for lo, n in spans)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [64, MiB // 4], ids=["small", "leased-size"])
def test_multi_reader_tensors_are_private_copies(prefix, size):
    """Two readers of one ring: each gets its own tensor (not a view of the shared slot or
    big-value segment); reader 0's in-place writes are not seen by reader 1, nor by what
    either reads next."""
    ctl, w, (r0, r1) = _ring(prefix, 2)
    try:
        deadline = time.monotonic() + 10
        sent = {"t": torch.arange(size, dtype=torch.float32), "g": torch.ones(3)}
        w.write(sent, deadline)
        a = r0.read(deadline)
        a["t"].mul_(2)
        a["g"].add_(1)
        b = r1.read(deadline)
        assert torch.equal(b["t"], sent["t"]) and torch.equal(b["g"], sent["g"])
        assert torch.equal(a["t"], sent["t"] * 2)
        for t in (a["t"], a["g"], b["t"], b["g"]):
            assert not _inside(t, r0) and not _inside(t, r1)
        b["t"].zero_()  # and the other way round
        assert torch.equal(a["t"], sent["t"] * 2)
        w.write(sent, deadline)  # the slot itself was untouched
        for r in (r0, r1):
            again = r.read(deadline)
            assert torch.equal(again["t"], sent["t"]) and torch.equal(again["g"], sent["g"])
    finally:
        for end in (r0, r1, w):
            end.close()
        ctl.release()


@pytest.mark.timeout(60)
def test_single_reader_tensor_is_a_writable_view_of_its_slot(prefix):
    """One reader: a big tensor is read in place (no copy) and may be written in place
    (the slot is this reader's until the tensor goes); the next values are right."""
    ctl, w, (r,) = _ring(prefix, 1)
    try:
        deadline = time.monotonic() + 10
        sent = torch.arange(MiB // 4, dtype=torch.float32)
        w.write(sent, deadline)
        got = r.read(deadline)
        assert _inside(got, r)
        got.mul_(2)
        assert torch.equal(got, sent * 2)
        for i in range(3):
            w.write(sent + i, deadline)
            assert torch.equal(r.read(deadline), sent + i)
        assert torch.equal(got, sent * 2)  # held: never overwritten
    finally:
        r.close()
        w.close()
        ctl.release()


CHILD = textwrap.dedent("""
    import secrets, sys, time, warnings
    import numpy as np, torch
    from dagc.runtime import channels as ch
    from dagc.runtime.channels import shm
    from dagc.runtime.channels.tcp import TcpReader, TcpWriter, new_secret

    prefix = f"dagc-{secrets.token_hex(12)}-"
    try:
        ctl = ch.Control(prefix + "ctl", create=True)
        waiter = ch.Waiter(ctl, ["driver", "r0", "r1"], "adaptive")
        for n, c in ((1, "c0"), (2, "c1")):
            w = ch.Writer(prefix + c, n, 4, 4096, waiter)
            rs = [ch.Reader(prefix + c, i, waiter) for i in range(n)]
            for t in (torch.ones(4), torch.ones(1 << 18)):       # copied; leased size
                w.write({"t": t}, time.monotonic() + 10)
                for r in rs:
                    assert torch.equal(r.read(time.monotonic() + 10)["t"], t)
        secret = new_secret()
        tw = TcpWriter("c2", 1, 4, secret)
        host, port = tw.listen("127.0.0.1")
        tr = TcpReader(host, port, secret, 0, channel="c2", connect_timeout=10)
        for t in (torch.ones(4), torch.ones(1 << 18)):
            tw.write(t, time.monotonic() + 10)
            assert torch.equal(tr.read(time.monotonic() + 10), t)
        tr.close()
        tw.close()
        ro = np.arange(4.0)
        ro.flags.writeable = False
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.from_numpy(ro)
        print("WARNED" if any("not writable" in str(x.message) for x in seen) else "SILENT")
    finally:
        shm.unlink_prefix(prefix)
""")


@pytest.mark.timeout(120)
def test_reading_tensors_leaves_torchs_read_only_warning_to_the_user():
    """torch warns once per process when a tensor is made over a read-only numpy array.
    After tensors came in through rings (one reader, two readers; copied and leased sizes)
    and TCP, in a fresh process, the user's own torch.from_numpy of a read-only array (a
    received array is one: writing through it would change the slot other readers see)
    still warns."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_USE_TLS", None)
    p = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "WARNED", (p.stdout, p.stderr)
