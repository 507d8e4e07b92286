"""The shared-memory ring channel, in one process and under seeded multi-process stress."""

import multiprocessing as mp
import os
import random
import secrets
import stat
import time

import numpy as np
import pytest

from dagc.runtime import channels as ch
from dagc.runtime.channels import control, segment, shm


@pytest.fixture
def prefix():
    p = f"dagc-{secrets.token_hex(12)}-"
    yield p
    shm.unlink_prefix(p)


def _setup(prefix, nreaders=1, slots=4, capacity=1024, mode="adaptive"):
    ctl = ch.Control(prefix + "ctl", create=True)
    waiter = ch.Waiter(ctl, ["driver"] + [f"r{i}" for i in range(nreaders)], mode)
    w = ch.Writer(prefix + "c0", nreaders, slots, capacity, waiter)
    rs = [ch.Reader(prefix + "c0", i, waiter) for i in range(nreaders)]
    return ctl, waiter, w, rs


def test_round_trip_values(prefix):
    _, _, w, (r,) = _setup(prefix)
    values = [0, None, "x" * 10, {"a": [1, 2]}, np.arange(5), b"\x00" * 3000, (1, (2, 3))]
    for v in values:
        w.write(v)
        got = r.read()
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(got, v)
        else:
            assert got == v


def test_segments_are_private_and_unguessable(prefix):
    _setup(prefix)
    st = os.stat(shm.path(prefix + "c0"))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert len(prefix) >= len("dagc-") + 24


def test_ring_full_blocks_writer_until_read(prefix):
    _, _, w, (r,) = _setup(prefix, slots=2)
    w.write(1)
    w.write(2)
    with pytest.raises(ch.WaitTimeout):
        w.write(3, deadline=time.monotonic() + 0.05)
    assert r.read() == 1
    w.write(3)
    assert [r.read(), r.read()] == [2, 3]


def _slots_used(w, first, last):
    return [w.w[w.map + m % w.slots] for m in range(first, last)]


def test_writer_reuses_the_slot_released_last(prefix):
    _, _, w, (r1, r2) = _setup(prefix, nreaders=2, slots=4)
    for i in range(6):  # one message at a time: always the same slot
        w.write(i)
        assert (r1.read(), r2.read()) == (i, i)
    assert len(set(_slots_used(w, 0, 6))) == 1
    for i in range(3):  # three in flight: three distinct slots
        w.write(("x", i))
    assert len(set(_slots_used(w, 6, 9))) == 3
    assert [r1.read() for _ in range(3)] == [("x", 0), ("x", 1), ("x", 2)]
    w.write("held")  # r2 still holds all three: a fourth slot
    assert len(set(_slots_used(w, 6, 10))) == 4
    with pytest.raises(ch.WaitTimeout):  # and then none is free until r2 reads
        w.write("no room", deadline=time.monotonic() + 0.05)
    assert r2.read() == ("x", 0)
    w.write("room")
    assert _slots_used(w, 10, 11) == _slots_used(w, 6, 7)  # the slot just released
    assert [r2.read() for _ in range(4)] == [("x", 1), ("x", 2), "held", "room"]
    assert [r1.read(), r1.read()] == ["held", "room"]


def test_read_deadline_and_nothing_consumed(prefix):
    _, _, w, (r,) = _setup(prefix)
    t0 = time.monotonic()
    with pytest.raises(ch.WaitTimeout):
        r.wait_ready(time.monotonic() + 0.05)
    assert time.monotonic() - t0 < 1.0
    w.write("late")
    assert r.read() == "late"


