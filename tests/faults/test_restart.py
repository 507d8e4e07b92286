"""An actor of a compiled DAG dies and Ray restarts it (``max_restarts``): the executions in
flight fail with ActorDiedError, the DAG re-prepares the restarted actor by itself and
every later execution runs; an actor Ray does not restart closes the DAG as before.

Nothing here opts in beyond the actor's own ``max_restarts``. Each test kills with
``ray.kill(h, no_restart=False)`` or ``os._exit`` (``ray.kill``'s default forbids the
restart) and prints what it measured.
"""

import os
import threading
import time

import pytest
import ray as ray_mod

import dagc
from dagc import InputNode, MultiOutputNode
from dagc.runtime.driver import restart
from tests.faults.actors import Node
from tests.faults.helpers import loops_stopped, segments, state, wait_until

BOUND = 30.0  # generous: a noisy 2-core CI box; observed times are printed


@pytest.fixture
def actors(ray_session):
    """``actors(*max_restarts)``: one fresh Node per entry (Node(k) for the k-th), with that
    ``max_restarts``; killed for good when the test ends."""
    made = []

    def make(*restarts, cls=Node, args=()):
        hs = [cls.options(max_restarts=r).remote(k, *args) for k, r in enumerate(restarts)]
        ray_session.get([h.pid.remote() for h in hs], timeout=120)
        made.extend(hs)
        return hs

    yield make
    for h in made:
        try:
            ray_session.kill(h)  # no_restart=True: gone for good
        except Exception:
            pass


def _chain(*hs):
    with InputNode() as inp:
        x = inp
        for h in hs:
            x = h.step.bind(x)
    return x


def _events(cg):
    got, seen = [], threading.Event()

    def on(ev):
        got.append(ev)
        seen.set()

    cg.on_restart(on)
    return got, seen


def _stream(cg, after, kill_at, kill, run=None):
    """Execute 0, 1, 2, ... one after the other (each get() before the next execute()),
    calling ``kill()`` before execution ``kill_at``, until ``after`` executions past the
    first ActorDiedError (ray.kill is asynchronous: the actor may answer a while longer).
    Returns [(i, value or the exception)] and the seconds from the kill to the first good
    result after the death was noticed."""
    out, t_kill, first_good, noticed = [], None, None, None
    i = 0
    while noticed is None or i < noticed + after:
        if i == kill_at:
            t_kill = time.monotonic()
            kill()
        try:
            v = run(i) if run else cg.execute(i).get(timeout=BOUND)
        except ray_mod.exceptions.ActorDiedError as e:  # dagc's is also Ray's
            v = e
            noticed = i if noticed is None else noticed
        if noticed is not None and first_good is None and v == i:
            first_good = time.monotonic() - t_kill
        out.append((i, v))
        i += 1
        assert t_kill is None or time.monotonic() - t_kill < BOUND, "the death went unnoticed"
    return out, first_good


def _check_stream(out, kill_at, most_lost=2):
    """Before the kill every result is right; after it a few executions (those in flight
    at the death) fail with ActorDiedError; every one after the first good one is right."""
    assert all(v == i for i, v in out[:kill_at]), out[:kill_at]
    errors = [i for i, v in out if isinstance(v, Exception)]
    assert 1 <= len(errors) <= most_lost, out
    for e in (v for _, v in out if isinstance(v, Exception)):
        assert "died" in str(e) and "restart" in str(e), str(e)
    good_after = [i for i, v in out if v == i and i > max(errors, default=kill_at)]
    assert good_after == list(range(max(errors, default=kill_at) + 1, len(out)))
    return errors


def _run_gone(handles, token) -> bool:
    """No loop, mapping or fd of the run ``token`` is left in these actors (their loops of
    the DAG's new run are another token's)."""
    for h in handles:
        s = state(h, token)
        if s["running"] or s["maps"] or s["shm_fds"]:
            return False
    return True


def _pid(h):
    return ray_mod.get(h.pid.remote(), timeout=BOUND)


def _pid_or_none(h):
    try:
        return _pid(h)
    except ray_mod.exceptions.RayActorError:  # ActorUnavailableError while restarting
        return None


