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

BOUND = 30.0          # generous: a noisy 2-core CI box; observed times are printed


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
            ray_session.kill(h)           # no_restart=True: gone for good
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
        except ray_mod.exceptions.ActorDiedError as e:     # dagc's is also Ray's
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
    except ray_mod.exceptions.RayActorError:     # ActorUnavailableError while restarting
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
        assert _pid(victim) != pid0                       # a new process, same handle
        assert cg._session.token != token0 and not segments(token0)
        # the survivors' loops of the first run are gone; the new run has every loop
        old = [h for h in hs if h is not victim]
        wait_until(lambda: _run_gone(old, token0), BOUND, "old loops stop")
        print(f"\n[restart] {['first', 'middle', 'last'][which]} actor killed: "
              f"{len(errors)} execution(s) lost, first good result {first_good:.3f} s "
              f"after the kill (re-prepare {ev.seconds:.3f} s after the death was noticed)")
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
def test_death_while_idle(ray_session, actors):
    """The actor dies and is back before the next execution: at most that one fails (an
    idle DAG notices the death there), every one after it runs."""
    a, b = actors(0, 1)
    cg = dagc.compile(_chain(a, b))
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        pid0 = _pid(b)
        ray_mod.kill(b, no_restart=False)
        wait_until(lambda: _pid_or_none(b) not in (pid0, None), BOUND, "Ray restarts it")
        got = []
        for i in range(10):
            try:
                got.append(cg.execute(i).get(timeout=BOUND))
            except dagc.ActorDiedError:
                got.append(None)
        assert got[1:] == list(range(1, 10)) and got[0] in (None, 0), got
        assert cg.restarts == 1
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
        wait_until(lambda: loops_stopped([b], token) and not segments(token), BOUND,
                   "the survivor's loop stops")
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
        if os.path.exists(marker):      # restarted
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
def test_actor_that_does_not_come_back_in_time_closes_the_dag(ray_session, actors,
                                                              tmp_path):
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
            cg.execute(2)                      # waits for the re-prepare, which fails
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
    wait_until(lambda: not any(t.name == "dagc-restart" for t in threading.enumerate()),
               BOUND, "the restart thread ends")
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
                while time.monotonic() - t0 < BOUND:    # the death is noticed by one
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
            out, _ = _stream(cdag, 10, 2, lambda: ray_mod.kill(b, no_restart=False),
                             lambda i: ray_mod.get(cdag.execute(i), timeout=BOUND))
            _check_stream(out, 2)
            wait_until(lambda: cdag.restarts == 1, BOUND, "the restart")
        finally:
            cdag.teardown()


@pytest.mark.timeout(180)
def test_queued_executions_and_the_restart(ray_session, actors):
    """max_queued: the executions submitted before the death (in flight or queued in the
    driver) fail with ActorDiedError or ran; none gets another's result; later ones run."""
    a, b = actors(0, 1)
    cg = dagc.compile(_chain(a, b), max_inflight=2, max_queued=100)
    try:
        assert cg.execute(1).get(timeout=BOUND) == 1
        refs = [cg.execute(0), cg.execute(("exit", 1, None))]
        refs += [cg.execute(i) for i in range(2, 40)]
        got = []
        for r in refs:
            try:
                got.append(r.get(timeout=BOUND))
            except dagc.ActorDiedError:
                got.append(None)
        assert got[1] is None and all(v in (i, None) for i, v in enumerate(got)), got
        assert [cg.execute(i).get(timeout=BOUND) for i in range(10)] == list(range(10))
        assert cg.restarts == 1
    finally:
        cg.teardown()
