"""Timeouts, capacity and Ctrl-C: none of them loses or misaligns a result.

``get(timeout)`` raises DagTimeoutError and the result is fetched later; CapacityError past
``max_inflight`` is immediate even while the actors are busy; a KeyboardInterrupt raised
into the main thread during a long get() (a real signal that interrupts the futex wait,
or ``_thread.interrupt_main``) leaves the DAG consistent: get() again returns the value,
and later executions return their own values.
"""

import _thread
import signal
import threading
import time

import pytest

import dagc
from dagc import InputNode, MultiOutputNode

BOUND = 10.0


def _fan(a, b):
    with InputNode() as inp:
        return MultiOutputNode([a.step.bind(inp), b.step.bind(a.step.bind(inp))])


@pytest.mark.timeout(120)
def test_timeouts_keep_results_fetchable(ray, nodes):
    a, b = nodes(2)
    with dagc.compile(_fan(a, b)) as cg:
        slow = cg.execute(("sleep", 1, 1.0))  # b sleeps; a's output is there at once
        later = cg.execute(2)
        t0 = time.monotonic()
        with pytest.raises(dagc.DagTimeoutError, match="fetched later"):
            later.get(timeout=0.05)  # waits behind the slow one
        took = time.monotonic() - t0
        print(f"\n[fault] get(timeout=0.05) raised after {took:.3f} s")
        assert took < 0.5
        with pytest.raises(TimeoutError):
            slow.get(timeout=0)  # a zero timeout polls
        for _ in range(10):  # many timeouts change nothing
            with pytest.raises(dagc.DagTimeoutError):
                slow.get(timeout=0.01)
        with pytest.raises(dagc.DagTimeoutError):
            dagc.get([slow, later], timeout=0.05)
        assert later.get(timeout=30) == [2, 2]  # fetching the later one reads both
        assert slow.get(timeout=30) == [("sleep", 1, 1.0)] * 2
        assert [cg.execute(i).get(timeout=30) for i in range(3)] == [[0, 0], [1, 1], [2, 2]]


@pytest.mark.timeout(120)
def test_capacity_error_is_immediate_and_recoverable(ray, nodes):
    a, b = nodes(2)
    with dagc.compile(_fan(a, b), max_inflight=3) as cg:
        refs = [cg.execute(("sleep", 0, 1.0))] + [cg.execute(i) for i in (1, 2)]
        t0 = time.monotonic()
        for _ in range(3):
            with pytest.raises(dagc.CapacityError, match="max_inflight=3"):
                cg.execute(9)
        assert time.monotonic() - t0 < 0.5  # never waits for the busy actors
        with pytest.raises(dagc.DagTimeoutError):
            refs[2].get(timeout=0.05)
        with pytest.raises(dagc.CapacityError):  # a timed-out get frees nothing
            cg.execute(9)
        assert refs[1].get(timeout=30) == [1, 1]  # fetching frees one place
        r = cg.execute(3)
        with pytest.raises(dagc.CapacityError):
            cg.execute(9)
        assert [x.get(timeout=30) for x in (refs[0], refs[2], r)] == [
            [("sleep", 0, 1.0)] * 2,
            [2, 2],
            [3, 3],
        ]


@pytest.mark.timeout(120)
def test_ref_collected_inside_a_fetch_keeps_the_counts(ray, nodes):
    """Garbage collection can run a DagRef's finalizer at any bytecode, also inside this
    DAG's own fetch on the same thread. Forced here at the worst point: right after the
    fetch advanced past the execution whose (unreachable) ref is collected, before it
    decided where that execution's value goes. The drop must still be accounted: once
    every execution is fetched or dropped, the full capacity is there again."""
    import gc
    import weakref

    (a,) = nodes(1)
    with InputNode() as inp:
        dag = a.step.bind(inp)
    with dagc.compile(dag, max_inflight=2) as cg:
        runs = cg._runs  # what DagRef.get() reads through
        cls = type(runs)
        seen = {}

        class Hooked(cls):
            @property
            def _read_next(self):
                return self.__dict__["_read_next"]

            @_read_next.setter
            def _read_next(self, value):
                self.__dict__["_read_next"] = value
                if value == 1 and "collected" not in seen:  # execution 0 was just read
                    gc.collect()
                    seen["collected"] = gone() is None

        gc.disable()  # only the hook collects
        try:
            r0, r1 = cg.execute(0), cg.execute(1)
            gone = weakref.ref(r0)
            cycle = [r0]
            cycle.append(cycle)  # unreachable once the names go: only gc frees it
            del r0, cycle
            runs.__class__ = Hooked
            try:
                assert r1.get(timeout=30) == 1  # reads execution 0 first
            finally:
                runs.__class__ = cls
        finally:
            gc.enable()
        assert seen == {"collected": True}
        # execution 0 was dropped, 1 fetched: both places are free again
        refs = [cg.execute(2), cg.execute(3)]
        assert [r.get(timeout=30) for r in refs] == [2, 3]
        assert runs.pending == 0 and not runs._results and not runs._abandoned