@pytest.mark.timeout(180)
@pytest.mark.parametrize("which", [0, 1, 2], ids=["first", "middle", "last"])
def test_killed_actor_is_restarted_and_the_dag_goes_on(ray_session, actors, which):
    """Kill one actor of a 3-actor chain mid-stream (first: reads the driver's input; last:
    the driver reads it): later executions all run, without compiling again."""
    hs = actors(*[1 if k == which else 0 for k in range(3)])
    victim = hs[which]
    pid0 = _pid(victim)
    cg = dagc.compile(_chain(*hs))
    token0 = cg._session.token
    events, seen = _events(cg)
    try:
        out, first_good = _stream(cg, 30, 10, lambda: ray_mod.kill(victim, no_restart=False))
        errors = _check_stream(out, 10)
        assert seen.wait(BOUND) and cg.restarts == 1
        ev = events[0]
        assert ev.count == 1 and ev.actors == (f"a{which}:Node",) and ev.lost == len(errors)
        assert f"a{which}:Node died" in ev.reason
        assert _pid(victim) != pid0  # a new process, same handle
        assert cg._session.token != token0 and not segments(token0)
        # the survivors' loops of the first run are gone; the new run has every loop
        old = [h for h in hs if h is not victim]
        wait_until(lambda: _run_gone(old, token0), BOUND, "old loops stop")
        print(
            f"\n[restart] {['first', 'middle', 'last'][which]} actor killed: "
            f"{len(errors)} execution(s) lost, first good result {first_good:.3f} s "
            f"after the kill (re-prepare {ev.seconds:.3f} s after the death was noticed)"
        )
        assert first_good < BOUND
    finally:
        cg.teardown()
    assert not segments(cg._session.token)


@pytest.mark.timeout(180)
def test_pending_executions_fail_and_later_ones_run(ray_session, actors):
    """Several executions in flight when the actor dies all fail with ActorDiedError, also
    when fetched again, and ready() says so; the ones submitted after the death run."""
    a, b = actors(0, 1)
    cg = dagc.compile(_chain(a, b), max_inflight=4)
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        refs = [cg.execute(("sleep", 1, 0.5)), cg.execute(2), cg.execute(3)]
        ray_mod.kill(b, no_restart=False)
        for r in refs:
            with pytest.raises(dagc.ActorDiedError, match="restart"):
                r.get(timeout=BOUND)
        assert all(r.ready() for r in refs)
        with pytest.raises(dagc.ActorDiedError, match="in flight"):
            refs[1].get(timeout=BOUND)
        # submitted at once after the death: waits for the re-prepare, then runs
        assert [cg.execute(i).get(timeout=BOUND) for i in range(4, 12)] == list(range(4, 12))
        assert cg.restarts == 1
        # the places of the lost executions are free: max_inflight new ones fit
        more = [cg.execute(i) for i in range(4)]
        assert [r.get(timeout=BOUND) for r in more] == list(range(4))
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("which", [0, 1], ids=["first", "last"])
def test_death_while_idle_is_noticed_and_the_next_execution_runs(ray_session, actors, which):
    """Nobody executes when the actor dies: the DAG notices by itself (watcher.py),
    re-prepares the restarted actor, and the next execution - the first after the death -
    gives its result."""
    hs = actors(*[1 if k == which else 0 for k in range(2)])
    cg = dagc.compile(_chain(*hs))
    events, seen = _events(cg)
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        t0 = time.monotonic()
        ray_mod.kill(hs[which], no_restart=False)
        took = wait_until(lambda: cg.restarts == 1, BOUND, "the idle DAG re-prepares")
        assert seen.wait(BOUND) and events[0].lost == 0
        first = cg.execute(2).get(timeout=BOUND)
        good = time.monotonic() - t0
        assert first == 2
        assert [cg.execute(i).get(timeout=BOUND) for i in range(10)] == list(range(10))
        assert cg.restarts == 1
        print(
            f"\n[restart] idle DAG, {['first', 'last'][which]} actor killed: restarts == 1 "
            f"{took:.3f} s after the kill (re-prepare {events[0].seconds:.3f} s after the "
            f"death was noticed), first result {good:.3f} s after it"
        )
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_idle_death_of_an_actor_that_cannot_restart_closes_the_dag(ray_session, actors):
    """Nobody executes when an actor Ray does not restart dies: the DAG closes by itself
    soon after, and the next execute() says why at once."""
    a, b = actors(1, 0)
    cg = dagc.compile(_chain(a, b))
    token = cg._session.token
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        ray_mod.kill(b)  # no_restart=True
        took = wait_until(lambda: cg._runs.dead is not None, BOUND, "the idle DAG closes")
        assert "dead" in repr(cg) and "a1:Node died" in cg._runs.dead
        t0 = time.monotonic()
        with pytest.raises(dagc.ActorDiedError, match="a1:Node died.*compile again"):
            cg.execute(2)
        assert time.monotonic() - t0 < 1.0 and cg.restarts == 0
        wait_until(
            lambda: loops_stopped([a], token) and not segments(token),
            BOUND,
            "the survivor's loop stops",
        )
        print(f"\n[restart] idle DAG closed {took:.3f} s after its actor's death")
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_idle_death_on_another_node_is_noticed_through_tcp(ray_session, actors, monkeypatch):
    """Each actor on a "node" of its own (every channel TCP; no pid the driver can check):
    the last actor's death ends the TCP channel the driver reads, and the idle DAG closes
    by itself (an actor Ray does not restart)."""
    from dagc.runtime.actor import lifecycle
    from tests.faults import helpers

    a, b = actors(0, 0)
    ray_mod.get(
        [
            a.__ray_call__.remote(helpers.fake_placement, "fake-node-0"),
            b.__ray_call__.remote(helpers.fake_placement, "fake-node-1"),
        ],
        timeout=BOUND,
    )
    monkeypatch.setattr(lifecycle, "probe", helpers.fake_probe)
    cg = dagc.compile(_chain(a, b))
    try:
        assert cg._session.layout.spans_nodes()
        assert cg.execute(1).get(timeout=BOUND) == 1
        ray_mod.kill(b)
        took = wait_until(lambda: cg._runs.dead is not None, BOUND, "the idle DAG closes")
        assert "a1:Node" in cg._runs.dead
        with pytest.raises(dagc.ActorDiedError, match="a1:Node"):
            cg.execute(2)
        print(f"\n[restart] idle DAG over TCP closed {took:.3f} s after its actor's death")
    finally:
        cg.teardown()


