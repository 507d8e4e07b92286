"""The driver goes away: SIGKILL (busy or idle), SIGTERM, Ctrl-C, os._exit, or a plain
interpreter exit without teardown().

Each driver is a subprocess joined to this test's Ray cluster (tests/faults/child_driver.py)
over named actors this test owns, so the actors outlive it. The actors' loops must notice
within seconds, stop (no dagc thread left), unmap, and leave no segment in /dev/shm; the
actors stay usable and can be compiled again.
"""
import signal
import time
import uuid

import pytest

import dagc
from dagc import InputNode
from dagc.runtime import shm
from tests.faults.actors import Node
from tests.faults.helpers import ChildDriver, loops_stopped, segments, state, wait_until

BOUND = 10.0


@pytest.fixture
def named(ray):
    names = [f"dagc-fault-{uuid.uuid4().hex[:8]}-{k}" for k in range(3)]
    hs = [Node.options(name=n).remote(k) for k, n in enumerate(names)]
    ray.get([h.pid.remote() for h in hs], timeout=120)
    yield names, hs
    for h in hs:
        ray.kill(h)


# how the driver ends: (child mode, signal sent to it or None when it ends by itself)
ENDINGS = {
    "sigkill-busy": ("spin", signal.SIGKILL),
    "sigkill-idle": ("idle", signal.SIGKILL),
    "sigterm-busy": ("spin", signal.SIGTERM),
    "sigint-busy": ("spin", signal.SIGINT),
    "os._exit": ("hard", None),
    "exit-without-teardown": ("exit", None),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_driver_death_stops_loops_and_frees_segments(ray, named, ending):
    names, hs = named
    mode, sig = ENDINGS[ending]
    child = ChildDriver(mode, *names)
    try:
        token = child.info["token"]
        if sig is not None:
            assert segments(token), "the child's DAG should be live before the signal"
            assert all(state(h, token)["running"] for h in hs)
            time.sleep(0.3)
            t0 = time.monotonic()
            child.kill(sig)
        else:
            t0 = time.monotonic()
        child.wait(60)
        took = wait_until(lambda: loops_stopped(hs, token) and not segments(token),
                          BOUND, f"loops stop and segments go after {ending}")
        took = time.monotonic() - t0
        print(f"\n[fault] driver {ending}: loops stopped, segments gone after {took:.3f} s")
        assert took < BOUND
        for h in hs:
            st = state(h, token)
            assert not st["running"] and not st["loop_threads"] and st["maps"] == 0, st
            assert st["crash"] is None, st["crash"]
    finally:
        child.kill_and_reap()
    # the actors answer ordinary calls and compile again from this driver
    assert ray.get([h.step.remote(k) for k, h in enumerate(hs)], timeout=30) == [0, 1, 2]
    with InputNode() as inp:
        dag = hs[2].step.bind(hs[1].step.bind(hs[0].step.bind(inp)))
    with dagc.compile(dag) as cg:
        assert cg.execute(5).get(timeout=30) == 5


@pytest.mark.timeout(240)
def test_driver_killed_with_the_actors_it_owns(ray, nodes):
    """SIGKILL a driver that created its own actors: Ray kills them too, so no dagc
    process is left to remove the segments. The next compile on the node does."""
    child = ChildDriver("spin")
    try:
        token = child.info["token"]
        pids = child.info["actor_pids"]
        child.kill(signal.SIGKILL)
        child.wait(60)
        took = wait_until(lambda: not any(shm.pid_alive(p) for p in pids), 60,
                          "Ray kills the actors of a dead driver")
        print(f"\n[fault] driver SIGKILL with owned actors: actors gone after {took:.3f} s;"
              f" segments left: {len(segments(token))}")
        # nobody is left to clean: a stale DAG by the control segment's pid list
        assert not segments(token) or f"dagc-{token}-" in shm.stale_prefixes()
        a, b = nodes(2)
        with InputNode() as inp:
            dag = b.step.bind(a.step.bind(inp))
        with dagc.compile(dag) as cg:          # compiling sweeps stale segments
            assert cg.execute(1).get(timeout=30) == 1
            assert not segments(token)
    finally:
        child.kill_and_reap()