def test_big_values_keep_order_and_only_their_slot_grows(prefix):
    """Payloads bigger than a slot go to that slot's own big-value segment: messages stay
    in order and intact while unread across big writes, the ring itself never grows (the
    old design re-made the whole ring, nslots x the largest value), and every big-value
    segment's name is gone once its reader mapped it."""
    _, _, w, (r,) = _setup(prefix, slots=3, capacity=256)
    ring_size = os.path.getsize(shm.path(prefix + "c0"))
    deadline = time.monotonic() + 10
    for batch in ([10, 5000], [10, 100_000], [3, 50], [400_000], [300_000, 200_000, 9]):
        for n in batch:  # messages stay unread across a big write
            w.write(np.full(n, n % 256, dtype=np.uint8), deadline)
        got = [r.read(deadline) for _ in batch]
        for n, a in zip(batch, got):
            assert a.size == n and (a == n % 256).all()
        del got, a
    w.write(0, deadline)
    assert r.read(deadline) == 0
    assert os.path.getsize(shm.path(prefix + "c0")) == ring_size
    assert _names(prefix) == [prefix + "c0", prefix + "ctl"]
    # memory follows what is in flight: at most one big segment per slot that held a big
    # value at once (3 here), sized to its value, not nslots x the largest value
    st = w.stats()
    assert st["big_segments"] <= 3 and st["big_bytes"] <= 3 * (400_000 + 2 * segment.PAGE)


def _names(prefix):
    return sorted(p for p in os.listdir(shm.SHM_DIR) if p.startswith(prefix))


def test_big_segment_name_goes_when_its_last_reader_maps_it(prefix):
    """A big-value segment's name exists only until every reader has mapped it: the last
    reader to map it removes it, before the writer writes again."""
    _, _, w, (r1, r2) = _setup(prefix, nreaders=2, slots=2, capacity=256)
    deadline = time.monotonic() + 10
    w.write(np.zeros(10_000, dtype=np.uint8), deadline)  # slot 0's big segment
    big = segment.big_name(f"{prefix}c0", w._big[0].gen)  # c0.x<random generation>
    assert big in _names(prefix)
    assert r1.read(deadline).size == 10_000
    assert big in _names(prefix)  # r2 has not mapped it yet
    assert r2.read(deadline).size == 10_000
    assert big not in _names(prefix)  # nobody opens it by name again
    for i in range(5):  # and the channel goes on
        w.write(np.full(9000, i, dtype=np.uint8), deadline)
        assert r1.read(deadline)[0] == i and r2.read(deadline)[-1] == i
    assert _names(prefix) == [prefix + "c0", prefix + "ctl"]
    st = w.w  # pids recorded for the sweep
    assert st[segment.W_WPID] == os.getpid()
    assert st[segment.rpid_word(0)] == st[segment.rpid_word(1)] == os.getpid()


def _open_and_mark(prefix, go, out):
    ctl = ch.Control(prefix + "ctl")
    r = ch.Reader(prefix + "c0", 0, ch.Waiter(ctl, ["w", "r"]))
    go.wait(30)
    out.put(ctl.mark_opened([prefix + "c0", prefix + "ctl"]))
    r.close()
    ctl.release()


def test_last_process_to_map_its_ends_removes_the_names(prefix):
    """Each process of a node counts itself in the control segment once it mapped its
    ends; exactly one, the last, removes the node's names (under a flock: processes that
    count at the same moment cannot both miss being last), and the mappings live on."""
    nprocs = 4
    ctl = ch.Control(prefix + "ctl", create=True, nprocs=nprocs + 1, index=0, pid=os.getpid())
    w = ch.Writer(prefix + "c0", 1, 2, 256, ch.Waiter(ctl, ["w", "r"]))
    assert ctl.mark_opened([prefix + "c0", prefix + "ctl"]) is False  # 1 of 5
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_open_and_mark, args=(prefix, go, out)) for _ in range(nprocs)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)
        assert sorted(os.listdir(shm.SHM_DIR)).count(prefix + "ctl") == 1
        go.set()  # all count at about the same time
        results = [out.get(timeout=60) for _ in procs]
        assert sorted(results) == [False] * (nprocs - 1) + [True]
        assert _names(prefix) == []
        assert ctl.words[control.C_OPENED] == nprocs + 1
        w.write("still mapped")  # the writer's mapping lives on
        assert w.w[segment.W_WSEQ] == 1
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        w.close()
        ctl.release()