@pytest.mark.timeout(240)
def test_killed_twice_restarts_twice(ray_session, actors):
    a, b, c = actors(0, 2, 0)
    cg = dagc.compile(_chain(a, b, c))
    events, _ = _events(cg)
    try:
        for k in range(2):
            out, first_good = _stream(cg, 10, 5, lambda: ray_mod.kill(b, no_restart=False))
            _check_stream(out, 5)
            wait_until(lambda n=k + 1: cg.restarts == n, BOUND, f"restart {k + 1}")
            print(f"\n[restart] kill {k + 1}: first good result {first_good:.3f} s after it")
        assert [e.count for e in events] == [1, 2]
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_exit_inside_a_method_restarts_too(ray_session, actors):
    """os._exit inside the actor's method (the execution that caused it fails)."""
    a, b = actors(1, 0)
    cg = dagc.compile(_chain(a, b))
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        with pytest.raises(dagc.ActorDiedError, match="a0:Node died"):
            cg.execute(("exit", 0, None)).get(timeout=BOUND)
        assert [cg.execute(i).get(timeout=BOUND) for i in range(5)] == list(range(5))
        assert cg.restarts == 1
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_no_restart_left_closes_the_dag_as_before(ray_session, actors):
    """max_restarts=1 killed twice: the second death closes the DAG for good."""
    a, b = actors(1, 0)
    cg = dagc.compile(_chain(a, b))
    token = cg._session.token
    try:
        with pytest.raises(dagc.ActorDiedError):
            cg.execute(("exit", 0, None)).get(timeout=BOUND)
        assert cg.execute(2).get(timeout=BOUND) == 2 and cg.restarts == 1
        token = cg._session.token
        with pytest.raises(dagc.ActorDiedError, match="compile again"):
            cg.execute(("exit", 0, None)).get(timeout=BOUND)
        with pytest.raises(dagc.ActorDiedError, match="compile again"):
            cg.execute(3)
        assert cg.restarts == 1
        wait_until(
            lambda: loops_stopped([b], token) and not segments(token),
            BOUND,
            "the survivor's loop stops",
        )
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_actor_that_may_not_restart_closes_the_dag(ray_session, actors):
    """One actor may restart, the one that dies may not: closed at once, as before."""
    a, b = actors(1, 0)
    cg = dagc.compile(_chain(a, b))
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        t0 = time.monotonic()
        with pytest.raises(dagc.ActorDiedError, match="a1:Node died.*compile again"):
            cg.execute(("exit", 1, None)).get(timeout=BOUND)
        took = time.monotonic() - t0
        assert took < 5.0, took
        with pytest.raises(dagc.ActorDiedError):
            cg.execute(2)
        assert cg.restarts == 0
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_crashed_loop_of_a_restartable_actor_closes_the_dag(ray_session, actors):
    """sys.exit() in a method ends the loop, not the process: no restart, closed."""
    a, b = actors(1, 1)
    cg = dagc.compile(_chain(a, b))
    try:
        with pytest.raises(dagc.ActorDiedError, match="crashed"):
            cg.execute(("sysexit", 0, 3)).get(timeout=BOUND)
        with pytest.raises(dagc.ActorDiedError):
            cg.execute(2)
        assert cg.restarts == 0
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_restarts_that_do_not_settle_close_the_dag(ray_session, actors, monkeypatch):
    """max_restarts=-1 and a death after every restart: after MAX_PER_WINDOW re-prepares
    within WINDOW_S the next death closes the DAG, saying why."""
    monkeypatch.setattr(restart, "MAX_PER_WINDOW", 2)
    a, b = actors(-1, 0)
    cg = dagc.compile(_chain(a, b))
    try:
        for k in range(2):
            with pytest.raises(dagc.ActorDiedError, match="restart"):
                cg.execute(("exit", 0, None)).get(timeout=BOUND)
            assert cg.execute(k).get(timeout=BOUND) == k
        with pytest.raises(dagc.ActorDiedError, match="do not settle"):
            cg.execute(("exit", 0, None)).get(timeout=BOUND)
        with pytest.raises(dagc.ActorDiedError, match="do not settle"):
            cg.execute(5)
        assert cg.restarts == 2
    finally:
        cg.teardown()


