"""Queueing past capacity (issue 20, part 4): ``max_queued`` executions beyond
``max_inflight`` wait in the driver and enter the pipeline in order as room frees; the
driver reads finished results into its buffer without the caller fetching first; one more
raises ``CapacityError``. ``max_queued=0`` (the default) is Ray's behaviour, unchanged.
"""

import asyncio
import threading
import time

import pytest

import dagc
from dagc import InputNode, MultiOutputNode
from tests.e2e.actors import Worker


def _pump_threads():
    return [t for t in threading.enumerate() if t.name == "dagc-queue"]


def _wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.timeout(180)
def test_500_before_any_get_in_order_and_the_error_one_past_the_queue(workers):
    """The issue's test: max_inflight=2, max_queued=1000; 500 executions submitted before
    any get(), every result right and in order; then the one past the queue raises."""
    a, b = workers[0], workers[1]
    with InputNode() as inp:
        dag = b.inc.bind(a.inc.bind(inp))
    cg = dagc.compile(dag, max_inflight=2, max_queued=1000)
    try:
        refs = [cg.execute(i) for i in range(500)]
        # the driver moves them in and takes their results without any get(); the last
        # max_inflight stay in the pipeline for get() (no pump once the queue is empty)
        _wait_until(
            lambda: cg._runs.queued == 0 and cg._runs._read_next >= 498,
            60,
            "the queue drains without a get()",
        )
        _wait_until(lambda: not _pump_threads(), 10, "the pump ends with the queue")
        assert [r.get(timeout=30) for r in refs] == [i + 2 for i in range(500)]
        # full: 2 in the pipeline + 1000 queued or read and not fetched
        refs = [cg.execute(i) for i in range(1002)]
        with pytest.raises(dagc.CapacityError, match="max_queued=1000") as ei:
            cg.execute(0)
        assert "1002 executions are submitted and not fetched" in str(ei.value)
        assert refs[0].get(timeout=30) == 2  # one fetched: room for one more
        more = cg.execute(7)
        with pytest.raises(dagc.CapacityError):
            cg.execute(0)
        assert [r.get(timeout=60) for r in refs[1:]] == [i + 2 for i in range(1, 1002)]
        assert more.get(timeout=30) == 9
        _wait_until(lambda: not _pump_threads(), 10, "the pump ends with the queue")
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_from_four_threads_at_once(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.add.bind(inp[0], inp[1])
    cg = dagc.compile(dag, max_inflight=2, max_queued=400)
    got: dict = {}
    errors: list = []

    def run(t):
        try:
            refs = [cg.execute(t * 1000, i) for i in range(100)]
            got[t] = [r.get(timeout=60) for r in refs]
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert got == {t: [t * 1000 + i for i in range(100)] for t in range(4)}
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_from_asyncio_many_at_once(workers):
    a = workers[1]
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    cg = dagc.compile(dag, max_inflight=2, max_queued=300)

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*[cg.execute_async(i) for i in range(300)]), 60
        )

    try:
        assert asyncio.run(main()) == [i + 1 for i in range(300)]
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_multi_output_queued_fails_fast_in_place(workers):
    """A MultiOutputNode whose one branch fails for some inputs: each failure reaches its
    own execution's get(), the others are right, the queue keeps its order."""
    a, b = workers[2], workers[3]
    with InputNode() as inp:
        dag = MultiOutputNode([a.fail_if.bind(inp), b.inc.bind(inp)])
    cg = dagc.compile(dag, max_inflight=2, max_queued=200)
    try:
        refs = [cg.execute(i % 5) for i in range(150)]
        for i, r in enumerate(refs):
            if i % 5 == 3:
                with pytest.raises(dagc.TaskError, match="bad input 3"):
                    r.get(timeout=30)
            else:
                assert r.get(timeout=30) == [i % 5, i % 5 + 1]
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_errors_in_queued_executions_reach_their_get(workers):
    """A method that raises, and arguments that cannot be pickled, in queued executions:
    each is that execution's TaskError; every other result is right and in order."""
    a = workers[0]
    with InputNode() as inp:
        dag = a.fail_if.bind(inp)
    cg = dagc.compile(dag, max_inflight=2, max_queued=100)
    try:
        inputs = list(range(40))
        inputs[17] = threading.Lock()  # cannot be pickled: fails when it is sent
        refs = [cg.execute(x) for x in inputs]
        for i, r in enumerate(refs):
            if i == 3:
                with pytest.raises(dagc.TaskError, match="bad input 3") as ei:
                    r.get(timeout=30)
                assert isinstance(ei.value, ValueError)
            elif i == 17:
                with pytest.raises(dagc.TaskError, match="Pass picklable values") as ei:
                    r.get(timeout=30)
                assert isinstance(ei.value, TypeError)
            else:
                assert r.get(timeout=30) == i
        # arguments that do not fit the InputNode are refused at execute(), queued or not
        blockers = [cg.execute(0.0) for _ in range(2)]
        with pytest.raises(dagc.ExecuteArgumentError):
            cg.execute(1, 2)
        assert [r.get(timeout=30) for r in blockers] == [0.0, 0.0]
    finally:
        cg.teardown()


