"""A compiled DAG dropped without teardown() releases everything teardown() releases.

A notebook compiles and drops DAGs all day: each dropped DAG must give back its channel
ends (fds to unlinked segments, whose pages stay allocated while an fd is open; TCP
sockets, whose peers otherwise never see EOF), its threads and its shared memory, and
its actors must be compilable again. The CompiledDag must be collected by reference
counting alone (no cycle), so this happens when the last reference goes.
"""

import gc
import os
import threading
import weakref

import numpy as np
import pytest

import dagc
from dagc import InputNode
from dagc.runtime.actor import lifecycle
from tests.faults import helpers
from tests.faults.helpers import loops_stopped, segments, wait_until

BOUND = 15.0
BIG = 4 << 20  # bigger than buffer_size: a big-value segment, a queued frame
BUFFER = 1 << 16


def _dagc_fds(pid: int) -> int:
    """Open fds of process ``pid`` to dagc segments (named or unlinked)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/dagc-"):
                n += 1
        except OSError:
            pass
    return n


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _shm_free() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def _chain(a, b):
    with InputNode() as inp:
        return b.size.bind(a.step.bind(inp))


def _steps(a, b):
    with InputNode() as inp:
        return b.step.bind(a.step.bind(inp))


def _run_and_drop(dag, value, tokens):
    """Compile, execute once, drop: returns weak references to the DAG and its state."""
    cg = dagc.compile(dag, buffer_size=BUFFER)
    tokens.append(cg._session.token)
    assert cg.execute(value).get(timeout=60) == value.nbytes
    assert _dagc_fds(os.getpid()) > 0 or cg._session.layout.spans_nodes()
    refs = weakref.ref(cg), weakref.ref(cg._runs), weakref.ref(cg._session)
    del cg
    return refs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_dropped_dags_release_everything(ray, nodes, monkeypatch, transport):
    a, b = nodes(2)
    if transport == "tcp":  # each actor on a "node" of its own: every channel is TCP
        ray.get(
            [
                a.__ray_call__.remote(helpers.fake_placement, "fake-node-0"),
                b.__ray_call__.remote(helpers.fake_placement, "fake-node-1"),
            ],
            timeout=30,
        )
        monkeypatch.setattr(lifecycle, "probe", helpers.fake_probe)
    dag = _chain(a, b)
    pids = [os.getpid()] + ray.get([a.pid.remote(), b.pid.remote()], timeout=30)
    value = np.ones(BIG, dtype=np.uint8)
    tokens: list = []

    def census():
        return [_fds(p) for p in pids], [_threads(p) for p in pids], _shm_free()

    for _ in range(2):  # warm up (imports, pools)
        _run_and_drop(dag, value, tokens)
        wait_until(lambda: loops_stopped([a, b], tokens[-1]), BOUND, "warm-up loops stop")
    fds0, threads0, free0 = census()
    for _ in range(20):
        dag_ref, runs_ref, session_ref = _run_and_drop(dag, value, tokens)
        # collected by reference counting alone: no cycle keeps a dropped DAG alive
        assert dag_ref() is None and runs_ref() is None and session_ref() is None
        assert _dagc_fds(os.getpid()) == 0  # no end left open, named or not
        # the loops stop by themselves (the next compile on these actors needs it)
        wait_until(
            lambda: loops_stopped([a, b], tokens[-1]),
            BOUND,
            f"{transport}: the loops of a dropped DAG stop",
        )
    fds1, threads1, free1 = census()
    print(
        f"\n[fault] 20 dropped {transport} DAGs: fds {fds0} -> {fds1}, threads "
        f"{threads0} -> {threads1}, /dev/shm free {free0 >> 20} -> {free1 >> 20} MiB"
    )
    assert all(f1 - f0 <= 3 for f0, f1 in zip(fds0, fds1)), (fds0, fds1)
    assert all(t1 - t0 <= 3 for t0, t1 in zip(threads0, threads1)), (threads0, threads1)
    # 20 leaked big-value segments would hold 80 MiB; other users' DAGs move this too
    assert free1 >= free0 - 40 * (1 << 20), (free0, free1)
    assert not any(segments(t) for t in tokens)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dagc")]
    with dagc.compile(dag, buffer_size=BUFFER) as cg:  # the same actors, compiled again
        assert cg.execute(value).get(timeout=60) == BIG


@pytest.mark.timeout(120)
def test_dropped_dag_with_a_pending_await_is_released(ray, nodes):
    """An awaited get() holds its ref (and so the DAG) only while it waits: once the value
    is there the DAG goes with its last reference, its get thread too."""
    import asyncio

    a, b = nodes(2)
    cg = dagc.compile(_steps(a, b))
    token = cg._session.token

    def dagc_gets():
        return {t for t in threading.enumerate() if t.name.startswith("dagc-get")}

    before = dagc_gets()

    async def main(dag):
        return await dag.execute(("sleep", 1, 0.3))  # pending when awaited

    assert asyncio.run(asyncio.wait_for(main(cg), 60)) == ("sleep", 1, 0.3)
    gets = dagc_gets() - before
    assert gets and all(t.is_alive() for t in gets)
    dag_ref = weakref.ref(cg)
    del cg
    gc.collect()  # asyncio's own cycles (the finished task) may hold the ref
    assert dag_ref() is None
    wait_until(lambda: not any(t.is_alive() for t in gets), BOUND, "the get thread ends")
    wait_until(
        lambda: loops_stopped([a, b], token) and not segments(token), BOUND, "the loops stop"
    )
    assert _dagc_fds(os.getpid()) == 0
