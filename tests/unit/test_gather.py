"""Gather (dagc/runtime/driver/gather.py): a MultiOutputNode's outputs read failing fast.

Fake channel ends (a FIFO each) stand in for ring readers; no Ray, no processes.
"""

import collections
import time

import pytest

from dagc.runtime.channels import WaitTimeout
from dagc.runtime.driver.gather import Gather
from dagc.runtime.failure import Failure


class FakeReader:
    """A channel end: ``ready``/``read``/``wait_ready`` over a deque (one writer: the test)."""

    def __init__(self):
        self.q = collections.deque()
        self.waits = 0

    def ready(self):
        return bool(self.q)

    def read(self, deadline=None):
        if not self.q:
            raise WaitTimeout()
        return self.q.popleft()

    def wait_ready(self, until):
        self.waits += 1
        if self.q:
            return
        time.sleep(max(0.0, min(until - time.monotonic(), 0.01)))
        if not self.q:
            raise WaitTimeout()


def failure(msg="boom"):
    return Failure(None, None, "ValueError", msg, "", "a0", "m", 0)


def test_all_outputs_in_order():
    rs = [FakeReader(), FakeReader()]
    g = Gather(rs, 0.01)
    rs[0].q.append(1)
    rs[1].q.append(2)
    assert g.ready() and g.collect(None) == [1, 2]
    assert not g.pend and g.undrained == 0


def test_a_failure_answers_at_once_and_late_outputs_are_skipped():
    rs = [FakeReader(), FakeReader(), FakeReader()]
    g = Gather(rs, 0.01)
    f = failure()
    rs[1].q.append(f)  # outputs 0 and 2 not there yet (slow branches)
    t0 = time.monotonic()
    assert g.collect(time.monotonic() + 5) is f
    assert time.monotonic() - t0 < 1
    assert g.undrained == 1 and g.pend  # the generated fast path must not be taken
    # the slow outputs of execution 0 arrive, then execution 1's
    rs[0].q.extend(["late0", "x0"])
    rs[2].q.extend(["late2", "x2"])
    rs[1].q.append("x1")
    assert g.collect(None) == ["x0", "x1", "x2"]
    assert g.undrained == 0 and not g.pend


def test_a_timeout_keeps_what_was_read():
    rs = [FakeReader(), FakeReader()]
    g = Gather(rs, 0.01)
    rs[0].q.append("a")
    with pytest.raises(WaitTimeout):
        g.collect(time.monotonic() + 0.05)
    assert g.pend  # partly read: the next call goes on from it
    rs[1].q.append("b")
    assert g.collect(None) == ["a", "b"]
    assert not g.pend


def test_drain_reads_owed_outputs():
    rs = [FakeReader(), FakeReader()]
    g = Gather(rs, 0.01)
    rs[0].q.append(failure())
    assert g.collect(None).__class__ is Failure
    assert g.undrained == 1
    rs[1].q.append("late")
    g.drain(time.monotonic() + 1)
    assert g.undrained == 0 and not g.pend and not rs[1].q


def test_values_without_a_truth_value():
    """numpy arrays as outputs: Gather compares by identity only (an `in`/`index` on the
    list would ask the array for its truth value and raise)."""
    np = pytest.importorskip("numpy")
    rs = [FakeReader(), FakeReader()]
    g = Gather(rs, 0.01)
    rs[1].q.append(np.ones(3))  # the second output first: not in order
    with pytest.raises(WaitTimeout):
        g.collect(time.monotonic() + 0.02)
    rs[0].q.append(np.zeros(3))
    out = g.collect(None)
    assert out[0].tolist() == [0, 0, 0] and out[1].tolist() == [1, 1, 1]