def test_closed_control_ends_waits(prefix):
    ctl, _, w, (r,) = _setup(prefix)
    ctl.close()
    with pytest.raises(ch.ChannelClosed):
        r.read(time.monotonic() + 5)


def test_dead_writer_is_reported(prefix):
    ctl, waiter, w, (r,) = _setup(prefix, mode="block")
    proc = mp.get_context("spawn").Process(target=time.sleep, args=(30,))
    proc.start()
    try:
        ctl.set_pid(0, proc.pid)
        r.peers = (0,)
        proc.kill()
        proc.join(10)
        t0 = time.monotonic()
        with pytest.raises(ch.PeerDied):
            r.read(time.monotonic() + 10)
        assert time.monotonic() - t0 < 5
        assert ctl.state == ch.FAILED
    finally:
        proc.kill()
        proc.join(5)


# -- seeded multi-process stress --------------------------------------------------------------


def _writer_proc(prefix, nreaders, slots, capacity, seed, count, mode):
    rng = random.Random(seed)
    ctl = ch.Control(prefix + "ctl")
    waiter = ch.Waiter(ctl, ["w"] + [f"r{i}" for i in range(nreaders)], mode)
    w = ch.Writer(prefix + "c0", nreaders, slots, capacity, waiter, create=False)
    deadline = time.monotonic() + 60
    for i in range(count):
        n = rng.choice(
            [
                0,
                1,
                7,
                100,
                capacity - 64,
                capacity,
                capacity + 1,
                3 * capacity,
                rng.randrange(0, 4 * capacity),
                rng.randrange(segment.ZERO_COPY_MIN, 4 * segment.ZERO_COPY_MIN),
            ]
        )
        if rng.random() < 0.5:
            value = (i, np.full(n // 8 + 1, i, dtype=np.int64))
        else:
            value = (i, bytes([i % 256]) * n)
        w.write(value, deadline)
    w.close()


def _reader_proc(prefix, index, count, seed, mode, out):
    rng = random.Random(seed * 1000 + index)
    ctl = ch.Control(prefix + "ctl")
    waiter = ch.Waiter(ctl, ["w", "r"], mode)
    r = ch.Reader(prefix + "c0", index, waiter)
    deadline = time.monotonic() + 60
    bad = 0
    held = []  # values kept a while (leased views): never overwritten under us

    def intact(i, payload):
        return (
            ((payload == i).all())
            if isinstance(payload, np.ndarray)
            else payload == bytes([i % 256]) * len(payload)
        )

    for i in range(count):
        j, payload = r.read(deadline)
        bad += not (j == i and intact(i, payload))
        if rng.random() < 0.3:
            held.append((i, payload))
        if held and rng.random() < 0.25:
            k, v = held.pop(rng.randrange(len(held)))
            bad += not intact(k, v)
        if rng.random() < 0.05 * index:
            time.sleep(rng.random() * 0.002)  # readers at different speeds
    bad += sum(not intact(k, v) for k, v in held)
    out.put((index, bad))
    r.close()


@pytest.mark.parametrize("mode", ["adaptive", "block", "spin"])
def test_stress_multi_process(prefix, mode):
    seed = int(os.environ.get("DAGC_STRESS_SEED", random.randrange(1 << 30)))
    print(f"stress seed={seed} mode={mode} (rerun: DAGC_STRESS_SEED={seed})")
    rng = random.Random(seed)
    nreaders, slots, capacity = rng.randint(1, 3), rng.randint(1, 4), rng.choice([256, 4096])
    count = 300
    ctx = mp.get_context("spawn")
    ch.Control(prefix + "ctl", create=True)
    ch.create_segment(prefix + "c0", nreaders, slots, capacity).close()
    out = ctx.Queue()
    readers = [
        ctx.Process(target=_reader_proc, args=(prefix, i, count, seed, mode, out))
        for i in range(nreaders)
    ]
    writer = ctx.Process(
        target=_writer_proc, args=(prefix, nreaders, slots, capacity, seed, count, mode)
    )
    procs = readers + [writer]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=90) for _ in readers)
        for p in procs:
            p.join(30)
        assert writer.exitcode == 0, f"writer failed (seed {seed})"
        assert results == {i: 0 for i in range(nreaders)}, f"corrupt reads (seed {seed})"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array(5.5),  # 0-d
        np.zeros((0, 3), dtype=np.int16),  # empty
        np.array([True, False]),
        np.array([1 + 2j], dtype=np.complex128),
        np.array(["ab", "cde"]),
        np.array(["2026-11-26"], dtype="datetime64[ns]"),
        np.arange(4, dtype=">f4"),  # big-endian
        np.arange(20)[::2],  # not contiguous: pickled instead
        np.zeros(2, dtype=[("x", "i4"), ("y", "f8")]),  # structured: pickled instead
        np.array([{"a": 1}, None], dtype=object),  # objects: pickled instead
    ],
)
@pytest.mark.parametrize("reps", [1, 20_000])  # copied (small) and leased views
def test_array_values_round_trip_exactly(prefix, arr, reps):
    """Arrays come back equal, with their dtype and shape, and read-only (as Ray Compiled
    Graph's are: a view of the slot, or for small payloads a private copy that behaves
    the same), except where pickle itself builds the array in-band (object arrays,
    non-contiguous ones); ``np.array(x)`` gives a writeable copy."""
    if reps > 1:
        arr = np.concatenate([arr.reshape(-1)] * reps) if arr.ndim else arr
    _, _, w, (r,) = _setup(prefix, capacity=64)
    w.write(arr)
    got = r.read()
    assert type(got) is np.ndarray and got.dtype == arr.dtype and got.shape == arr.shape
    assert got.tolist() == arr.tolist()
    in_band = arr.dtype.kind == "O" or not (arr.flags.c_contiguous or arr.flags.f_contiguous)
    assert got.flags.writeable == in_band
    if not in_band:
        with pytest.raises(ValueError, match="read-only"):
            got[...] = got
    mine = np.array(got)
    assert mine.flags.writeable and mine.tolist() == arr.tolist()


