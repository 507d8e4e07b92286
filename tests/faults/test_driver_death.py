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
from dagc.runtime.channels import shm
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
            # live, and yet no name of it is left in /dev/shm: the processes hold the
            # mappings, nothing else
            assert all(state(h, token)["running"] and state(h, token)["maps"] for h in hs)
            assert not segments(token), segments(token)
            time.sleep(0.3)
            t0 = time.monotonic()
            child.kill(sig)
        else:
            t0 = time.monotonic()
        child.wait(60)
        took = wait_until(
            lambda: loops_stopped(hs, token) and not segments(token),
            BOUND,
            f"loops stop and segments go after {ending}",
        )
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
def test_driver_killed_with_the_actors_it_owns_leaves_nothing(ray):
    """SIGKILL a driver that created its own actors: Ray kills them too, so no dagc
    process is left to clean up. Nothing needs it: once a DAG runs, none of its segments
    has a name any more (every process mapped them, then the names went), so the kernel
    frees them with the last mapping. Within 5 s of the kill /dev/shm holds nothing of the
    DAG, and no dagc call happens in between."""
    child = ChildDriver("spin")
    try:
        token = child.info["token"]
        pids = child.info["actor_pids"]
        assert all(shm.pid_alive(p) for p in pids)
        t0 = time.monotonic()
        child.kill(signal.SIGKILL)
        child.wait(60)
        wait_until(
            lambda: not segments(token),
            5.0 - (time.monotonic() - t0),
            "no /dev/shm entry of the killed driver's DAG",
        )
        took = wait_until(
            lambda: not any(shm.pid_alive(p) for p in pids),
            60,
            "Ray kills the actors of a dead driver",
        )
        print(
            f"\n[fault] driver SIGKILL with owned actors: actors gone after {took:.3f} s;"
            f" segments left: {len(segments(token))}"
        )
        assert not segments(token)
    finally:
        child.kill_and_reap()


@pytest.mark.timeout(180)
def test_exit_with_an_awaited_execution_pending_is_bounded(ray, named):
    """A program whose asyncio task awaits an execution (held 120 s by an actor) ends: its
    interpreter exits within teardown_timeout and change, as it does without asyncio
    (before, the executor thread behind ``await ref`` was joined first: exit waited for the
    execution)."""
    names, hs = named
    child = ChildDriver("await", *names)
    try:
        token = child.info["token"]
        child.read_line("DAGC-AWAITING", 60)
        t0 = time.monotonic()
        code = child.wait(60)
        took = time.monotonic() - t0
        print(f"\n[fault] exit with an awaited execution pending took {took:.3f} s")
        assert code == 0, child.stderr()[-3000:]
        assert took < 25.0  # teardown_timeout (5 s), Ray's own shutdown
        assert not segments(token)
    finally:
        child.kill_and_reap()
    # the actor holding the execution stays in its method; the others' loops stop
    wait_until(lambda: loops_stopped(hs[:2], token), BOUND, "the other loops stop")


@pytest.mark.timeout(180)
def test_ray_shutdown_tears_down_dagc_dags(ray, named):
    """ray.shutdown() stops the process's dagc DAGs as Ray's does its own Compiled Graphs
    (the loops stop while the driver lives on), and nothing dagc does afterwards - a
    teardown(), the exit hook - starts or joins a Ray cluster."""
    names, hs = named
    child = ChildDriver("shutdown", *names)
    try:
        token = child.info["token"]
        after_shutdown = child.read_line("DAGC-SHUTDOWN", 60)
        assert after_shutdown == {"closed": True}
        took = wait_until(
            lambda: loops_stopped(hs, token) and not segments(token),
            BOUND,
            "ray.shutdown() stops the loops of the driver's DAGs",
        )
        print(f"\n[fault] ray.shutdown(): loops stopped after {took:.3f} s")
        assert child.proc.poll() is None  # the driver still runs
        child.send_line("go")
        after = child.read_line("DAGC-AFTER", 60)
        assert after == {"closed": True, "inits": 0, "initialized": False, "error": None}
        assert child.read_line("DAGC-EXIT", 60) == {"inits": 0}
        assert child.wait(60) == 0, child.stderr()[-3000:]
    finally:
        child.kill_and_reap()
    with InputNode() as inp:
        dag = hs[2].step.bind(hs[1].step.bind(hs[0].step.bind(inp)))
    with dagc.compile(dag) as cg:
        assert cg.execute(5).get(timeout=30) == 5
