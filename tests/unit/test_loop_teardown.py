"""Teardown pieces of the runtime checked without Ray: how an actor loop closes its writers
after a death upstream (``ActorLoop.close``), and the thread behind ``await ref``
(``driver/awaiting.py``).
"""

from __future__ import annotations

import asyncio
import threading
import types

from dagc.runtime.actor.loop import ActorLoop
from dagc.runtime.channels.tcp import TcpWriter
from dagc.runtime.driver.awaiting import AsyncGets


class _Tcp(TcpWriter):
    """A TcpWriter that only records how it was closed (no socket)."""

    def __init__(self) -> None:
        self.closed_with: list = []

    def close(self, abort: bool = False, failed: str | None = None) -> None:
        self.closed_with.append(failed)


class _Ring:
    """A shared-memory writer's close(): no ``failed`` (its readers see the control word)."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def _loop_state(failed_who: str | None) -> types.SimpleNamespace:
    control = types.SimpleNamespace(released=0)
    control.release = lambda: setattr(control, "released", control.released + 1)
    return types.SimpleNamespace(
        _comms={},
        _readers={},
        _writers={"c1": _Tcp(), "c2": _Ring()},
        _failed_who=failed_who,
        _event_loops=[],
        control=control,
    )


def test_a_tcp_writer_tells_its_readers_who_died_upstream():
    state = _loop_state("a0:Source")
    tcp, ring = state._writers["c1"], state._writers["c2"]
    ActorLoop.close(state)  # a stand-in with only the attributes close() reads
    assert tcp.closed_with == ["a0:Source"]  # the TCP readers name the dead actor
    assert ring.closed == 1 and state._writers == {} and state.control.released == 1


def test_writers_close_plainly_when_no_one_died():
    state = _loop_state(None)
    tcp, ring = state._writers["c1"], state._writers["c2"]
    ActorLoop.close(state)
    assert tcp.closed_with == [None] and ring.closed == 1


class _Ref:
    def __init__(self, value, gate: threading.Event) -> None:
        self.value, self.gate = value, gate

    def get(self):
        assert self.gate.wait(10), "the test never opened the gate"
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


def test_concurrent_awaits_share_one_thread_and_all_complete():
    """Coroutines of two event loops (two threads) submit at once: one serving thread is
    started, and every future gets its ref's outcome, errors included."""
    gets = AsyncGets("dagc-get-test")
    gate = threading.Event()
    results: dict = {}
    start = threading.Barrier(2, timeout=10)

    async def await_many(k: int):
        start.wait()
        futs = [gets.submit(_Ref(k * 10 + i, gate)) for i in range(5)]
        futs.append(gets.submit(_Ref(ValueError(f"boom {k}"), gate)))
        return await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 10)

    def run(k: int) -> None:
        results[k] = asyncio.run(await_many(k))

    threads = [threading.Thread(target=run, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(15)
        assert not t.is_alive()
    try:
        for k in (1, 2):
            *values, err = results[k]
            assert values == [k * 10 + i for i in range(5)]
            assert isinstance(err, ValueError) and str(err) == f"boom {k}"
        assert [t.name for t in threading.enumerate()].count("dagc-get-test") == 1
    finally:
        gets.shutdown()
        served = gets.thread
        assert served is not None
        served.join(10)
        assert not served.is_alive()


def test_shutdown_before_any_await_starts_nothing():
    gets = AsyncGets("dagc-get-unused")
    gets.shutdown()
    assert gets.thread is None
