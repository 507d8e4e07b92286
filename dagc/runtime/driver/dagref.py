"""The ref ``execute()`` returns: one execution's result.

:class:`DagRef` is a subclass of Ray's ``CompiledDAGRef``: Ray's own ``ray.get`` dispatches
on ``isinstance(x, CompiledDAGRef)`` and calls ``x.get(timeout=...)``, for one ref or each of
a list, so ``ray.get(ref)``, ``ray.get([refs], timeout=...)`` and ``await ref`` work on dagc
refs without any patch. dagc's rules stay: ``get()`` may be called any number of times, and
a held result never blocks later executions. Every thread that calls ``get()`` on a ref
gets its value (or its error); each ``get()`` of a failed ref raises a new exception (its
traceback starts there and holds no earlier call's frames).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.experimental.compiled_dag_ref import CompiledDAGRef

from dagc.runtime.failure import Failure

if TYPE_CHECKING:
    from dagc.runtime.driver.executions import Executions


class DagRef(CompiledDAGRef):
    """The result of one execution. ``get()`` blocks until it is there; may be called again.

    Also a Ray ``CompiledDAGRef`` (see the module docstring): ``ray.get(ref)`` is
    ``ref.get()``. Not copyable or picklable (Ray's rule: it belongs to this process's DAG).
    """

    __slots__ = ("_runs", "_idx", "_state", "_value")

    def __init__(self, runs: Executions, idx: int):
        self._runs = runs
        self._idx = idx
        self._state = 0  # 0 pending, 1 value, 2 error

    def get(self, timeout: float | None = None) -> Any:
        if self._state == 1:
            return self._value
        if self._state == 0:
            # settles this ref under the read lock: a second thread waiting on the same
            # ref finds it settled there and answers from it
            self._runs._fetch(self, timeout)
        return self._answer()

    def _settle(self, value) -> None:
        """Keep the execution's outcome (under the read lock): the value, or its Failure
        (plain data: the error is made anew by each get(), see _answer)."""
        if value.__class__ is not Failure and self._runs._multi:
            for v in value:
                if v.__class__ is Failure:
                    value = v
                    break
        self._value = value
        self._state = 2 if value.__class__ is Failure else 1  # after _value: read unlocked
        if self._state == 2:
            self._runs._stamps.failed += 1  # metrics.py samples it

    def _answer(self):
        if self._state == 1:
            return self._value
        raise self._value.to_error()

    def ready(self) -> bool:
        return self._state != 0 or self._runs._ready(self._idx)

    async def get_async(self) -> Any:
        if self.ready():
            return self.get()
        return await self._runs._gets.submit(self)

    def __await__(self):
        return self.get_async().__await__()

    def __del__(self):
        if self._state == 0:
            try:
                self._runs._abandon(self._idx)
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"DagRef(execution={self._idx})"

    __str__ = __repr__  # CompiledDAGRef's reads a Ray DAG's id

    def __reduce__(self):
        raise TypeError(
            "a DagRef cannot be pickled: it belongs to this process's compiled "
            "DAG; get() the value and pass that."
        )

    def __copy__(self):
        return self  # one execution, one result: a copy is the same ref

    def __deepcopy__(self, memo):
        return self
