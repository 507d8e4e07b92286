"""dagc.runtime.channels.tcp: the authenticated TCP channel. No Ray; loopback (127.0.0.1) only.

Every test is seeded (``DAGC_TEST_SEED`` reproduces a run; the seed is printed) and every
wait has a deadline. Peer processes are plain ``python -c`` children so they can be
SIGKILLed without touching pytest. Time bounds here are generous and only tell a behaviour
from its absence (a wake-up vs. a 30 s sleep, a death noticed by EOF vs. by a 30 s
keepalive); the speed figures are in ``python benchmarks/tcp.py``. These are the plain-TCP
tests (``RAY_USE_TLS`` is cleared for them); test_tcp_tls.py runs the TLS side.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dagc.runtime.channels import ChannelClosed, PeerDied, WaitTimeout
from dagc.runtime.channels.tcp import TcpAuthError, TcpReader, TcpSetupError, TcpWriter, new_secret
from dagc.runtime.channels.tcp.wire import HDR, HELLO, KIND_DATA, MAC, NONCE, RING

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL = "127.0.0.1"


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture(autouse=True)
def _plain_tcp(monkeypatch):
    """Plain TCP whatever the caller's environment (children inherit it too)."""
    monkeypatch.delenv("RAY_USE_TLS", raising=False)


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("DAGC_TEST_SEED", random.randrange(1 << 32)))
    print(f"\n{request.node.name}: seed {seed} (DAGC_TEST_SEED={seed} reproduces)")
    return random.Random(seed)


@pytest.fixture
def closing():
    """Close every channel end a test registers, whatever happens."""
    ends = []
    yield ends.append
    for e in ends:
        try:
            e.close()
        except Exception:
            pass


def pair(closing, nreaders=1, slots=4, secret=None, channel="c0", **kw):
    secret = secret or new_secret()
    w = TcpWriter(channel, nreaders, slots, secret, **kw)
    closing(w)
    host, port = w.listen(LOCAL)
    rs = []
    for i in range(nreaders):
        r = TcpReader(host, port, secret, i, channel=channel, connect_timeout=10)
        closing(r)
        rs.append(r)
    return w, rs


class Writes(threading.Thread):
    """write() the values on a thread; ``error`` holds what it raised."""

    def __init__(self, w, values, deadline=None):
        super().__init__(daemon=True)
        self.w, self.values, self.deadline = w, list(values), deadline
        self.done = 0
        self.error = None

    def run(self):
        try:
            for v in self.values:
                self.w.write(v, self.deadline)
                self.done += 1
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e


