"""An actor of a compiled DAG dies: ray.kill, os._exit, a segfault, a crashed loop.

Every pending and later get() raises ActorDiedError naming the actor within seconds; the
other loops stop and unmap; no segment is left; the survivors still answer ordinary
calls and can be compiled into a new DAG.
"""

import os
import threading
import time

import pytest

import dagc
from dagc import InputNode, MultiOutputNode
from tests.faults.helpers import loops_stopped, mapped, segments, wait_until

BOUND = 10.0  # generous: a noisy 2-core CI box; observed times are printed


def _getter(ref, out):
    try:
        out["value"] = ref.get(timeout=60)
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        out["error"] = e
    out["at"] = time.monotonic()


def _chain(a, b, c):
    with InputNode() as inp:
        return c.step.bind(b.step.bind(a.step.bind(inp)))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["ray.kill", "os._exit", "segfault"])
def test_actor_death_ends_pending_and_later_gets(ray, nodes, how):
    a, b, c = nodes(3)
    cg = dagc.compile(_chain(a, b, c))
    token = cg._session.token
    try:
        assert [cg.execute(i).get(timeout=30) for i in range(5)] == list(range(5))
        t0 = time.monotonic()  # the fault: submitting it, or ray.kill below
        if how == "ray.kill":
            refs = [cg.execute(("sleep", 1, 30)), cg.execute(2), cg.execute(3)]
        else:
            refs = [
                cg.execute(("exit" if how == "os._exit" else "segv", 1, None)),
                cg.execute(2),
                cg.execute(3),
            ]
        waiting = {}
        t = threading.Thread(target=_getter, args=(refs[0], waiting), daemon=True)
        t.start()
        if how == "ray.kill":
            time.sleep(0.3)
            t0 = time.monotonic()
            ray.kill(b)
        t.join(60)
        assert not t.is_alive(), "a get() pending across the death never returned"
        err = waiting.get("error")
        assert isinstance(err, dagc.ActorDiedError), waiting
        assert "a1:Node" in str(err) and "died" in str(err), str(err)
        took = waiting["at"] - t0
        for r in refs[1:]:  # the other pending results
            with pytest.raises(dagc.ActorDiedError, match="a1:Node"):
                r.get(timeout=30)
        with pytest.raises(dagc.ActorDiedError, match="a1:Node"):
            cg.execute(9)  # later executions
        with pytest.raises(dagc.ActorDiedError):
            refs[0].get(timeout=30)  # and the same ref again
        assert refs[1].ready()  # ready: get() answers at once
        print(f"\n[fault] {how}: pending get() raised ActorDiedError after {took:.3f} s")
        assert took < BOUND

        # the survivors' loops stop and unmap, nothing is left in /dev/shm, and the
        # driver let go of its own mappings without waiting for teardown()
        stop = wait_until(
            lambda: loops_stopped([a, c], token) and not segments(token),
            BOUND,
            "surviving loops stop and segments go",
        )
        print(f"[fault] {how}: survivors stopped, segments gone {stop:.3f} s later")
        assert mapped(os.getpid(), token) == 0
        # the survivors answer ordinary calls and compile into a new DAG
        assert ray.get([a.step.remote(5), c.step.remote(6)], timeout=30) == [5, 6]
        with InputNode() as inp:
            dag2 = c.step.bind(a.step.bind(inp))
        with dagc.compile(dag2) as cg2:
            assert [cg2.execute(i).get(timeout=30) for i in range(3)] == [0, 1, 2]
    finally:
        t1 = time.monotonic()
        cg.teardown()
        cg.teardown()
        assert time.monotonic() - t1 < BOUND
    assert not segments(token)


@pytest.mark.timeout(120)
def test_death_with_no_get_pending_stops_every_loop(ray, nodes):
    """Fan-out: nothing flows between the actors; a death is still noticed by each loop."""
    a, b, c = nodes(3)
    with InputNode() as inp:
        dag = MultiOutputNode([a.step.bind(inp), b.step.bind(inp), c.step.bind(inp)])
    cg = dagc.compile(dag)
    token = cg._session.token
    try:
        assert cg.execute(1).get(timeout=30) == [1, 1, 1]
        t0 = time.monotonic()
        ray.kill(c)
        # no execute(), no get(): the idle loops of a and b notice on their own
        took = wait_until(
            lambda: loops_stopped([a, b], token) and not segments(token),
            BOUND,
            "idle loops stop after a peer's death",
        )
        print(f"\n[fault] idle fan-out, ray.kill: loops stopped after {took:.3f} s")
        t1 = time.monotonic()
        with pytest.raises(dagc.ActorDiedError, match="a2:Node"):
            cg.execute(2).get(timeout=30)
        assert time.monotonic() - t1 < BOUND
        assert time.monotonic() - t0 < 2 * BOUND
    finally:
        cg.teardown()


