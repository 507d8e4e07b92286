"""Segments are created 0600, owned by this user, under unguessable names, and never
adopted when the name already exists (O_EXCL: no pre-created file or symlink is used)."""
import os
import re
import secrets
import stat

import numpy as np
import pytest

import dagc
from dagc import InputNode
from dagc.runtime import shm
from tests.faults.helpers import segments

NAME = re.compile(r"^dagc-[0-9a-f]{24}-(ctl(\.\d+)?|c\d+(\.g\d+)?)$")


@pytest.mark.timeout(120)
def test_live_segments_are_private_and_unguessable(ray, nodes):
    a, b = nodes(2)
    with InputNode() as inp:
        dag = b.step.bind(a.step.bind(inp))
    old = os.umask(0)                 # even a permissive umask yields 0600
    try:
        cg = dagc.compile(dag, buffer_size=4096)
    finally:
        os.umask(old)
    with cg:
        x = np.ones(100_000)
        assert cg.execute(x).get(timeout=30).sum() == x.sum()   # channels grew (.gN)
        names = segments(cg._token)
        assert any(".g" in n for n in names) and any("-ctl" in n for n in names), names
        checked = []
        for n in names:
            assert NAME.match(n), n
            try:
                st = os.lstat(os.path.join(shm.SHM_DIR, n))
            except FileNotFoundError:
                # a pre-growth generation is unlinked by its writer once every reader
                # has followed the MOVED record; that can land between listing and lstat
                base, _, gen = n.partition(".g")
                assert any(m.startswith(base + ".g") and m != n for m in names), (n, names)
                continue
            checked.append(n)
            assert stat.S_ISREG(st.st_mode), n
            assert stat.S_IMODE(st.st_mode) == 0o600, (n, oct(st.st_mode))
            assert st.st_uid == os.getuid(), n
        assert any(".g" in n for n in checked) and any("-ctl" in n for n in checked), checked
        with dagc.compile(c_dag(nodes)) as other:
            assert other._token != cg._token
        assert len(cg._token) == 24 and int(cg._token, 16) >= 0   # 96 random bits


def c_dag(nodes):
    (c,) = nodes(1, start=5)
    with InputNode() as inp:
        return c.step.bind(inp)


def test_existing_name_is_never_adopted(tmp_path):
    name = f"dagc-{secrets.token_hex(12)}-c0"
    mm = shm.create(name, 4096)
    try:
        with pytest.raises(FileExistsError):
            shm.create(name, 4096)                  # a pre-created file is not reused
    finally:
        mm.close()
        shm.unlink(name)
    target = tmp_path / "target"
    target.write_bytes(b"")
    link = os.path.join(shm.SHM_DIR, f"dagc-{secrets.token_hex(12)}-c0")
    os.symlink(target, link)
    try:
        with pytest.raises(FileExistsError):        # nor is a symlink followed
            shm.create(os.path.basename(link), 4096)
        assert target.read_bytes() == b""
    finally:
        os.unlink(link)


def test_stale_sweep_spares_live_and_half_created_dags():
    """shm.sweep_stale removes a DAG only when every pid in its control segment is dead;
    a control segment still without a driver pid (being created) is left alone."""
    from dagc.runtime import channel as ch
    assert shm.CTL_PIDS == ch.C_PIDS
    dead = _dead_pid()
    made = {}
    for kind, pids in {"live": [os.getpid(), dead], "stale": [dead, dead],
                       "new": []}.items():
        prefix = f"dagc-{secrets.token_hex(12)}-"
        c = ch.Control(prefix + "ctl.0", create=True)
        for i, p in enumerate(pids):
            c.set_pid(i, p)
        ch.create_segment(prefix + "c0", 1, 2, 64).close()
        made[kind] = (prefix, c)
    try:
        stale = shm.stale_prefixes()
        assert made["stale"][0] in stale
        assert made["live"][0] not in stale and made["new"][0] not in stale
        shm.sweep_stale()
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
