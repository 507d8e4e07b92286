"""The ``rt`` object the driver's generated module binds (``DriverRuntime``): its channel
ends by id, a MultiOutputNode's gathered read, ``execute()``'s argument checks (top-level
ObjectRefs resolved as ``.remote()`` does; arguments that do not match the InputNode
refused in Ray's words), and what an argument that cannot be pickled becomes.
"""

from __future__ import annotations

from ray import ObjectRef

from dagc.errors import DagTimeoutError, ExecuteArgumentError
from dagc.runtime.channels import shm
from dagc.runtime.failure import Failure


class ArgumentsNotSent(TypeError):
    """``execute()``'s arguments could not be pickled (raised by the driver's writers)."""


def arguments_not_picklable(exc: Exception, value):
    """The driver's writers' ``on_encode_error``: encoding the user's arguments failed.
    Only this becomes execute()'s "could not send its arguments" error; anything else
    raised while submitting is dagc's own bug and propagates as it is."""
    if isinstance(exc, shm.ShmFullError):
        # no room in /dev/shm for this input: the execution carries the error to get()
        # (a Failure in its place keeps every input channel in step), the DAG goes on
        from dagc.runtime.failure import capture

        return capture(exc, "driver", "execute", -1)
    raise ArgumentsNotSent(
        f"execute() could not send its arguments to the actors: "
        f"{type(exc).__name__}: {exc}. Pass picklable values."
    ) from exc


class DriverRuntime:
    """The ``rt`` object the generated driver module binds against."""

    Failure = Failure

    ObjectRef = ObjectRef  # execute()'s top-level ObjectRefs are resolved

    def __init__(
        self, readers, writers, inputs, read_slice: float = 0.1, get_timeout: float | None = None
    ):
        self._readers = readers
        self._writers = writers
        self._inputs = inputs
        self._read_slice = read_slice
        self._get_timeout = get_timeout
        self.gathered = None  # the Gather of a MultiOutputNode's outputs, if made

    def reader(self, cid):
        return self._readers[cid]

    def writer(self, cid):
        return self._writers[cid]

    def gather(self, cids):
        from dagc.runtime.driver.gather import Gather

        self.gathered = Gather([self._readers[c] for c in cids], self._read_slice)
        return self.gathered

    def resolve_refs(self, args, kwargs):
        """execute()'s arguments with every top-level ``ObjectRef`` replaced by its value,
        as Ray resolves a ``.remote()`` call's (nested refs are passed on as they are).
        Waits for the values up to ``get_timeout``."""
        import ray
        from ray.exceptions import GetTimeoutError

        where = [(i, a) for i, a in enumerate(args) if isinstance(a, ray.ObjectRef)]
        where += [(k, a) for k, a in kwargs.items() if isinstance(a, ray.ObjectRef)]
        try:
            values = ray.get([a for _, a in where], timeout=self._get_timeout)
        except GetTimeoutError:
            raise DagTimeoutError(
                f"execute() waited {self._get_timeout} s for the value of the ObjectRef it "
                f"was given as argument {where[0][0]!r} (execute() resolves top-level "
                f"ObjectRefs, as .remote() does); nothing was submitted."
            ) from None
        except Exception as e:
            raise ExecuteArgumentError(
                f"execute() passes the value of an ObjectRef argument (as .remote() does), "
                f"and the value of the ObjectRef given as argument "
                f"{' or '.join(repr(k) for k, _ in where)} could not be fetched; nothing was "
                f"submitted. {type(e).__name__}: {e}"
            ) from e
        args, kwargs = list(args), dict(kwargs)
        for (k, _), v in zip(where, values):
            if isinstance(k, int):
                args[k] = v
            else:
                kwargs[k] = v
        return tuple(args), kwargs

    def bad_input(self, args, kwargs):
        """execute()'s arguments do not match the InputNode's use. The first sentence is
        Ray Compiled Graph's (code written for Ray matches it); then what dagc expected."""
        spec = self._inputs
        want = f"{spec.num_positional} positional argument(s)"
        if spec.kwargs:
            want += " and keyword argument(s) " + ", ".join(spec.kwargs)
        if len(args) != spec.num_positional:
            ray_says = (
                f"dag.execute() or dag.execute_async() must be called with "
                f"{spec.num_positional} positional args, got {len(args)}"
            )
        else:
            missing = [k for k in spec.kwargs if k not in kwargs]
            if missing:
                ray_says = (
                    f"dag.execute() or dag.execute_async() must be called with kwarg `{missing[0]}`"
                )
            else:
                extra = sorted(set(kwargs) - set(spec.kwargs))
                ray_says = (
                    f"dag.execute() or dag.execute_async() got unexpected kwarg(s) "
                    f"{', '.join(f'`{k}`' for k in extra)}"
                )
        raise ExecuteArgumentError(
            f"{ray_says}: execute() takes {want} (as the DAG uses its InputNode), got "
            f"{len(args)} positional and keyword(s) {sorted(kwargs) or 'none'}."
        )
