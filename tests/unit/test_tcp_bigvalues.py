"""Big values on a TCP channel (issue 12): sent from the caller's buffers while the reader
takes them, received straight into the buffer the values are made from (reused once they
are gone), read-only like a shm slot's, and never a deadlock when two ends send each other
big values at once. The speed figure (vs a plain socket pair) is in benchmarks/tcp.py."""

import threading
import time

import numpy as np
import pytest

from dagc.runtime.channels.tcp import TcpReader, TcpWriter, buffers, new_secret
from dagc.runtime.channels.tcp import writer as tcp_writer

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _plain_tcp(monkeypatch):
    monkeypatch.delenv("RAY_USE_TLS", raising=False)


@pytest.fixture
def closing():
    ends = []
    yield ends.append
    for e in ends:
        try:
            e.close()
        except Exception:
            pass


def _pair(closing, channel="c0"):
    secret = new_secret()
    w = TcpWriter(channel, 1, 4, secret, tls=None)
    closing(w)
    host, port = w.listen("127.0.0.1")
    r = TcpReader(host, port, secret, 0, channel=channel, connect_timeout=10, tls=None)
    closing(r)
    return w, r


def _soon(s=30.0):
    return time.monotonic() + s


@pytest.mark.timeout(120)
def test_big_frames_arrive_intact_read_only_and_reuse_their_buffer(closing):
    """16 MiB arrays (as a value and beside a tensor in a dict) arrive intact and
    read-only; once a received value is gone, the next big frame lands in the same
    memory (no fresh pages to fault in), and a held one is never reused under it."""
    w, r = _pair(closing)
    got = {}
    before: set[int] = set()  # the stores step 1 read into

    def read(n):
        got["values"] = [r.read(_soon()) for _ in range(n)]

    for step in range(3):
        a = np.full(2 * MiB, step, dtype=np.float64)  # 16 MiB
        t = threading.Thread(target=read, args=(2,))
        t.start()
        w.write(a, _soon())
        w.write({"x": a, "k": step}, _soon())
        t.join(60)
        x, d = got.pop("values")
        assert not x.flags.writeable and (x == step).all() and x.size == a.size
        assert d["k"] == step and (d["x"] == step).all() and not d["x"].flags.writeable
        stores = {ref.store.ctypes.data for ref in r._buffers._lent.values()}
        if step == 0:
            held = d["x"]  # kept: its buffer stays its own
        elif step == 2:
            assert stores & before, "a fresh buffer, not the spare"
        del x, d
        if step == 1:
            before = stores
            assert r._buffers._spare.ctypes.data in stores  # given back once gone
    assert (held == 0).all()


@pytest.mark.timeout(120)
def test_a_reader_that_does_not_read_holds_write_up_only_briefly(closing, monkeypatch):
    """write() sends a big frame from the caller's buffer while the reader takes it; a
    reader busy elsewhere makes it copy the rest and queue it instead of waiting (about
    a copy's time): the caller may change its array right after write() returns."""
    copies = []
    real = tcp_writer.freeze_rest
    monkeypatch.setattr(
        tcp_writer, "freeze_rest", lambda parts, n: copies.append(n) or real(parts, n)
    )
    w, r = _pair(closing)
    a = np.full(8 * MiB, 1, dtype=np.uint8)
    t0 = time.monotonic()
    w.write(a, _soon())  # nobody reads yet
    assert time.monotonic() - t0 < 5
    assert copies, "the unsent rest was not queued"
    a[:] = 9  # the caller's, again
    x = r.read(_soon())
    assert x.size == a.size and (x == 1).all()


@pytest.mark.timeout(120)
def test_two_ends_sending_each_other_big_values_do_not_deadlock(closing):
    """Actors on two nodes that write a big value to each other, then read: neither
    write may wait for the other side to read (a cycle), each finishes."""
    w1, r1 = _pair(closing, "c1")  # side A writes w1, reads r2
    w2, r2 = _pair(closing, "c2")  # side B writes w2, reads r1
    out = {}

    def side(name, w, r, fill):
        try:
            for i in range(3):
                w.write(np.full(32 * MiB, fill + i, dtype=np.uint8), _soon(60))
                v = r.read(_soon(60))
                out.setdefault(name, []).append(int(v[0]) == int(v[-1]))
        except Exception as e:  # pragma: no cover - reported below
            out[name + "_error"] = repr(e)

    ts = [
        threading.Thread(target=side, args=("a", w1, r2, 10)),
        threading.Thread(target=side, args=("b", w2, r1, 20)),
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    assert not any(t.is_alive() for t in ts), "deadlock"
    assert out == {"a": [True] * 3, "b": [True] * 3}, out


def test_small_frames_do_not_use_the_spare():
    fb = buffers.FrameBuffers()
    assert fb.take(100).nbytes == 100 and fb._spare is None
    big = fb.take(buffers.REUSE_MIN)
    addr = big.ctypes.data
    del big
    assert fb._spare is not None
    again = fb.take(buffers.REUSE_MIN)
    assert again.ctypes.data == addr and fb._spare is None
    fb.close()
    del again
    assert fb._spare is None  # closed: nothing kept
