"""Finalizers wake the driver's background threads without taking a lock (wake.py).

A DAG dropped during a thread's start-up once deadlocked the compile: the sampler started
its thread while holding its table lock, garbage collection ran the dropped DAG's finalizer
inside the new thread's start-up, and the finalizer waited for that lock.
"""

import threading

from dagc.runtime.driver import metrics
from dagc.runtime.driver.wake import Wake


def test_wait_returns_what_was_handed_over_or_nothing_after_the_timeout():
    w = Wake()
    assert w.wait(0.01) == []
    w.set()
    w.set("a")
    w.set("b")
    assert w.wait(1.0) == ["a", "b"]
    assert w.empty()


def test_a_set_from_another_thread_ends_a_wait():
    w = Wake()
    threading.Timer(0.05, w.set, ("x",)).start()
    assert w.wait(10.0) == ["x"]


def test_a_dropped_dag_never_waits_for_the_samplers_lock():
    s = metrics.Sampler()
    held, release = threading.Event(), threading.Event()

    def hold():
        with s.lock:
            held.set()
            release.wait(10.0)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(5.0)
    done = threading.Event()
    # what a finalizer does, on a thread other than the lock's holder
    threading.Thread(target=lambda: (s.gone(metrics._Dag(0)), done.set()), daemon=True).start()
    try:
        assert done.wait(2.0), "gone() waited for the sampler's lock"
    finally:
        release.set()
        t.join(5.0)
    got = s.wake.wait(1.0)
    assert [d.slot for d in got] == [0]
