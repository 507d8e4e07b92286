"""Every error dagc raises on purpose; all subclass :class:`DagcError`.

Each is also the exception Ray Compiled Graph raises in the same situation (docs/contract.md, "Ray
interop"), so code written against Ray's ``experimental_compile`` catches dagc's errors
unchanged, with or without ``dagc.patch_ray()``:

==================  =====================================================================
dagc                also an instance of
==================  =====================================================================
CompileError        ``ValueError`` (Ray refuses a DAG it cannot compile with ValueError)
TaskError           ``ray.exceptions.RayTaskError`` and the user exception's own class
DagTimeoutError     ``ray.exceptions.RayChannelTimeoutError`` (so ``TimeoutError`` too)
CapacityError       ``ray.exceptions.RayCgraphCapacityExceeded``
ActorDiedError      ``ray.exceptions.ActorDiedError`` and ``ray.exceptions.RayChannelError``
DagClosedError      ``ray.exceptions.RayChannelError`` (Ray: "Channel closed")
ExecuteArgumentError ``ValueError``
==================  =====================================================================

Ray's exception classes take other constructor arguments; dagc's take one message, as
before, and set the attributes Ray's classes define (``client_exc``, ``actor_id``,
``function_name``, ...) so code that reads them finds them.
"""

from __future__ import annotations

from ray import exceptions as _ray

# Ray Compiled Graph's first sentences where code written for Ray matches on them
# (``pytest.raises(match=...)``, log filters, retry rules): dagc's messages start with them
# and go on with dagc's own detail.
RAY_ACTOR_DIED = "The actor died unexpectedly before finishing this task."  # ActorDiedError's
RAY_CHANNEL_CLOSED = "Channel closed."  # the RayChannelError of a torn-down graph


class DagcError(Exception):
    """Base class of every dagc error."""

    def __init__(self, *args):
        # one message, whatever the Ray base class's constructor wants
        BaseException.__init__(self, *args)

    def __str__(self) -> str:
        return BaseException.__str__(self)


class _RaySystemError:
    """Ray's RaySystemError family keeps its message in ``client_exc``."""

    traceback_str = None

    @property
    def client_exc(self):
        return self.args[0] if self.args else ""


class CompileError(DagcError, ValueError):
    """The DAG cannot be compiled. The message names the node and the fix. Also a
    ValueError, which is what Ray's ``experimental_compile`` raises for such a DAG."""


class DeadlockError(CompileError):
    """The schedule could deadlock. ``table`` is the Step x Actor table marking the stuck ops."""

    def __init__(self, message: str, table: str = ""):
        super().__init__(message + ("\n" + table if table else ""))
        self.table = table


class DagTimeoutError(DagcError, _RaySystemError, _ray.RayChannelTimeoutError):
    """``get(timeout=...)`` ran out; the result can still be fetched later. Also a
    ``TimeoutError`` and Ray's ``RayChannelTimeoutError``."""


class CapacityError(DagcError, _RaySystemError, _ray.RayCgraphCapacityExceeded):
    """More than ``max_inflight`` executions are submitted and not yet fetched."""


class ActorDiedError(DagcError, _RaySystemError, _ray.ActorDiedError, _ray.RayChannelError):
    """An actor of the DAG died (or the driver went away); the DAG is unusable. Also Ray's
    ``ActorDiedError`` and ``RayChannelError`` (a compiled graph's channel to a dead actor)."""

    actor_id = None  # type: ignore[assignment]  # Ray's own default (which Ray types str)
    _actor_init_failed = False
    _preempted = False

    # Ray's attribute, read-only here: the message is str(self), never set apart from it
    @property
    def error_msg(self) -> str:  # type: ignore[override]
        return str(self)


class DagClosedError(DagcError, _RaySystemError, _ray.RayChannelError):
    """``execute`` after ``teardown`` (Ray: a ``RayChannelError``, the channel is closed)."""


class ExecuteArgumentError(DagcError, ValueError):
    """``execute()`` was called with arguments that do not match the DAG's InputNode use."""


class TaskError(DagcError, _ray.RayTaskError):
    """A user method raised. Instances raised by ``get()`` are also instances of the cause's
    class, and of Ray's ``RayTaskError`` (``function_name``, ``traceback_str``, ``cause``,
    ``as_instanceof_cause()`` as Ray's)."""

    cause: BaseException | None = None
    actor: str = ""
    method: str = ""
    remote_traceback: str = ""
    proctitle = ""
    pid = 0
    ip = ""
    _actor_id = None

    @property
    def function_name(self) -> str:
        return self.method

    @property
    def traceback_str(self) -> str:
        return self.remote_traceback

    @property
    def actor_repr(self) -> str:
        return self.actor

    def as_instanceof_cause(self):
        """Ray's: the error as an instance of its cause's class too - which it already is."""
        return self

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.args[0] if self.args else "task failed"


_TASK_ERROR_CLASSES: dict[type, type[TaskError]] = {}


def make_task_error(
    cause: BaseException | None,
    cause_type: type,
    message: str,
    actor: str,
    method: str,
    remote_tb: str,
) -> TaskError:
    """Build an exception that is both a TaskError and an instance of ``cause_type``.

    Falls back to a plain TaskError when ``cause_type`` cannot be subclassed
    (for example a class with an incompatible instance layout).
    """
    cls = _TASK_ERROR_CLASSES.get(cause_type)
    if cls is None:
        cls = TaskError
        if issubclass(cause_type, BaseException) and not issubclass(cause_type, TaskError):
            try:
                cls = type(
                    f"TaskError({cause_type.__name__})",
                    (TaskError, cause_type),
                    {
                        "__init__": lambda self, *a: BaseException.__init__(self, *a),
                        "__str__": TaskError.__str__,
                        "__reduce__": lambda self: (
                            _rebuild_task_error,
                            (
                                self.cause,
                                cause_type,
                                self.args[0],
                                self.actor,
                                self.method,
                                self.remote_traceback,
                            ),
                        ),
                        "__module__": "dagc.errors",
                    },
                )
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
