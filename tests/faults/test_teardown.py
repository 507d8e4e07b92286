"""Teardown: idempotent, bounded in time even when an actor is stuck, automatic when the
CompiledDag is dropped, and repeatable without leaking fds, threads or mappings."""

import gc
import os
import threading
import time

import pytest

import dagc
from dagc import InputNode
from tests.faults.helpers import loops_stopped, mapped, open_fds, segments, state, wait_until

BOUND = 10.0


def _chain(a, b):
    with InputNode() as inp:
        return b.step.bind(a.step.bind(inp))


@pytest.mark.timeout(120)
def test_teardown_bounded_while_a_method_sleeps_60s(ray, nodes):
    a, b = nodes(2)
    cg = dagc.compile(_chain(a, b))
    token = cg._session.token
    assert cg.execute(1).get(timeout=30) == 1
    stuck = cg.execute(("sleep", 1, 60))
    time.sleep(0.5)
    t0 = time.monotonic()
    cg.teardown()
    took = time.monotonic() - t0
    print(f"\n[fault] teardown with a loop inside a 60 s method took {took:.3f} s")
    assert took < BOUND
    t1 = time.monotonic()
    cg.teardown()
    assert time.monotonic() - t1 < 0.1  # idempotent, immediate
    assert not segments(token)
    assert mapped(os.getpid(), token) == 0
    with pytest.raises(dagc.DagClosedError):
        stuck.get(timeout=5)
    with pytest.raises(dagc.DagClosedError):
        cg.execute(2)
    # a's loop stopped; b's was abandoned inside the method (it exits when the method
    # returns), its actor still answers calls and can be compiled again
    wait_until(lambda: loops_stopped([a], token), BOUND, "a's loop stops")
    st = state(b, token)
    assert not st["running"] and st["loop_threads"] == ["dagc-loop-a1"]
    assert ray.get(b.step.remote(3), timeout=30) == 3
    with InputNode() as inp:
        dag2 = a.step.bind(b.step.bind(inp))
    with dagc.compile(dag2) as cg2:
        assert cg2.execute(4).get(timeout=30) == 4


@pytest.mark.timeout(120)
def test_teardown_bounded_while_the_actor_thread_is_busy(ray, nodes):
    """The actor's own thread runs a 60 s ordinary call, so it cannot take teardown's
    stop request: teardown gives up after teardown_timeout and the loop, seeing the
    closed state, stops and unmaps by itself."""
    a, b = nodes(2)
    pid_b = ray.get(b.pid.remote(), timeout=30)
    cg = dagc.compile(_chain(a, b), teardown_timeout=2.0)
    token = cg._session.token
    assert cg.execute(1).get(timeout=30) == 1
    busy = b.step.remote(("sleep", 1, 60))
    time.sleep(0.5)
    t0 = time.monotonic()
    cg.teardown()
    took = time.monotonic() - t0
    print(f"\n[fault] teardown with the actor thread busy (teardown_timeout=2) took {took:.3f} s")
    assert took < BOUND
    assert not segments(token)
    wait_until(lambda: mapped(pid_b, token) == 0, BOUND, "b's loop unmaps by itself")
    wait_until(lambda: loops_stopped([a], token), BOUND, "a's loop stops")
    del busy  # b is killed with the test


@pytest.mark.timeout(120)
def test_ctrl_c_during_teardown_still_releases(ray, nodes):
    from tests.faults.test_timeouts import _signal_interrupt

    a, b = nodes(2)
    pid_b = ray.get(b.pid.remote(), timeout=30)
    cg = dagc.compile(_chain(a, b), teardown_timeout=30.0)
    token = cg._session.token
    b.step.remote(("sleep", 1, 60))  # teardown would wait 30 s for b
    time.sleep(0.3)
    fire, restore = _signal_interrupt()
    try:
        timer = threading.Timer(0.5, fire)
        timer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                cg.teardown()
        finally:
            timer.join()
        took = time.monotonic() - t0
    finally:
        restore()
    print(f"\n[fault] Ctrl-C during teardown: interrupted after {took:.3f} s")
    assert not segments(token)  # released all the same
    assert mapped(os.getpid(), token) == 0
    cg.teardown()
    with pytest.raises(dagc.DagClosedError):
        cg.execute(1)
    wait_until(lambda: mapped(pid_b, token) == 0, BOUND, "b's loop unmaps by itself")


@pytest.mark.timeout(120)
def test_dropped_without_teardown(ray, nodes):
    """A CompiledDag garbage-collected without teardown stops its loops and frees its
    segments - their names, mappings and open fds (an fd keeps an unlinked segment's pages
    allocated) in the driver and in every actor - so the actors can be compiled again."""
    a, b = nodes(2)
    cg = dagc.compile(_chain(a, b))
    token = cg._session.token
    assert cg.execute(1).get(timeout=30) == 1
    assert open_fds(os.getpid(), token) > 0  # the count sees the driver's ends
    del cg
    gc.collect()
    took = wait_until(
        lambda: loops_stopped([a, b], token) and not segments(token),
        BOUND,
        "loops of a dropped DAG stop",
    )
    assert open_fds(os.getpid(), token) == 0
    assert mapped(os.getpid(), token) == 0
    print(f"\n[fault] dropped CompiledDag: loops stopped after {took:.3f} s")
    with dagc.compile(_chain(a, b)) as cg2:
        assert cg2.execute(2).get(timeout=30) == 2


def _fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(180)
def test_compile_teardown_cycles_do_not_leak(ray, nodes):
    a, b = nodes(2)
    with InputNode() as inp:
        dag = b.astep.bind(a.step.bind(inp))  # an async method too
    pids = ray.get([a.pid.remote(), b.pid.remote()], timeout=30)

    def census():
        return (
            [_fds(p) for p in [os.getpid()] + pids],
            [len(os.listdir(f"/proc/{p}/task")) for p in [os.getpid()] + pids],
        )

    for _ in range(3):  # warm up
        with dagc.compile(dag) as cg:
            cg.execute(0).get(timeout=30)
    fds0, threads0 = census()
    tokens = []
    for i in range(25):
        with dagc.compile(dag) as cg:
            assert cg.execute(i).get(timeout=30) == i
            tokens.append(cg._session.token)
    fds1, threads1 = census()
    print(
        f"\n[fault] 25 compile/teardown cycles: fds {fds0} -> {fds1}, "
        f"threads {threads0} -> {threads1}"
    )
    assert all(f1 - f0 <= 3 for f0, f1 in zip(fds0, fds1)), (fds0, fds1)
    assert all(t1 - t0 <= 3 for t0, t1 in zip(threads0, threads1)), (threads0, threads1)
    assert not any(segments(t) for t in tokens)
    assert not any(mapped(p, t) for p in [os.getpid()] + pids for t in tokens)
