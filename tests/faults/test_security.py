"""Segments are created 0600, owned by this user, under unguessable names, and never
adopted when the name already exists (O_EXCL: no pre-created file or symlink is used).
Cleaning up after dead DAGs trusts only this user's own, well-formed segments: what
another user plants in /dev/shm cannot make dagc remove a live DAG's segments."""

import os
import re
import secrets
import stat
import struct
import time

import numpy as np
import pytest

import dagc
from dagc import InputNode
from dagc.runtime.channels import control, segment, shm, sweep
from tests.faults.helpers import created_segments, record_creates, segments

NAME = re.compile(r"^dagc-[0-9a-f]{24}-(ctl(\.\d+)?|c\d+(\.x\d+)?)$")


@pytest.mark.timeout(120)
def test_segments_are_private_and_unguessable(ray, nodes):
    """Every segment a DAG makes (control, rings, grown rings; in the driver and in the
    actors) is a regular file, mode 0600 even under a umask of 0, owned by this user,
    under an unguessable name, checked as it is created; and once the DAG runs, and
    after each growth, no name is left at all."""
    a, b = nodes(2)
    with InputNode() as inp:
        dag = b.step.bind(a.step.bind(inp))
    ray.get([h.__ray_call__.remote(record_creates) for h in (a, b)], timeout=30)
    record_creates()
    made = []
    try:
        cg = dagc.compile(dag, buffer_size=4096)
        with cg:
            assert not segments(cg._session.token), segments(cg._session.token)  # gone once mapped
            x = np.ones(100_000)
            # the driver's input ring, a's and b's output rings all make a big-value
            # segment (.x1) for it
            assert cg.execute(x).get(timeout=30).sum() == x.sum()
            assert not segments(cg._session.token), segments(cg._session.token)  # followed, so gone
            assert cg.execute(x).get(timeout=30).sum() == x.sum()
    finally:
        made = created_segments()
        for h in (a, b):
            made += ray.get(h.__ray_call__.remote(created_segments), timeout=30)
    names = [n for n, _, _ in made]
    bigs = [n.rsplit("-", 1)[1] for n in names if ".x" in n]
    assert {b.split(".")[0] for b in bigs} >= {"c0", "c1", "c2"} and any(
        "-ctl" in n for n in names
    ), names
    # a big-value segment's generation is random: the next name cannot be guessed
    assert all(int(b.split(".x")[1]) > 1 << 32 for b in bigs), bigs
    assert all(n.startswith(f"dagc-{cg._session.token}-") for n in names), names
    for name, mode, uid in made:
        assert NAME.match(name), name
        assert stat.S_ISREG(mode), name
        assert stat.S_IMODE(mode) == 0o600, (name, oct(mode))
        assert uid == os.getuid(), name
    with dagc.compile(c_dag(nodes)) as other:
        assert other._session.token != cg._session.token
    assert len(cg._session.token) == 24 and int(cg._session.token, 16) >= 0  # 96 random bits


def c_dag(nodes):
    (c,) = nodes(1, start=5)
    with InputNode() as inp:
        return c.step.bind(inp)


def test_existing_name_is_never_adopted(tmp_path):
    """shm.create refuses a name that exists (a file, a symlink); what a DAG does then is
    test_planted_big_value_names_never_stop_a_dag's and ..._move_to_the_next_name's."""
    name = f"dagc-{secrets.token_hex(12)}-c0"
    mm = shm.create(name, 4096)
    try:
        with pytest.raises(FileExistsError):
            shm.create(name, 4096)  # a pre-created file is not reused
    finally:
        mm.close()
        shm.unlink(name)
    target = tmp_path / "target"
    target.write_bytes(b"")
    link = os.path.join(shm.SHM_DIR, f"dagc-{secrets.token_hex(12)}-c0")
    os.symlink(target, link)
    try:
        with pytest.raises(FileExistsError):  # nor is a symlink followed
            shm.create(os.path.basename(link), 4096)
        assert target.read_bytes() == b""
    finally:
        os.unlink(link)


def _plant(name: str) -> str:
    """A file under ``name`` in /dev/shm: another user's where this test runs as root (it
    is refused the same way either way: O_EXCL)."""
    p = shm.path(name)
    _write(p, b"planted")
    if os.getuid() == 0:
        os.chown(p, 65534, 65534)
    return p


