"""Reading a MultiOutputNode's outputs in the driver, failing fast.

The generated ``collect`` reads every output channel in order when all of them hold the
execution's value (the common case: one ``ready()`` test each, no state). Otherwise it
hands over to :class:`Gather`, which reads the outputs *as they arrive*, so that the first
output that is a ``Failure`` ends the execution at once (docs/contract.md, "Fail fast": a slower
branch is not waited for) - exactly what Ray Compiled Graph does.

The outputs of that execution that were not read yet still come, later, on their
channels: each channel is a FIFO, so Gather only counts, per channel, how many messages
belong to executions already answered (``owed``) and drops that many before reading the
channel's next value. Nothing else has to wait for them, and a later ``get()`` whose
outputs are behind them simply reads through them.

Waiting on several channels: a reader can only wait on its own channel, so Gather waits on
the first unread output for a slice of time (1 ms, doubling up to ``max_slice``, the
compile option ``_read_slice``, 0.1 s), then looks at every channel again. A failure on
another output is therefore seen within ``max_slice`` at most (Ray polls its output
channels the same way, every ``RAY_CGRAPH_read_iteration_timeout_s``, 0.1 s by default),
and a long wait wakes the driver about ten times a second - far from a spin.

Timeouts keep their meaning: a ``deadline`` bounds the whole call; values read before it
ran out are kept (``got``) and the next call goes on from them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from dagc.runtime.channels import WaitTimeout
from dagc.runtime.failure import Failure

_monotonic = time.monotonic
FIRST_SLICE = 0.001


class _NotRead:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_READ"


NOT_READ = _NotRead()


def _first_unread(got: Sequence[Any]) -> int:
    for j, g in enumerate(got):
        if g is NOT_READ:
            return j
    return -1


class Gather:
    """The outputs of one execution at a time, read in arrival order (see the module).

    ``readers`` are the driver's reading ends of the output channels, in the order the
    generated ``collect`` unpacks them. ``pend`` is a list that is empty exactly when no
    execution is partly read and nothing is owed: then the generated fast path may read
    every channel in order.
    """

    __slots__ = ("readers", "got", "owed", "pend", "max_slice")

    def __init__(self, readers: Iterable[Any], max_slice: float = 0.1):
        self.readers = tuple(readers)
        self.max_slice = max_slice
        n = len(self.readers)
        self.got: list[Any] = [NOT_READ] * n  # this execution's values read so far
        self.owed = [0] * n  # per channel: messages of answered executions
        self.pend: list[bool] = []  # [] <=> nothing partly read, nothing owed

    @property
    def undrained(self) -> int:
        """Executions answered early (fail fast) whose every output is not read yet."""
        return max(self.owed)

    def collect(self, deadline: float | None) -> Any:
        """The execution's values by channel (a new list), or its first Failure at once."""
        try:
            return self._collect(deadline)
        finally:
            self._pend()

    def _collect(self, deadline: float | None) -> Any:
        got, owed, readers = self.got, self.owed, self.readers
        slice_ = min(FIRST_SLICE, self.max_slice)
        max_slice = self.max_slice
        while True:
            for j, r in enumerate(readers):
                while got[j] is NOT_READ and r.ready():
                    v = r.read()
                    if owed[j]:  # an answered execution's late output
                        owed[j] -= 1
                        continue
                    got[j] = v
                    if v.__class__ is Failure:  # fail fast: the rest is read later
                        for k, g in enumerate(got):
                            if g is NOT_READ:
                                owed[k] += 1
                            got[k] = NOT_READ
                        return v
            # identity tests only: a value may be a numpy array (no truth value for ==)
            j = _first_unread(got)
            if j < 0:
                out = got[:]
                for k in range(len(got)):
                    got[k] = NOT_READ
                return out
            # wait on the first output not read yet, one slice at a time
            now = _monotonic()
            if deadline is not None and now >= deadline:
                raise WaitTimeout()
            until = now + slice_
            if deadline is not None and deadline < until:
                until = deadline
            try:
                readers[j].wait_ready(until)
            except WaitTimeout:
                if deadline is not None and _monotonic() >= deadline:
                    raise
            if slice_ < max_slice:
                slice_ = min(max_slice, slice_ * 2)

    def drain(self, deadline: float | None) -> None:
        """Read (and drop) every owed output, waiting for them up to ``deadline``."""
        try:
            for j, r in enumerate(self.readers):
                while self.owed[j]:
                    r.read(deadline)
                    self.owed[j] -= 1
        finally:
            self._pend()

    def _pend(self) -> None:
        busy = any(self.owed) or any(g is not NOT_READ for g in self.got)
        if busy and not self.pend:
            self.pend.append(True)
        elif not busy and self.pend:
            self.pend.clear()

    def ready(self) -> bool:
        """Whether collect() would answer without waiting (conservatively)."""
        return not self.pend and all(r.ready() for r in self.readers)