@pytest.mark.timeout(120)
def test_crashed_loop_reports_its_traceback(ray, nodes):
    """sys.exit() inside a method ends that actor's loop (not its process): the error
    carries the loop's traceback, the other loops stop, and the actor stays usable."""
    a, b = nodes(2)
    with InputNode() as inp:
        dag = b.step.bind(a.step.bind(inp))
    cg = dagc.compile(dag)
    token = cg._session.token
    try:
        assert cg.execute(1).get(timeout=30) == 1
        t0 = time.monotonic()
        with pytest.raises(dagc.ActorDiedError) as ei:
            cg.execute(("sysexit", 0, 3)).get(timeout=30)
        took = time.monotonic() - t0
        msg = str(ei.value)
        assert "a0:Node" in msg and "crashed" in msg and "SystemExit" in msg, msg
        print(f"\n[fault] loop crash (SystemExit): ActorDiedError after {took:.3f} s")
        assert took < BOUND
        wait_until(
            lambda: loops_stopped([a, b], token) and not segments(token),
            BOUND,
            "loops stop after a crash",
        )
        assert ray.get(a.step.remote(4), timeout=30) == 4
    finally:
        cg.teardown()
    with dagc.compile(dag) as cg2:  # the same actors, compiled again
        assert cg2.execute(7).get(timeout=30) == 7


@pytest.mark.timeout(120)
def test_death_while_driver_waits_async(ray, nodes):
    """An awaiting coroutine gets ActorDiedError too."""
    import asyncio

    a, b = nodes(2)
    with InputNode() as inp:
        dag = b.step.bind(a.step.bind(inp))
    with dagc.compile(dag) as cg:

        async def main():
            assert await cg.execute_async(1) == 1
            fut = asyncio.ensure_future(cg.execute_async(("sleep", 1, 30)))
            await asyncio.sleep(0.3)
            ray.kill(b)
            t0 = time.monotonic()
            with pytest.raises(dagc.ActorDiedError, match="a1:Node"):
                await fut
            return time.monotonic() - t0

        took = asyncio.run(asyncio.wait_for(main(), 60))
        print(f"\n[fault] ray.kill during await: ActorDiedError after {took:.3f} s")
        assert took < BOUND


@pytest.mark.timeout(120)
def test_death_before_a_collective_names_the_dead_actor(ray, nodes):
    """The survivors' all-reduce breaks when a participant dies; the error still names the
    actor that died, not the loop that noticed it."""
    pytest.importorskip("torch")
    from ray.experimental.collective import allreduce

    a, b, c = nodes(3)
    with InputNode() as inp:
        dag = MultiOutputNode(allreduce.bind([w.tensor.bind(inp) for w in (a, b, c)]))
    cg = dagc.compile(dag)
    token = cg._session.token
    try:
        assert [float(t[0]) for t in cg.execute(0).get(timeout=30)] == [3.0] * 3
        t0 = time.monotonic()
        with pytest.raises(dagc.ActorDiedError) as info:
            cg.execute(("exit", 1, None)).get(timeout=60)
        took = time.monotonic() - t0
        print(f"\n[fault] death before an all-reduce: ActorDiedError after {took:.3f} s")
        msg = str(info.value)
        # Ray's sentence first, then dagc's detail naming the actor
        assert msg.startswith(
            "The actor died unexpectedly before finishing this task. a1:Node died"
        ), msg
        assert took < BOUND
        with pytest.raises(dagc.ActorDiedError):
            cg.execute(0)
        wait_until(lambda: loops_stopped([a, c], token), BOUND, "the survivors' loops stop")
    finally:
        cg.teardown()
    assert not segments(token)


@pytest.mark.timeout(120)
def test_death_during_profile_is_actor_died_error(ray, nodes):
    """An actor dies while cg.profile() runs: profile() raises the ActorDiedError naming
    it (before: "operation forbidden on released memoryview object", from switching the
    dead DAG's loops back), and the DAG is closed like any dead DAG."""
    a, b, c = nodes(3)
    cg = dagc.compile(_chain(a, b, c))
    token = cg._session.token
    assert cg.execute(1).get(timeout=30) == 1
    with pytest.raises(dagc.ActorDiedError, match="a1") as e:
        cg.profile(3, ("exit", 1, None))
    assert "memoryview" not in str(e.value)
    with pytest.raises(dagc.ActorDiedError):
        cg.execute(2)
    cg.teardown()
    wait_until(
        lambda: loops_stopped([a, c], token) and not segments(token),
        BOUND,
        "the survivors' loops stop",
    )
