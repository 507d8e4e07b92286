"""A user method's exception, carried through channels like any value.

A ``Failure`` replaces the op's result; every downstream op that reads it skips its call
and passes the same Failure on, so the error reaches ``get()`` with the actor, method,
step and remote traceback of where it started, and the loop keeps running.
"""

from __future__ import annotations

import linecache
import pickle
import traceback
from typing import Any

from dagc.errors import TaskError, make_task_error


class Failure:
    __slots__ = (
        "exc_bytes",
        "cls_bytes",
        "type_name",
        "message",
        "tb",
        "actor",
        "method",
        "step",
        "where",
    )

    def __init__(
        self,
        exc_bytes: bytes | None,
        cls_bytes: bytes | None,
        type_name: str,
        message: str,
        tb: str,
        actor: str,
        method: str,
        step: int,
        where: str = "",
    ):
        self.exc_bytes = exc_bytes
        self.cls_bytes = cls_bytes
        self.type_name = type_name
        self.message = message
        self.tb = tb
        self.actor = actor
        self.method = method
        self.step = step
        self.where = where  # the user's method: "pipeline.py:23 Embedder.embed"

    def __reduce__(self) -> tuple[type[Failure], tuple[Any, ...]]:
        return (
            Failure,
            (
                self.exc_bytes,
                self.cls_bytes,
                self.type_name,
                self.message,
                self.tb,
                self.actor,
                self.method,
                self.step,
                self.where,
            ),
        )

    def to_error(self) -> TaskError:
        cause: BaseException | None = None
        cause_type: type = Exception
        try:
            if self.exc_bytes is not None:
                cause = pickle.loads(self.exc_bytes)
                cause_type = type(cause)
            elif self.cls_bytes is not None:
                cause_type = pickle.loads(self.cls_bytes)
        except Exception:
            cause = None
        if isinstance(cause, TaskError):
            return cause
        msg = (
            f"{self.type_name}: {self.message}\n\n"
            f"raised by {self.actor}.{self.method}"
            f"{f' at {self.where}' if self.where else ''} (schedule step {self.step}); "
            f"remote traceback:\n{self.tb}"
        )
        return make_task_error(cause, cause_type, msg, self.actor, self.method, self.tb)

    def __repr__(self) -> str:
        return f"Failure({self.type_name} in {self.actor}.{self.method})"


def generated_context(exc: BaseException, around: int = 3) -> str:
    """The generated-code lines around where ``exc`` passed through a dagc loop module."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<dagc "):
            found = tb
        tb = tb.tb_next
    if found is None:
        return ""
    fname, lineno = found.tb_frame.f_code.co_filename, found.tb_lineno
    lines = linecache.getlines(fname)
    if not lines:
        return ""
    lo, hi = max(1, lineno - around), min(len(lines), lineno + around)
    body = []
    for i in range(lo, hi + 1):
        mark = "   <--- HERE" if i == lineno else ""
        body.append(f"{i:5d} {lines[i - 1].rstrip()}{mark}")
    return f"\nin generated code {fname}:\n" + "\n".join(body) + "\n"


def capture(exc: BaseException, actor: str, method: str, step: int, where: str = "") -> Failure:
    """Turn an exception raised by a user method into a Failure value. ``where``: where the
    user wrote the method ("pipeline.py:23 Embedder.embed"), when the compiler knew it."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tb += generated_context(exc)
    exc_bytes = None
    try:
        exc_bytes = pickle.dumps(exc, 5)
        pickle.loads(exc_bytes)  # it must also come back
    except Exception:
        try:  # an __init__ that wants other arguments: carry class, args and __dict__
            exc_bytes = pickle.dumps(_Shell(type(exc), exc.args, dict(vars(exc))), 5)
            pickle.loads(exc_bytes)
        except Exception:
            exc_bytes = None
    try:
        cls_bytes = pickle.dumps(type(exc))
    except Exception:
        cls_bytes = None
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable exception>"
    return Failure(
        exc_bytes, cls_bytes, type(exc).__name__, message, tb, actor, method, step, where
    )


class _Shell:
    """Rebuilds an exception without calling its __init__."""

    def __init__(self, cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]):
        self.cls, self.args, self.state = cls, args, state

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_exception, (self.cls, self.args, self.state))


def _rebuild_exception(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def first_failure(*values: Any) -> Failure | None:
    """The first of ``values`` that is a Failure (an exact class test: values may be
    anything, arrays included), or None."""
    for v in values:
        if v.__class__ is Failure:
            return v
    return None