class _LoadsBadly:
    def __reduce__(self):
        return (_refuse, ("_LoadsBadly cannot be loaded",))


def _refuse(msg):
    raise RuntimeError(msg)


def _error_text(value) -> str:
    from dagc.runtime.failure import Failure

    assert value.__class__ is Failure, value
    return str(value.to_error())


def test_decode_failures_say_what_failed(prefix):
    """A message the reader cannot decode is consumed and becomes a Failure that names the
    writer and the channel and says what failed: unpickling, or a big-value segment that
    could not be opened (not "could not be unpickled ... classes can be imported")."""
    ctl, _, w, (r,) = _setup(prefix, capacity=256)
    ctl.set_pid(0, os.getpid())  # process 0 ("driver") wrote it: found by its pid
    deadline = time.monotonic() + 10
    w.write(_LoadsBadly(), deadline)
    text = _error_text(r.read(deadline))
    assert "a value sent by driver on channel c0 could not be unpickled" in text, text
    assert "_LoadsBadly cannot be loaded" in text
    w.write(np.arange(5000), deadline)  # goes to slot 0's big-value segment
    name = segment.big_name(prefix + "c0", w._big[0].gen)
    shm.unlink(name)  # gone before its reader opened it
    text = _error_text(r.read(deadline))
    assert f"big-value segment {name} could not be opened" in text, text
    assert "FileNotFoundError" in text and "on channel c0" in text, text
    assert "unpickled" not in text and "imported" not in text, text
    for v in (7, np.arange(3)):  # the next messages are right
        w.write(v, deadline)
        assert np.array_equal(r.read(deadline), v)