def _signal_interrupt():
    """Deliver a signal whose handler raises KeyboardInterrupt, as Ctrl-C does."""
    old = signal.signal(signal.SIGUSR1, _raise_interrupt)
    main = threading.main_thread().ident

    def fire():
        signal.pthread_kill(main, signal.SIGUSR1)

    return fire, lambda: signal.signal(signal.SIGUSR1, old)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wait", ["adaptive", "block", "spin"])
@pytest.mark.parametrize("how", ["signal", "interrupt_main"])
def test_ctrl_c_during_get_leaves_dag_consistent(ray, nodes, wait, how):
    assert threading.current_thread() is threading.main_thread()
    a, b = nodes(2)
    if how == "signal":
        fire, restore = _signal_interrupt()
    else:
        fire, restore = _thread.interrupt_main, (lambda: None)
    try:
        with dagc.compile(_fan(a, b), wait=wait) as cg:
            assert cg.execute(0).get(timeout=30) == [0, 0]
            slow = cg.execute(("sleep", 1, 1.5))
            after = [cg.execute(i) for i in (1, 2, 3)]
            timer = threading.Timer(0.3, fire)
            t0 = time.monotonic()
            timer.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    slow.get(timeout=60)
            finally:
                timer.join()
            took = time.monotonic() - t0
            print(f"\n[fault] KeyboardInterrupt ({how}, wait={wait}) left get() after {took:.3f} s")
            assert took < 1.4  # it did interrupt the wait
            # the same execution is still there, and every later one is its own
            assert slow.get(timeout=30) == [("sleep", 1, 1.5)] * 2
            assert [r.get(timeout=30) for r in after] == [[1, 1], [2, 2], [3, 3]]
            assert [cg.execute(i).get(timeout=30) for i in range(4, 8)] == [
                [i, i] for i in range(4, 8)
            ]
    finally:
        restore()


@pytest.mark.timeout(120)
def test_ctrl_c_during_dagc_get_of_many(ray, nodes):
    a, b = nodes(2)
    fire, restore = _signal_interrupt()
    try:
        with dagc.compile(_fan(a, b)) as cg:
            refs = [cg.execute(1), cg.execute(("sleep", 1, 1.5)), cg.execute(3)]
            timer = threading.Timer(0.3, fire)
            timer.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    dagc.get(refs, timeout=60)
            finally:
                timer.join()
            assert refs[0].get(timeout=30) == [1, 1]  # fetched before the interrupt
            assert dagc.get(refs, timeout=30) == [[1, 1], [("sleep", 1, 1.5)] * 2, [3, 3]]
    finally:
        restore()


@pytest.mark.timeout(120)
def test_teardown_while_another_thread_waits(ray, nodes):
    """teardown() from one thread ends a get() blocked in another with DagClosedError."""
    a, b = nodes(2)
    cg = dagc.compile(_fan(a, b))
    ref = cg.execute(("sleep", 1, 30))
    out = {}

    def wait():
        try:
            ref.get(timeout=60)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
        out["at"] = time.monotonic()

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    cg.teardown()
    t.join(30)
    assert not t.is_alive()
    assert isinstance(out.get("error"), dagc.DagClosedError), out
    took = out["at"] - t0
    print(f"\n[fault] teardown from another thread: blocked get() raised after {took:.3f} s")
    assert took < BOUND
