"""The actor the fault tests inject faults into.

``Node(k).step(x)`` passes ``x`` on unchanged, unless ``x`` is a command addressed to it:
a tuple ``(command, k, arg)`` makes node ``k`` (and only it) do ``command``. Commands
travel the whole DAG, so one input picks which actor fails and how.
"""

import ctypes
import os
import sys
import threading
import time

import numpy as np
import ray


class Unpicklable:
    def __init__(self):
        self.lock = threading.Lock()


class BadUnpickle:
    """Pickles fine; raises when unpickled (on the reading side)."""

    def __reduce__(self):
        return (_explode, ("BadUnpickle cannot be loaded",))


class LockedError(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def _explode(msg):
    raise RuntimeError(msg)


@ray.remote
class Node:
    def __init__(self, k=0):
        self.k = k
        self.calls = 0
        self.joins = 0

    def step(self, x, *more):
        self.calls += 1
        if isinstance(x, tuple) and len(x) == 3 and x[1] == self.k:
            cmd, _, arg = x
            if cmd == "exit":
                os._exit(1)
            if cmd == "segv":
                ctypes.string_at(0)
            if cmd == "sleep":
                time.sleep(arg)
            if cmd == "raise":
                raise ValueError(f"node {self.k} refuses {arg!r}")
            if cmd == "raise-unpicklable":
                raise LockedError(f"node {self.k} fails holding a lock")
            if cmd == "sysexit":
                sys.exit(arg)
            if cmd == "unpicklable":
                return Unpicklable()
            if cmd == "badunpickle":
                return BadUnpickle()
        return x

    def tensor(self, x):
        """A tensor for collectives; step's commands ("exit", k, None) apply first."""
        import torch

        self.step(x)
        return torch.full((4,), float(self.k))

    async def astep(self, x):
        import asyncio

        await asyncio.sleep(0)
        return x

    def join(self, *xs):
        self.joins += 1
        return list(xs)

    def pair(self, x):
        """Meant for num_returns=2; "three" returns 3 values, "scalar" a single int."""
        if x == "three":
            return x, x, x
        if x == "scalar":
            return 7
        return x, x

    def payload(self, x):
        """x = size in bytes (an int): return an array of that many bytes."""
        if isinstance(x, int) and x > 0:
            return np.full(x, self.k, dtype=np.uint8)
        return x

    def size(self, a):
        return int(getattr(a, "nbytes", 0))

    def pid(self):
        return os.getpid()

    def num_calls(self):
        return self.calls

    def num_joins(self):
        return self.joins