@ray_mod.remote
class SlowRestart:
    """A Node whose constructor takes ``hold`` seconds once restarted (``marker`` exists)."""

    def __init__(self, k, marker, hold=60.0):
        self.k = k
        if os.path.exists(marker):  # restarted
            time.sleep(hold)
        else:
            open(marker, "w").close()

    def step(self, x):
        if isinstance(x, tuple) and x[1] == self.k and x[0] == "exit":
            os._exit(1)
        return x

    def pid(self):
        return os.getpid()


@pytest.mark.timeout(180)
def test_actor_that_does_not_come_back_in_time_closes_the_dag(ray_session, actors, tmp_path):
    """The restarted actor is not back within start_timeout: the DAG closes, saying so,
    and execute() waiting on the re-prepare gets the error."""
    (a,) = actors(1, cls=SlowRestart, args=(str(tmp_path / "started"),))
    cg = dagc.compile(_chain(a), start_timeout=3)
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        with pytest.raises(dagc.ActorDiedError, match="restart"):
            cg.execute(("exit", 0, None)).get(timeout=BOUND)
        t0 = time.monotonic()
        with pytest.raises(dagc.ActorDiedError, match="did not come back within"):
            cg.execute(2)  # waits for the re-prepare, which fails
        assert time.monotonic() - t0 < BOUND
        assert cg.restarts == 0
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_teardown_while_restarting_leaves_nothing(ray_session, actors, tmp_path):
    (a,) = actors(1, cls=SlowRestart, args=(str(tmp_path / "started"),))
    cg = dagc.compile(_chain(a), start_timeout=20)
    token = cg._session.token
    try:
        with pytest.raises(dagc.ActorDiedError, match="restart"):
            cg.execute(("exit", 0, None)).get(timeout=BOUND)
        t0 = time.monotonic()
        cg.teardown()
        assert time.monotonic() - t0 < 10
        with pytest.raises(dagc.DagClosedError):
            cg.execute(1)
    finally:
        cg.teardown()
    wait_until(
        lambda: not any(t.name == "dagc-restart" for t in threading.enumerate()),
        BOUND,
        "the restart thread ends",
    )
    assert not segments(token)


@pytest.mark.timeout(180)
def test_multi_output_and_async(ray_session, actors):
    """A MultiOutputNode DAG, driven from asyncio, across a restart."""
    import asyncio

    a, b = actors(0, 1)
    with InputNode() as inp:
        dag = MultiOutputNode([a.step.bind(inp), b.step.bind(inp)])
    cg = dagc.compile(dag)
    try:

        async def main():
            assert await cg.execute_async(1) == [1, 1]
            ray_mod.kill(b, no_restart=False)
            with pytest.raises(dagc.ActorDiedError):
                t0 = time.monotonic()
                while time.monotonic() - t0 < BOUND:  # the death is noticed by one
                    await cg.execute_async(0)
            return [await cg.execute_async(i) for i in range(5)]

        assert asyncio.run(asyncio.wait_for(main(), 120)) == [[i, i] for i in range(5)]
        assert cg.restarts == 1
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_under_patch_ray(ray_session, actors):
    """Ray's experimental_compile under dagc.patched_ray(): the same, with Ray's refs."""
    a, b = actors(0, 1)
    with dagc.patched_ray(workers=False):
        cdag = _chain(a, b).experimental_compile()
        try:
            assert ray_mod.get(cdag.execute(1), timeout=BOUND) == 1
            out, _ = _stream(
                cdag,
                10,
                2,
                lambda: ray_mod.kill(b, no_restart=False),
                lambda i: ray_mod.get(cdag.execute(i), timeout=BOUND),
            )
            _check_stream(out, 2)
            wait_until(lambda: cdag.restarts == 1, BOUND, "the restart")
        finally:
            cdag.teardown()