@pytest.mark.timeout(120)
def test_planted_big_value_names_never_stop_a_dag(ray, nodes):
    """Files planted under the names a DAG's big-value segments would have had as counted
    generations (<ring>.x1, .x2, ...), for the driver's ring and each actor's: big values
    still go through every channel, the DAG goes on, and the planted files are untouched."""
    a, b = nodes(2)
    with InputNode() as inp:
        dag = b.step.bind(a.step.bind(inp))
    planted = []
    try:
        with dagc.compile(dag, buffer_size=4096) as cg:
            prefix = shm.dag_prefix(cg._session.token)
            for c in ("c0", "c1", "c2"):
                for gen in range(1, 4):
                    planted.append(_plant(f"{prefix}{c}.x{gen}"))
            before = [os.lstat(p) for p in planted]
            for i in range(3):
                x = np.full(100_000, float(i))
                got = cg.execute(x).get(timeout=30)
                assert np.array_equal(got, x)
            assert cg.execute(5).get(timeout=30) == 5
            after = [os.lstat(p) for p in planted]
            assert [(s.st_ino, s.st_size) for s in after] == [(s.st_ino, s.st_size) for s in before]
            assert all(open(p, "rb").read() == b"planted" for p in planted)
    finally:
        for p in planted:
            if os.path.lexists(p):
                os.unlink(p)


@pytest.mark.timeout(60)
def test_planted_big_value_name_moves_to_the_next_name(monkeypatch):
    """Even a planted file under the very name the writer draws is skipped: the writer
    draws another name and the value goes through; the reader follows it."""
    from dagc.runtime import channels as ch

    prefix = f"dagc-{secrets.token_hex(12)}-"
    draws = iter([41, 42, 42, 43])  # +1 in the writer: .x42, .x43, .x43, .x44
    monkeypatch.setattr(segment.secrets, "randbits", lambda n: next(draws))
    planted = [_plant(f"{prefix}c0.x{g}") for g in (42, 43)]
    ctl = ch.Control(prefix + "ctl", create=True)
    try:
        waiter = ch.Waiter(ctl, ["driver", "r0"], "adaptive")
        w = ch.Writer(prefix + "c0", 1, 2, 256, waiter)
        r = ch.Reader(prefix + "c0", 0, waiter)
        try:
            x = np.arange(10_000)
            w.write(x, time.monotonic() + 10)
            assert w._big[0].gen == 44  # 42 and 43 exist: skipped
            assert np.array_equal(r.read(time.monotonic() + 10), x)
        finally:
            r.close()
            w.close()
        assert all(open(p, "rb").read() == b"planted" for p in planted)
    finally:
        ctl.release()
        for p in planted:
            if os.path.lexists(p):
                os.unlink(p)
        shm.unlink_prefix(prefix)


def test_stale_sweep_spares_live_and_half_created_dags():
    """sweep.sweep_stale removes a DAG only when every pid in its control segment is dead;
    a control segment still without a driver pid (being created) is left alone."""
    dead = _dead_pid()
    made = {}
    for kind, pids in {"live": [os.getpid(), dead], "stale": [dead, dead], "new": []}.items():
        prefix = f"dagc-{secrets.token_hex(12)}-"
        c = control.Control(prefix + "ctl.0", create=True)
        for i, p in enumerate(pids):
            c.set_pid(i, p)
        segment.create_segment(prefix + "c0", 1, 2, 64).close()
        made[kind] = (prefix, c)
    try:
        stale = sweep.stale_prefixes()
        assert made["stale"][0] in stale
        assert made["live"][0] not in stale and made["new"][0] not in stale
        sweep.sweep_stale()
        assert not [n for n in os.listdir(shm.SHM_DIR) if n.startswith(made["stale"][0])]
        assert len([n for n in os.listdir(shm.SHM_DIR) if n.startswith(made["live"][0])]) == 2
    finally:
        for prefix, c in made.values():
            c.release()
            shm.unlink_prefix(prefix)


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- what cleaning up after dead DAGs trusts ---------------------------------------------------


