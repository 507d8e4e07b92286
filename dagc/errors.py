"""Every error dagc raises on purpose; all subclass :class:`DagcError`."""
from __future__ import annotations

import builtins


class DagcError(Exception):
    """Base class of every dagc error."""


class CompileError(DagcError):
    """The DAG cannot be compiled. The message names the node and the fix."""


class DeadlockError(CompileError):
    """The schedule could deadlock. ``table`` is the Step x Actor table marking the stuck ops."""

    def __init__(self, message: str, table: str = ""):
        super().__init__(message + ("\n" + table if table else ""))
        self.table = table


class DagTimeoutError(DagcError, builtins.TimeoutError):
    """``get(timeout=...)`` ran out; the result can still be fetched later."""


class CapacityError(DagcError):
    """More than ``max_inflight`` executions are submitted and not yet fetched."""


class ActorDiedError(DagcError):
    """An actor of the DAG died (or the driver went away); the DAG is unusable."""


class DagClosedError(DagcError):
    """``execute`` after ``teardown``."""


class ExecuteArgumentError(DagcError, ValueError):
    """``execute()`` was called with arguments that do not match the DAG's InputNode use."""


class TaskError(DagcError):
    """A user method raised. Instances raised by ``get()`` are also instances of the cause's class."""

    cause: BaseException | None = None
    actor: str = ""
    method: str = ""
    remote_traceback: str = ""

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.args[0] if self.args else "task failed"


_TASK_ERROR_CLASSES: dict[type, type] = {}


def make_task_error(cause: BaseException | None, cause_type: type, message: str,
                    actor: str, method: str, remote_tb: str) -> TaskError:
    """Build an exception that is both a TaskError and an instance of ``cause_type``.

    Falls back to a plain TaskError when ``cause_type`` cannot be subclassed
    (for example a class with an incompatible instance layout).
    """
    cls = _TASK_ERROR_CLASSES.get(cause_type)
    if cls is None:
        cls = TaskError
        if issubclass(cause_type, BaseException) and not issubclass(cause_type, TaskError):
            try:
                cls = type(f"TaskError({cause_type.__name__})", (TaskError, cause_type),
                           {"__init__": lambda self, *a: BaseException.__init__(self, *a),
                            "__str__": TaskError.__str__,
                            "__reduce__": lambda self: (_rebuild_task_error,
                                                        (self.cause, cause_type, self.args[0],
                                                         self.actor, self.method,
                                                         self.remote_traceback)),
                            "__module__": "dagc.errors"})
            except TypeError:
                cls = TaskError
        _TASK_ERROR_CLASSES[cause_type] = cls
    try:
        err = cls.__new__(cls, message)
        BaseException.__init__(err, message)
    except Exception:  # the cause's __new__ insists on other arguments
        err = TaskError(message)
    err.cause = cause
    err.actor = actor
    err.method = method
    err.remote_traceback = remote_tb
    return err


def _rebuild_task_error(cause, cause_type, message, actor, method, remote_tb):
    return make_task_error(cause, cause_type, message, actor, method, remote_tb)
