"""Actor classes shared by the end-to-end tests."""

import os
import time

import numpy as np
import ray


class CustomError(Exception):
    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.detail = detail


@ray.remote
class Worker:
    def __init__(self, k=0):
        self.k = k
        self.calls = 0

    def inc(self, x):
        self.calls += 1
        return x + 1

    def add(self, x, y=0):
        return x + y

    def scale(self, x, factor=1, offset=0):
        return x * factor + offset

    def echo(self, x):
        return x

    def tag(self, x):
        return (self.k, x)

    def pair(self, x):
        return x, x * 2

    def triple_wrong(self, x):
        return x, x

    def concat(self, *xs):
        return list(xs)

    def fail_if(self, x, bad=3):
        if x == bad:
            raise ValueError(f"bad input {x}")
        return x

    def raise_custom(self, x):
        raise CustomError(7, f"x={x}")

    def sleep(self, x, s=0.0):
        time.sleep(s if s else (x if isinstance(x, (int, float)) else 0))
        return x

    def pid(self):
        return os.getpid()

    def num_calls(self):
        return self.calls

    def array(self, n):
        return np.arange(n, dtype=np.float64)

    def total(self, a):
        return float(np.asarray(a).sum())

    def mutate(self, a):
        a += 1
        return a

    def unpicklable(self, x):
        import threading

        return threading.Lock()

    async def async_inc(self, x):
        import asyncio

        await asyncio.sleep(0)
        return x + 1

    def die(self, x):
        os._exit(1)

    def segfault(self, x):
        import ctypes

        ctypes.string_at(0)