def child(code: str, *args) -> subprocess.Popen:
    """A python child running ``code`` with dagc importable; it prints one line when set up."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(p: subprocess.Popen, timeout: float = 20.0) -> str:
    out = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not out or not out[0]:
        p.kill()
        raise AssertionError(f"child did not start: {p.stderr.read()[-2000:]}")
    return out[0].strip()


def random_value(rng: random.Random, depth: int = 0):
    nrng = np.random.default_rng(rng.randrange(1 << 32))
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return rng.randrange(-1 << 70, 1 << 70)
    if kind == 1:
        return rng.random()
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(40)))
    if kind == 3:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(200)))
    if kind == 4:
        dtype = rng.choice([np.float32, np.float64, np.int8, np.int64, np.uint16, np.bool_])
        shape = tuple(rng.randrange(0, 40) for _ in range(rng.randrange(1, 4)))
        return (nrng.random(shape) * 100).astype(dtype)
    if kind == 5:
        return nrng.random((rng.randrange(2, 30), 8))[:, ::2]  # not contiguous: in-band
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 7:
        return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randrange(5))}
    return (random_value(rng, depth + 1), None, True)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# -- values ------------------------------------------------------------------------------------
def test_round_trip_mixed_values(rng, closing):
    w, (r,) = pair(closing, slots=4)
    values = [random_value(rng) for _ in range(300)]
    # frames around the ring size, in-band big pickles, many out-of-band buffers
    values += [
        b"x" * (RING - 40),
        b"y" * (RING - 16),
        b"z" * RING,
        b"q" * (3 * RING + 7),
        [np.arange(i, dtype=np.int16) for i in range(700)],  # > IOV_MAX parts
        np.zeros(0),
        np.arange(10)[::3],
    ]
    rng.shuffle(values)
    t = Writes(w, values, soon())
    t.start()
    for i, v in enumerate(values):
        got = r.read(soon())
        assert same(v, got), f"message {i}: sent {v!r:.200}, got {got!r:.200}"
    t.join(5)
    assert t.error is None and t.done == len(values)


def test_out_of_band_arrays_are_aligned_and_owned(closing):
    w, (r,) = pair(closing)
    a = np.arange(1001, dtype=np.float64)
    w.write((a, b"tail", a[:7].copy()))
    x, tail, y = r.read(soon())
    for arr in (x, y):
        # read-only, as arrays from a shm slot (and Ray Compiled Graph's) are
        assert not arr.flags.writeable and arr.flags.aligned
        assert arr.__array_interface__["data"][0] % 64 == 0
    a[0] = 5.0  # the reader's own memory, not the sender's
    assert x[0] == 0.0 and np.array_equal(x[1:], a[1:]) and tail == b"tail"
    mine = np.array(x)
    mine[0] = 7.0
    assert mine.flags.writeable and x[0] == 0.0


def test_torch_tensors_go_out_of_band(closing):
    torch = pytest.importorskip("torch")
    w, (r,) = pair(closing)
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    w.write({"t": t, "g": torch.ones(2, requires_grad=True)})
    r.wait_ready(soon())
    assert r._msg.__class__ is list and len(r._msg[5]) == 2, "tensors were pickled in-band"
    got = r.read(soon())
    assert torch.equal(got["t"], t) and got["g"].requires_grad


def test_large_payload_100mb(closing):
    w, rs = pair(closing, nreaders=2, slots=2)
    big = np.random.default_rng(1).integers(0, 255, 100 << 20, dtype=np.uint8)
    blob = bytes(range(256)) * (8 << 10)  # 2 MiB in-band
    t0 = time.perf_counter()
    t = Writes(w, [big, blob], soon(60))
    t.start()
    for r in rs:  # 100 MB x 2 readers: each reader drains in turn
        got = r.read(soon(60))
        assert got.nbytes == big.nbytes and np.array_equal(got, big)
        assert r.read(soon(60)) == blob
    t.join(10)
    assert t.error is None
    print(
        f"\n100 MB array + 2 MiB bytes to 2 readers over loopback: {time.perf_counter() - t0:.2f} s"
    )


def test_many_small_messages_arrive_in_order(closing):
    w, (r,) = pair(closing, slots=8)
    n = 20000
    t = Writes(w, range(n), soon(60))
    t.start()
    for i in range(n):
        assert r.read(soon(30)) == i
    t.join(10)
    assert t.error is None and t.done == n


def test_slow_reader_does_not_hold_up_the_others_and_values_are_snapshots(closing):
    """A frame too big for the socket buffers is queued (copied once): write() returns
    inside the window, later frames reach the fast reader, and reusing the array after
    write() does not change what the slow reader gets."""
    w, (fast, slow) = pair(closing, nreaders=2, slots=3)
    a = np.zeros(16 << 20, dtype=np.uint8)  # 16 MiB: far past the socket buffers
    w.write(a, soon())  # a write that waited for `slow` would time out here
    a[:] = 1  # the caller reuses its buffer
    w.write("next", soon())
    assert not fast.read(soon()).any()
    assert fast.read(soon()) == "next"  # while `slow` has not read at all
    assert not slow.read(soon()).any() and slow.read(soon()) == "next"


def test_unpicklable_value_goes_through_on_encode_error(closing):
    w, (r,) = pair(closing)
    # pickle's error for a local function: AttributeError before Python 3.14
    with pytest.raises((pickle.PicklingError, AttributeError)):
        w.write(lambda: 1)
    w.on_encode_error = lambda exc, value: ("failed", type(value).__name__)
    assert w.write(lambda: 1) is True  # "replaced": a tensor-transport end sends nothing
    assert w.write(7) is None
    assert r.read(soon()) == ("failed", "function")
    assert r.read(soon()) == 7


def _explode(msg):
    raise RuntimeError(msg)


class LoadsBadly:
    """Pickles fine; raises when unpickled (on the reading side)."""

    def __reduce__(self):
        return (_explode, ("LoadsBadly cannot be loaded",))


@pytest.mark.parametrize("frame", ["in-ring", "out-of-band"])
def test_value_that_fails_to_unpickle_is_consumed_acked_and_reported(frame, closing):
    """As on a shared-memory ring: a frame that fails to decode is consumed and acked, its
    read returns a Failure naming the writer, the channel and the reason, and the next read
    is the next value. More such frames than the window: the writer never waits for credit."""
    from dagc.runtime.failure import Failure

    slots = 2
    w, (r,) = pair(closing, slots=slots, channel="tok:c7")
    r.writer_name = "a3"  # what a DAG's reader knows its writer as
    bad = LoadsBadly() if frame == "in-ring" else (np.arange(50_000), LoadsBadly())
    for i in range(3 * slots):
        w.write(bad, soon(5))  # a missing ack would time this out at i == slots
        got = r.read(soon(5))
        assert got.__class__ is Failure, got
        err = got.to_error()
        assert isinstance(err, TypeError)
        text = str(err)
        assert "a value sent by a3 on channel c7 could not be unpickled" in text, text
        assert "RuntimeError: LoadsBadly cannot be loaded" in text, text
        w.write(i, soon(5))
        assert r.read(soon(5)) == i  # the next value is the next execution's
    assert r.seq == 6 * slots


# -- fan-out and flow control ------------------------------------------------------------------
def test_one_writer_three_readers(rng, closing):
    w, rs = pair(closing, nreaders=3, slots=3)
    values = [random_value(rng) for _ in range(200)]
    got = {i: [] for i in range(3)}
    errors = []

    def consume(i, r, pace):
        try:
            for _ in values:
                if pace and rng.random() < 0.1:
                    time.sleep(pace)
                got[i].append(r.read(soon()))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    threads = [
        threading.Thread(target=consume, args=(i, r, rng.choice([0, 1e-3])), daemon=True)
        for i, r in enumerate(rs)
    ]
    for th in threads:
        th.start()
    t = Writes(w, values, soon(30))
    t.start()
    t.join(30)
    for th in threads:
        th.join(30)
    assert not errors and t.error is None
    for i in range(3):
        assert len(got[i]) == len(values)
        assert all(same(a, b) for a, b in zip(values, got[i])), f"reader {i} differs"


def test_writer_blocks_at_slots_unacked_and_resumes(closing):
    slots = 3
    w, (r0, r1) = pair(closing, nreaders=2, slots=slots)
    for i in range(slots):
        w.write(i, soon(2))
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout):
        w.write("late", time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - t0 < 10, "the wait must end at its deadline"
    t = Writes(w, [slots], soon())
    t.start()
    time.sleep(0.3)
    assert t.done == 0, "wrote past the window"
    assert r0.read(soon()) == 0  # one reader acked message 0 ...
    time.sleep(0.3)
    assert t.done == 0, "a write went out before every reader acked"
    assert r1.read(soon()) == 0  # ... and now both have
    t.join(3)
    assert t.done == 1 and t.error is None
    for r in (r0, r1):  # the timed-out write sent nothing
        assert [r.read(soon()) for _ in range(slots)] == [1, 2, slots]


def test_ready_and_wait_ready_do_not_consume(closing):
    w, (r,) = pair(closing)
    assert not r.ready()
    w.write("a")
    r.wait_ready(soon())
    assert r.ready() and r.ready()
    assert r.read(soon()) == "a"
    assert not r.ready()


# -- set-up order ------------------------------------------------------------------------------
def test_writer_first_write_waits_for_readers(closing):
    secret = new_secret()
    w = TcpWriter("c0", 2, 2, secret)
    closing(w)
    host, port = w.listen(LOCAL)
    t = Writes(w, ["hello", "world"], soon())
    t.start()
    time.sleep(0.3)
    assert t.done == 0, "wrote before every reader was connected"
    rs = [TcpReader(host, port, secret, i, channel="c0") for i in (1, 0)]
    for r in rs:
        closing(r)
        assert [r.read(soon()), r.read(soon())] == ["hello", "world"]
    t.join(3)
    assert t.error is None


def test_reader_first_retries_until_writer_listens(closing):
    secret = new_secret()
    probe = socket.socket()
    probe.bind((LOCAL, 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there yet: connects are refused
    box = {}

    def connect():
        try:
            box["r"] = TcpReader(LOCAL, port, secret, 0, channel="c0", connect_timeout=10)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["e"] = e

    th = threading.Thread(target=connect, daemon=True)
    th.start()
    time.sleep(0.5)
    assert th.is_alive(), f"reader gave up: {box}"
    w = TcpWriter("c0", 1, 2, secret)
    closing(w)
    w.listen(LOCAL, port)
    th.join(10)
    assert "r" in box, box
    closing(box["r"])
    w.write(42, soon())
    assert box["r"].read(soon()) == 42


def test_reader_gives_up_at_connect_timeout():
    t0 = time.monotonic()
    probe = socket.socket()
    probe.bind((LOCAL, 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(TcpSetupError, match="could not connect"):
        TcpReader(LOCAL, port, new_secret(), 0, channel="c0", connect_timeout=0.5)
    assert time.monotonic() - t0 < 10, "connect_timeout (0.5 s), not the 60 s default"


def test_writer_reports_a_reader_that_never_connects(closing):
    w = TcpWriter("c0", 1, 2, new_secret(), reader_names=["a3:Stage"], connect_timeout=0.5)
    closing(w)
    w.listen(LOCAL)
    with pytest.raises(PeerDied) as ei:
        w.write(1, soon(5))
    assert ei.value.who == "a3:Stage"


# -- authentication ----------------------------------------------------------------------------
class _MakeFile:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_client_with_wrong_secret_is_rejected_before_unpickling(tmp_path, closing):
    secret = new_secret()
    marker = str(tmp_path / "pwned")
    evil = pickle.dumps(_MakeFile(marker), 5)
    w = TcpWriter("c0", 1, 2, secret)
    closing(w)
    host, port = w.listen(LOCAL)
    s = socket.create_connection((host, port), timeout=5)
    hello = s.recv(len(HELLO) + NONCE)
    assert hello.startswith(HELLO)
    # a well-formed answer with a wrong MAC, followed by a pickle frame
    s.sendall(
        os.urandom(NONCE)
        + struct.pack("<I", 0)
        + os.urandom(MAC)
        + HDR.pack(KIND_DATA, 0, 0, 0, len(evil))
        + evil
    )
    s.settimeout(5)
    try:
        assert s.recv(100) == b"", "the writer answered an unauthenticated client"
    except ConnectionResetError:
        pass  # closed with our frame unread: also a rejection
    s.close()
    # the rejected client did not take reader 0's place
    r = TcpReader(host, port, secret, 0, channel="c0")
    closing(r)
    w.write("ok", soon())
    assert r.read(soon()) == "ok"
    time.sleep(0.1)
    assert not os.path.exists(marker)


def test_reader_with_wrong_secret_or_channel_is_rejected(closing):
    secret = new_secret()
    w = TcpWriter("c0", 1, 2, secret)
    closing(w)
    host, port = w.listen(LOCAL)
    with pytest.raises(TcpAuthError, match="rejected"):
        TcpReader(host, port, new_secret(), 0, channel="c0")
    with pytest.raises(TcpAuthError, match="rejected"):
        TcpReader(host, port, secret, 0, channel="c1")  # right secret, other channel
    with pytest.raises(TcpAuthError, match="rejected"):
        TcpReader(host, port, secret, 5, channel="c0")  # no such reader index
    r = TcpReader(host, port, secret, 0, channel="c0")
    closing(r)
    # every reader is in: the writer stopped listening, a second reader 0 finds no one
    with pytest.raises(TcpSetupError):
        TcpReader(host, port, secret, 0, channel="c0", connect_timeout=0.5)
    w.write(1, soon())
    assert r.read(soon()) == 1


def test_fake_writer_is_rejected_before_unpickling(tmp_path):
    marker = str(tmp_path / "pwned")
    evil = pickle.dumps(_MakeFile(marker), 5)
    ls = socket.create_server((LOCAL, 0))
    port = ls.getsockname()[1]

    def fake_writer():
        s, _ = ls.accept()
        s.sendall(HELLO + os.urandom(NONCE))
        s.recv(NONCE + 4 + MAC)
        # no secret: a made-up MAC, then a frame that would create the file
        s.sendall(os.urandom(MAC) + HDR.pack(KIND_DATA, 0, 0, 0, len(evil)) + evil)
        time.sleep(0.5)
        s.close()

    th = threading.Thread(target=fake_writer, daemon=True)
    th.start()
    with pytest.raises(TcpAuthError, match="failed authentication"):
        TcpReader(LOCAL, port, new_secret(), 0, channel="c0", connect_timeout=5)
    th.join(5)
    ls.close()
    assert not os.path.exists(marker)


def test_silent_client_does_not_block_readers(closing):
    secret = new_secret()
    w = TcpWriter("c0", 1, 2, secret)
    closing(w)
    host, port = w.listen(LOCAL)
    squatters = [socket.create_connection((host, port), timeout=5) for _ in range(3)]
    try:
        t0 = time.monotonic()
        r = TcpReader(host, port, secret, 0, channel="c0")
        closing(r)
        # a squatter holding the handshake would hold the reader for its 10 s timeout
        assert time.monotonic() - t0 < 8
        w.write("through", soon())
        assert r.read(soon()) == "through"
    finally:
        for s in squatters:
            s.close()


# -- deadlines, close, waiter ------------------------------------------------------------------
def test_read_deadline_raises_wait_timeout(closing):
    w, (r,) = pair(closing)
    for call in (r.read, r.wait_ready):
        t0 = time.monotonic()
        with pytest.raises(WaitTimeout):
            call(time.monotonic() + 0.2)
        assert 0.15 < time.monotonic() - t0 < 10, "the wait must end at its deadline"
    w.write("after", soon())  # a timeout loses nothing
    assert r.read(soon()) == "after"


def test_writer_close_is_channel_closed_after_pending_messages(closing):
    w, (r0, r1) = pair(closing, nreaders=2)
    w.write(1)
    w.write(2)
    w.close()
    for r in (r0, r1):
        assert r.read(soon()) == 1 and r.read(soon()) == 2
        with pytest.raises(ChannelClosed):
            r.read(soon(3))
        with pytest.raises(ChannelClosed):  # and it stays closed
            r.read(soon(3))


def test_reader_close_is_channel_closed_for_a_waiting_writer(closing):
    w, (r,) = pair(closing, slots=1)
    w.write(1)
    t = Writes(w, [2], soon())
    t.start()
    time.sleep(0.2)
    r.close()
    t.join(3)
    assert isinstance(t.error, ChannelClosed), t.error


def test_close_ends_a_blocked_read_in_another_thread(closing):
    w, (r,) = pair(closing)
    box = {}

    def read():
        try:
            r.read(soon())
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["e"] = e

    th = threading.Thread(target=read, daemon=True)
    th.start()
    time.sleep(0.2)
    r.wake()  # a wake-up alone changes nothing ...
    time.sleep(0.2)
    assert th.is_alive()
    w.close()  # ... the writer's CLOSE ends it
    th.join(3)
    assert isinstance(box.get("e"), ChannelClosed), box


class FlagWaiter:
    """A stand-in for channel.Waiter: raises ChannelClosed once ``stop`` is set."""

    procs = ["driver", "a0:Stage", "a1:Stage"]

    def __init__(self):
        self.stop = False
        self.calls = 0
        self.peers_seen = set()

    def check(self, peers, deadline):
        self.calls += 1
        self.peers_seen.add(peers)
        if self.stop:
            raise ChannelClosed()
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout()


def _blocked_wait(side, closing):
    """A thread blocked in read() (side "reader") or write() (a full window), with no
    deadline: only its waiter can end it. Returns (thread, box for its error, waiter,
    wake function)."""
    waiter = FlagWaiter()
    secret = new_secret()
    w = TcpWriter(
        "c0", 1, 1, secret, waiter=waiter if side == "writer" else None, reader_procs=(2,)
    )
    closing(w)
    host, port = w.listen(LOCAL)
    r = TcpReader(host, port, secret, 0, waiter if side == "reader" else None, 1, channel="c0")
    closing(r)
    box = {}

    def wait():
        try:
            if side == "reader":
                r.read()
            else:
                w.write(1)
                w.write(2)  # window of 1: blocks
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["e"] = e

    th = threading.Thread(target=wait, daemon=True)
    th.start()
    return th, box, waiter, (r.wake if side == "reader" else w.wake_all)


@pytest.mark.parametrize("side", ["reader", "writer"])
def test_waits_consult_the_waiter_every_slice(side, closing):
    th, box, waiter, _ = _blocked_wait(side, closing)
    assert wait_until(lambda: waiter.calls >= 3), "waits must consult the waiter each slice"
    assert th.is_alive()
    waiter.stop = True  # no wake-up: the next slice's check ends it
    th.join(10)
    assert isinstance(box.get("e"), ChannelClosed), box
    assert waiter.peers_seen == {()}, "remote pids must never reach the pid check"


@pytest.mark.parametrize("side", ["reader", "writer"])
def test_wake_ends_a_wait_before_its_slice_does(side, closing, monkeypatch):
    from dagc.runtime.channels.tcp import reader as tcp_reader
    from dagc.runtime.channels.tcp import writer as tcp_writer

    monkeypatch.setattr(tcp_reader, "SLICE", 30.0)  # a sleep only a wake-up cuts short
    monkeypatch.setattr(tcp_writer, "SLICE", 30.0)
    th, box, waiter, wake = _blocked_wait(side, closing)
    time.sleep(0.3)
    assert th.is_alive()
    waiter.stop = True
    t0 = time.monotonic()
    wake()
    th.join(20)
    assert isinstance(box.get("e"), ChannelClosed), box
    assert time.monotonic() - t0 < 10, "wake() must end the 30 s sleep well before its end"


# -- a peer process dies -----------------------------------------------------------------------
CHILD_READER = r"""
import sys, time
from dagc.runtime.channels.tcp import TcpReader
host, port, secret = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
r = TcpReader(host, port, secret, 0, channel="c0")
print("connected", flush=True)
r.read()
print("read", flush=True)
time.sleep(60)
"""

CHILD_WRITER = r"""
import sys, time
from dagc.runtime.channels.tcp import TcpWriter
w = TcpWriter("c0", 1, 2, bytes.fromhex(sys.argv[1]))
host, port = w.listen("127.0.0.1")
print(port, flush=True)
w.write("first")
time.sleep(60)
"""


def test_killed_reader_process_is_peer_died_for_the_writer(closing):
    secret = new_secret()
    w = TcpWriter("c0", 1, 1, secret, reader_names=["a1:Child"], liveness=30)
    closing(w)
    host, port = w.listen(LOCAL)
    p = child(CHILD_READER, host, port, secret.hex())
    try:
        assert first_line(p) == "connected"
        w.write(1, soon())
        assert first_line(p) == "read"
        w.write(2, soon())  # fills the window: the next write waits for an ack
        t = Writes(w, [3], soon(20))
        t.start()
        time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        t.join(10)
        assert isinstance(t.error, PeerDied) and t.error.who == "a1:Child", t.error
        assert time.monotonic() - t0 < 10, "the EOF, not a 30 s keepalive, tells"
        with pytest.raises(PeerDied):  # and it stays dead
            w.write(4, soon(2))
    finally:
        p.kill()
        p.wait(10)


def test_killed_writer_process_is_peer_died_for_the_reader(closing):
    secret = new_secret()
    p = child(CHILD_WRITER, secret.hex())
    try:
        port = int(first_line(p))
        r = TcpReader(LOCAL, port, secret, 0, channel="c0", writer_name="a0:Child", liveness=30)
        closing(r)
        assert r.read(soon()) == "first"
        box = {}

        def read():
            try:
                r.read(soon(20))
            except BaseException as e:  # noqa: BLE001 - reported to the test
                box["e"] = e

        th = threading.Thread(target=read, daemon=True)
        th.start()
        time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        th.join(10)
        assert isinstance(box.get("e"), PeerDied) and box["e"].who == "a0:Child", box
        assert time.monotonic() - t0 < 10, "the EOF, not a 30 s keepalive, tells"
        assert r.ready()  # read() would not block: it raises
        with pytest.raises(PeerDied):
            r.read(soon(2))
    finally:
        p.kill()
        p.wait(10)


CHILD_IDLE_READER = r"""
import sys, time
from dagc.runtime.channels.tcp import TcpReader
host, port, secret = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
r = TcpReader(host, port, secret, 0, channel="c0")
print("connected", flush=True)
time.sleep(60)
"""


def test_reader_killed_mid_frame_is_peer_died_for_the_writer(closing):
    secret = new_secret()
    w = TcpWriter("c0", 1, 1, secret, reader_names=["a2:Child"], liveness=30)
    closing(w)
    host, port = w.listen(LOCAL)
    p = child(CHILD_IDLE_READER, host, port, secret.hex())
    try:
        assert first_line(p) == "connected"
        w.write(np.ones(32 << 20, dtype=np.uint8), soon())  # queued: the child never reads
        t = Writes(w, [1], soon(20))
        t.start()
        time.sleep(0.3)
        p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        t.join(10)
        assert isinstance(t.error, PeerDied) and t.error.who == "a2:Child", t.error
        assert time.monotonic() - t0 < 10, "the EOF, not a 30 s keepalive, tells"
    finally:
        p.kill()
        p.wait(10)


def test_dead_peer_is_marked_in_the_control_segment(closing):
    class Control:
        failed = None

        def fail(self, i):
            Control.failed = i

    class W(FlagWaiter):
        control = Control()

    waiter = W()
    secret = new_secret()
    w = TcpWriter("c0", 1, 1, secret)
    host, port = w.listen(LOCAL)
    r = TcpReader(host, port, secret, 0, waiter, 1, channel="c0")
    closing(r)
    w.close(abort=True)  # as if the writer's process had died
    with pytest.raises(PeerDied) as ei:
        r.read(soon(3))
    assert ei.value.who == "a0:Stage" and Control.failed == 1


def test_writer_closed_by_a_death_passes_the_name_on(closing):
    class Control:
        failed = []

        def fail(self, i):
            Control.failed.append(i)

    class W(FlagWaiter):
        control = Control()

    secret = new_secret()
    w = TcpWriter("c0", 1, 2, secret)
    closing(w)
    r = TcpReader(*w.listen(LOCAL), secret, 0, W(), 1, channel="c0")
    closing(r)
    w.write("last")
    w.close(failed="a1:Stage")  # its loop ended because a1 died elsewhere
    assert r.read(soon()) == "last"
    for _ in range(2):
        with pytest.raises(PeerDied) as ei:
            r.read(soon(3))
        assert ei.value.who == "a1:Stage"
    assert Control.failed[0] == 2  # marked by name, for this node's other processes


def test_busy_reader_outlives_the_liveness_timeout(closing):
    """A reader that stays alive but does not read (a long method) for longer than
    ``liveness`` keeps its connection: only silence from a dead host ends it."""
    secret = new_secret()
    w = TcpWriter("c0", 1, 2, secret, liveness=1.0)
    closing(w)
    r = TcpReader(*w.listen(LOCAL), secret, 0, channel="c0", liveness=1.0)
    closing(r)
    a = np.arange(4 << 20, dtype=np.int64)  # 32 MiB: fills both socket buffers
    w.write(a, soon())
    time.sleep(2.5)  # zero window, probes answered
    assert np.array_equal(r.read(soon()), a)
    w.write("still here", soon())
    assert r.read(soon()) == "still here"


def test_keepalive_and_user_timeout_are_set(closing):
    secret = new_secret()
    w = TcpWriter("c0", 1, 2, secret, liveness=4.0)
    closing(w)
    r = TcpReader(*w.listen(LOCAL), secret, 0, channel="c0", liveness=4.0)
    closing(r)
    w.wait_connected(soon())
    for s, user_timeout in ((r.sock, 4000), (w._conns[0].sock, 0)):
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        idle = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
        intvl = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
        cnt = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
        assert idle + intvl * cnt <= 4
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            # the writer's side has none: a zero window must not count as a dead reader
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == user_timeout


# -- two processes; the benchmark ------------------------------------------------------------
CHILD_ECHO = r"""
import sys
from dagc.runtime.channels import ChannelClosed, PeerDied
from dagc.runtime.channels.tcp import TcpReader, TcpWriter
secret, port = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
w = TcpWriter("back", 1, 8, secret)
print(w.listen("127.0.0.1")[1], flush=True)
r = TcpReader("127.0.0.1", port, secret, 0, channel="fwd")
try:
    while True:
        w.write(r.read())
except (ChannelClosed, PeerDied):
    pass
"""


def test_echo_through_another_process(closing):
    secret = new_secret()
    w = TcpWriter("fwd", 1, 8, secret)
    closing(w)
    host, port = w.listen(LOCAL)
    p = child(CHILD_ECHO, secret.hex(), port)
    try:
        r = TcpReader(LOCAL, int(first_line(p)), secret, 0, channel="back")
        closing(r)
        for i in range(500):
            w.write(i, soon())
            assert r.read(soon()) == i
        w.close()
        p.wait(10)
    finally:
        p.kill()
        p.wait(10)


def test_tcp_benchmark_runs():
    """benchmarks/tcp.py (the latency and throughput figures, plain and TLS) on a tiny n:
    it must not rot. No timing is asserted."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from benchmarks import tcp as bench
    from tests import tls_certs

    modes = ("plain", "tls") if tls_certs.available() is None else ("plain",)
    res = bench.run(n=20, modes=modes)
    assert [r["mode"] for r in res] == list(modes)
    for r in res:
        assert 0 < r["rtt_p50_us"] <= r["rtt_p99_us"] and r["small_per_s"] > 0
    assert "rtt p50" in bench.table(res)