@pytest.mark.timeout(180)
def test_actor_death_fails_every_queued_execution(ray_session):
    w = Worker.remote()
    ray_session.get(w.echo.remote(0))
    with InputNode() as inp:
        dag = w.sleep.bind(inp)
    cg = dagc.compile(dag, max_inflight=2, max_queued=50)
    try:
        refs = [cg.execute(0.0), cg.execute(30)] + [cg.execute(0.0) for _ in range(20)]
        assert refs[0].get(timeout=30) == 0.0
        ray_session.kill(w)
        t0 = time.monotonic()
        for r in refs[1:]:
            with pytest.raises(
                dagc.ActorDiedError, match="The actor died unexpectedly before finishing this task"
            ):
                r.get(timeout=60)
        assert time.monotonic() - t0 < 30
        with pytest.raises(dagc.ActorDiedError):
            cg.execute(0)
        _wait_until(lambda: not _pump_threads(), 10, "the pump ends")
    finally:
        cg.teardown()


@pytest.mark.timeout(120)
def test_teardown_with_a_queue_fails_queued_executions(workers):
    a = workers[1]
    with InputNode() as inp:
        dag = a.sleep.bind(inp)
    cg = dagc.compile(dag, max_inflight=1, max_queued=20)
    refs = [cg.execute(0.5)] + [cg.execute(0.0) for _ in range(10)]
    assert cg._runs.queued == 10
    t0 = time.monotonic()
    cg.teardown()
    for r in refs[1:]:
        with pytest.raises(dagc.DagClosedError, match="Channel closed"):
            r.get(timeout=30)
    assert time.monotonic() - t0 < 10
    _wait_until(lambda: not _pump_threads(), 10, "the pump ends after teardown")
    assert cg._runs.queued == 0


@pytest.mark.timeout(120)
def test_max_queued_zero_is_capacity_error_as_before(workers):
    a = workers[2]
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    cg = dagc.compile(dag, max_inflight=2)
    try:
        assert type(cg._runs).__name__ == "Executions"  # no queue, no pump
        refs = [cg.execute(1), cg.execute(2)]
        with pytest.raises(dagc.CapacityError, match=r"max_inflight=2\)"):
            cg.execute(3)
        assert not _pump_threads()
        assert [r.get(timeout=30) for r in refs] == [2, 3]
    finally:
        cg.teardown()
    with pytest.raises(ValueError, match="max_queued must be an int >= 0"):
        dagc.compile(dag, max_queued=-1)


@pytest.mark.timeout(120)
def test_patched_ray_reaches_max_queued_through_the_environment(workers, monkeypatch, no_shm_leak):
    """Under dagc.patch_ray(): DAGC_MAX_QUEUED (no Ray keyword maps); Ray's own
    capacity error past the queue."""
    import ray

    a = workers[3]
    monkeypatch.setenv("DAGC_MAX_QUEUED", "30")
    with dagc.patched_ray(workers=False):
        with ray.dag.InputNode() as inp:
            dag = a.inc.bind(inp)
        cdag = dag.experimental_compile(_max_inflight_executions=2)
        try:
            refs = [cdag.execute(i) for i in range(32)]
            with pytest.raises(
                ray.exceptions.RayCgraphCapacityExceeded,
                match="can't have more than 32 in-flight executions",
            ):
                cdag.execute(0)
            assert ray.get(refs, timeout=60) == [i + 1 for i in range(32)]
        finally:
            cdag.teardown()