def _write(path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# a control segment's layout, spelled out (test_control_layout checks it is dagc's)
CTL_SIZE, CTL_MAGIC_WORD, CTL_PIDS = 4096, 2, 8
CTL_MAGIC = int.from_bytes(b"dagc-ctl", "little")


def test_control_layout():
    assert (control.CTL_SIZE, control.C_MAGIC, control.C_PIDS, control.CTL_MAGIC) == (
        CTL_SIZE,
        CTL_MAGIC_WORD,
        CTL_PIDS,
        CTL_MAGIC,
    )


def _ctl_bytes(pids, magic=True, size=CTL_SIZE) -> bytes:
    """What a control segment listing ``pids`` holds (``size`` bytes, magic word or not)."""
    words = [0] * (max(size, CTL_SIZE) // 8)
    if magic:
        words[CTL_MAGIC_WORD] = CTL_MAGIC
    for i, pid in enumerate(pids):
        words[CTL_PIDS + i] = pid
    return struct.pack(f"<{len(words)}q", *words)[:size]


def _other_owner(path, monkeypatch) -> None:
    """Make ``path`` another user's: chown as root, else make dagc believe it runs as
    another uid (then this file, and everything else of ours, is not its own)."""
    if os.getuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        monkeypatch.setattr(shm.os, "getuid", lambda: os.geteuid() + 1)


PLANTED = ["other-owner", "symlink", "hard-link", "wrong-size", "no-magic", "fifo", "directory"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", PLANTED)
def test_planted_control_file_cannot_make_dagc_remove_a_live_dag(kind, tmp_path, monkeypatch):
    """Names in /dev/shm are visible to every user, and anyone can create one there. A
    "control segment" planted under a live DAG's prefix with dead pids must not make the
    stale sweep remove that DAG's segments; the planted entry itself is left untouched.
    A real stale DAG next to it is still swept."""
    dead = _dead_pid()
    live = f"dagc-{secrets.token_hex(12)}-"  # the victim: a grown ring in use
    segment.create_segment(live + "c0.x1", 1, 2, 64).close()
    seg = memoryview(shm.open_existing(live + "c0.x1")).cast("q")
    seg[4] = seg[25] = os.getpid()  # its writer's and reader's pids
    stale = f"dagc-{secrets.token_hex(12)}-"  # a real leftover, to show the sweep runs
    _write(shm.path(stale + "ctl.0"), _ctl_bytes([dead]))
    segment.create_segment(stale + "c0", 1, 2, 64).close()
    planted = shm.path(live + "ctl.7")
    elsewhere = shm.path(f"dagc-{secrets.token_hex(12)}-x")  # a link's target
    try:
        good = _ctl_bytes([dead, dead])  # what the sweep would act on
        if kind == "other-owner":
            _write(planted, good)
            _other_owner(planted, monkeypatch)
        elif kind == "symlink":
            _write(elsewhere, good)
            os.symlink(elsewhere, planted)
        elif kind == "hard-link":
            _write(elsewhere, good)
            os.link(elsewhere, planted)
        elif kind == "wrong-size":
            _write(planted, _ctl_bytes([dead, dead], size=2 * CTL_SIZE))
        elif kind == "no-magic":
            _write(planted, _ctl_bytes([dead, dead], magic=False))
        elif kind == "fifo":  # opening it must not block
            os.mkfifo(planted, 0o600)
        elif kind == "directory":
            os.mkdir(planted, 0o700)
        before = os.lstat(planted)
        ours = not (kind == "other-owner" and os.getuid() != 0)  # see _other_owner
        stale_now = sweep.stale_prefixes()
        assert live not in stale_now and (stale in stale_now or not ours), stale_now
        sweep.sweep_stale()
        assert os.path.exists(shm.path(live + "c0.x1")), "the live DAG's segment was removed"
        after = os.lstat(planted)  # untouched, not even replaced
        assert (after.st_ino, after.st_mode, after.st_uid, after.st_size) == (
            before.st_ino,
            before.st_mode,
            before.st_uid,
            before.st_size,
        )
        if kind in ("symlink", "hard-link"):
            assert open(elsewhere, "rb").read() == good
        if ours:
            assert not [n for n in os.listdir(shm.SHM_DIR) if n.startswith(stale)]
    finally:
        seg.release()
        for p in (planted, elsewhere):
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            elif os.path.lexists(p):
                os.unlink(p)
        shm.unlink(live + "c0.x1")
        shm.unlink_prefix(stale)


@pytest.mark.timeout(60)
def test_sweep_removes_big_value_segments_whose_processes_all_died(monkeypatch):
    """A big-value segment's name lives until its last reader maps it; if every process
    of the DAG dies in that window, the segment (whose control segment is gone since
    start) is recognised by the pids in its own header: removed when all of them are
    dead, kept while any lives or none is recorded yet, and never when it is not a
    well-formed segment of this user's."""
    dead = _dead_pid()
    made = {}

    def ring(kind, writer, readers, extra=b""):
        name = f"dagc-{secrets.token_hex(12)}-c4.x2"
        mm = segment.create_big(name, len(readers), 1, 8192, writer)
        w = memoryview(mm).cast("q")
        for r, pid in enumerate(readers):
            w[segment.big_rpid_word(r)] = pid
        w.release()
        mm.close()
        if extra:
            with open(shm.path(name), "ab") as f:
                f.write(extra)
        made[kind] = name
        return name

    ring("all-dead", dead, [dead, dead])
    ring("reader-alive", dead, [dead, os.getpid()])
    ring("none-yet", 0, [0])
    ring("wrong-size", dead, [dead], extra=b"\0" * 64)
    other = ring("other-owner", dead, [dead])
    try:
        _other_owner(shm.path(other), monkeypatch)
        mine = [n for n in sweep.stale_segments() if n in made.values()]
        if os.getuid() != 0:  # dagc believes it is another user: nothing is its own
            assert mine == []
            return
        assert mine == [made["all-dead"]]
        sweep.sweep_stale()
        left = {k for k, n in made.items() if os.path.exists(shm.path(n))}
        assert left == set(made) - {"all-dead"}, left
    finally:
        for n in made.values():
            shm.unlink(n)