def _outcomes(refs):
    got = []
    for r in refs:
        try:
            got.append(r.get(timeout=BOUND))
        except dagc.ActorDiedError as e:
            assert "in flight" in str(e), str(e)
            got.append(None)
    return got


@pytest.mark.timeout(180)
def test_queued_executions_and_the_restart(ray_session, actors):
    """max_queued: only the executions in the pipeline at the death (at most max_inflight)
    fail with ActorDiedError; those queued in the driver run on the restarted actor, each
    with its own result; later ones run."""
    a, b = actors(0, 1)
    cg = dagc.compile(_chain(a, b), max_inflight=2, max_queued=100)
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        refs = [cg.execute(0), cg.execute(("exit", 1, None))]
        refs += [cg.execute(i) for i in range(2, 40)]
        got = _outcomes(refs)
        lost = [i for i, v in enumerate(got) if v is None]
        assert 1 in lost and set(lost) <= {0, 1, 2, 3}, got
        assert all(v == i for i, v in enumerate(got) if i not in lost), got
        assert [cg.execute(i).get(timeout=BOUND) for i in range(10)] == list(range(10))
        assert cg.restarts == 1
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_queued_executions_survive_a_restart(ray_session, actors):
    """max_inflight=2, max_queued=200, 100 executions submitted; the actor Ray restarts is
    killed while 98 of them wait in the driver: the 2 in flight raise ActorDiedError, every
    queued one enters the new run in order and gives its own result."""
    a, b = actors(0, 1)
    cg = dagc.compile(_chain(a, b), max_inflight=2, max_queued=200)
    events, seen = _events(cg)
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        refs = [cg.execute(("sleep", 0, 1.5))] + [cg.execute(i) for i in range(1, 100)]
        assert cg._runs.queued == 98
        ray_mod.kill(b, no_restart=False)  # while a0 sleeps on execution 0
        got = _outcomes(refs)
        assert got[:2] == [None, None], got[:2]
        assert got[2:] == list(range(2, 100)), got
        assert seen.wait(BOUND) and cg.restarts == 1 and events[0].lost == 2
        assert [cg.execute(i).get(timeout=BOUND) for i in range(5)] == list(range(5))
        assert cg._runs.queued == 0
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_patched_execute_async_waits_for_a_restart_off_the_event_loop(
    ray_session, actors, tmp_path
):
    """Under dagc.patched_ray(): ``await cdag.execute_async(x)`` while the DAG re-prepares
    (the restarted actor's constructor takes 3 s) leaves the event loop running."""
    import asyncio

    (a,) = actors(1, cls=SlowRestart, args=(str(tmp_path / "started"), 3.0))
    with dagc.patched_ray(workers=False):
        cdag = _chain(a).experimental_compile()
        try:
            assert ray_mod.get(cdag.execute(1), timeout=BOUND) == 1
            with pytest.raises(dagc.ActorDiedError, match="restart"):
                ray_mod.get(cdag.execute(("exit", 0, None)), timeout=BOUND)
            assert cdag._restarts.busy

            async def main():
                ticks = [time.monotonic()]

                async def tick():
                    while True:
                        await asyncio.sleep(0.02)
                        ticks.append(time.monotonic())

                ticker = asyncio.ensure_future(tick())
                await asyncio.sleep(0.05)
                t0 = time.monotonic()
                fut = await cdag.execute_async(5)
                waited = time.monotonic() - t0
                value = await fut
                ticker.cancel()
                gaps = [y - x for x, y in zip(ticks, ticks[1:]) if y > t0]
                return value, waited, max(gaps)

            value, waited, gap = asyncio.run(asyncio.wait_for(main(), 120))
            assert value == 5 and cdag.restarts == 1
            assert waited > 1.0, waited  # it did wait for the re-prepare
            assert gap < 0.5, (gap, waited)  # ... with the event loop running
            print(
                f"\n[restart] execute_async waited {waited:.3f} s for the re-prepare; "
                f"the event loop's longest stall {gap:.3f} s"
            )
        finally:
            cdag.teardown()
