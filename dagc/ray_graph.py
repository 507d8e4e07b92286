"""What ``dag.experimental_compile()`` returns under ``dagc.patch_ray()``: a dagc
:class:`~dagc.CompiledDag` that speaks Ray's ``CompiledDAG`` API where the two differ.

:class:`RayCompiledDag` *is* a ``dagc.CompiledDag`` (``schedule``, ``source``, ``dump``,
``profile``, ... all work); these methods follow Ray instead:

=====================  ==================================================================
``execute()``          a ``CompiledDAGRef``, or a list of them (one per output) for a
                       ``MultiOutputNode``; dagc's own returns one ref whose value is the list
``execute_async()``    awaitable; yields futures that are awaited again (``await fut``)
``get_id()``           the graph's id, as in ``str(ref)``
``teardown()``         ``kill_actors=`` as Ray's
``visualize()``        Ray's signature: ``filename``, ``format="png"``, ``view``,
                       ``channel_details``; returns the DOT source (ASCII for "ascii")
``is_teardown``        Ray's name of ``closed``
=====================  ==================================================================

The refs (:class:`RayDagRef`, :class:`RayDagFuture`) are dagc ``DagRef``s and so Ray
``CompiledDAGRef``s (``ray.get`` takes them); the refs of one execution share one dagc
``DagRef``, so ``get()`` of any of them fails fast when any output failed, may be called
any number of times, and the execution is released when the last of them is dropped.
Ray's "-1 waits forever" is honoured by ``get(timeout=-1)``; a timeout says which
``RAY_CGRAPH_get_timeout`` is in force, as Ray's message does.
"""

from __future__ import annotations

import uuid
import warnings

from ray.experimental.compiled_dag_ref import CompiledDAGFuture, CompiledDAGRef

from dagc.errors import CapacityError, DagTimeoutError
from dagc.runtime.driver.compiled import CompiledDag
from dagc.runtime.driver.dagref import DagRef

# Ray's "wait forever" (-1) as a dagc timeout: dagc's None means "the compile default"
FOREVER = 10.0**8

# how long teardown(kill_actors=True) waits for Ray to report its killed actors dead
# (Ray's own teardown timeout); killing is quick, the bound is for a wedged cluster
KILL_WAIT = 30.0

__all__ = ["RayCompiledDag", "RayDagRef", "RayDagFuture"]


class _NotPickled(TypeError, ValueError):
    """Pickling a Ray-style ref: Ray's ``ValueError``, and a ``TypeError`` as well."""


class _ShownAsRays(type):
    """The refs' metaclass: the class reads as Ray's own in what Ray writes about it
    (``ray.wait(ref)``'s "got <class '...CompiledDAGRef'>"), as the same code reads
    under Ray. ``__name__`` and ``__module__`` stay dagc's."""

    def __repr__(cls) -> str:
        return repr(cls.__dict__.get("_shown_as", cls))


class RayDagRef(DagRef, metaclass=_ShownAsRays):
    """One output of one execution (``channel`` None: the only output), Ray-style."""

    __slots__ = ("_graph", "_shared", "_channel")
    _shown_as: type = CompiledDAGRef

    def __init__(self, graph: RayCompiledDag, shared: DagRef, channel):
        self._graph = graph
        self._shared = shared
        self._channel = channel
        self._runs = shared._runs
        self._idx = shared._idx
        self._state = 0

    def get(self, timeout: float | None = None):
        if timeout is not None and timeout < 0:
            timeout = FOREVER
        try:
            value = self._shared.get(timeout)
        except DagTimeoutError as e:
            raise DagTimeoutError(
                f"{e} If the execution is expected to take a long time, increase "
                f"RAY_CGRAPH_get_timeout which is currently {self._graph._ray_get_timeout} "
                f"seconds. Otherwise, this may indicate that the execution is hanging."
            ) from None
        return value if self._channel is None else value[self._channel]

    def ready(self) -> bool:
        return self._shared.ready()

    async def get_async(self):
        value = await self._shared.get_async()
        return value if self._channel is None else value[self._channel]

    def __del__(self):
        pass  # the shared DagRef releases the execution when its last ref goes

    # Ray's rules and words: not copied, deep-copied or pickled (a dagc DagRef copies as
    # itself and refuses pickling with dagc's words)
    __copy__ = CompiledDAGRef.__copy__
    __deepcopy__ = CompiledDAGRef.__deepcopy__

    def __reduce__(self):
        # Ray's ValueError to pickle.dumps(ref); a TypeError too, which is what makes
        # ray.put/.remote() of a value holding one say it "was found to be
        # non-serializable" (Ray's serializer catches TypeError)
        raise _NotPickled("CompiledDAGRef cannot be pickled.")

    def __str__(self) -> str:
        return (
            f"CompiledDAGRef({self._graph.get_id()}, execution_index={self._idx}, "
            f"channel_index={self._channel})"
        )

    __repr__ = __str__


class RayDagFuture(RayDagRef, CompiledDAGFuture):
    """What ``await cdag.execute_async(...)`` yields: ``await fut`` gives the value."""

    __slots__ = ()
    _shown_as = CompiledDAGFuture

    def __str__(self) -> str:
        return (
            f"CompiledDAGFuture({self._graph.get_id()}, execution_index={self._idx}, "
            f"channel_index={self._channel})"
        )

    __repr__ = __str__


class RayCompiledDag(CompiledDag):
    """A dagc CompiledDag with Ray's ``CompiledDAG`` API (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._id = uuid.uuid4().hex
        out = self._ir.output
        self._nout = len(out.refs) if out.multi else None
        self._ray_get_timeout = self._session.options["get_timeout"]

    # -- Ray's API -------------------------------------------------------------------------
    def get_id(self) -> str:
        return self._id

    @property
    def is_teardown(self) -> bool:
        return self.closed

    @property
    def _execution_index(self) -> int:
        """Ray's: the index of the last execution submitted (-1 before the first)."""
        return self._runs._submitted - 1

    @property
    def _max_inflight_executions(self) -> int:
        return self._runs._max_inflight

    def _submit(self, args, kwargs) -> DagRef:
        try:
            return self._runs.execute(*args, **kwargs)
        except CapacityError as e:
            # with dagc's queue (max_queued), what may be unfetched is the queue too
            n = self._runs._max_inflight + getattr(self._runs, "_max_queued", 0)
            raise CapacityError(
                f"The compiled graph can't have more than {n} in-flight executions, and you "
                f"currently have {self._runs.pending} in-flight executions. Retrieve an "
                f"output using ray.get before submitting more requests or increase "
                f"`_max_inflight_executions`. (dagc: {e})"
            ) from None

    def execute(self, *args, **kwargs):
        """Submit one execution: a ref, or a list of refs for a MultiOutputNode."""
        ref = self._submit(args, kwargs)
        if self._nout is None:
            return RayDagRef(self, ref, None)
        return [RayDagRef(self, ref, i) for i in range(self._nout)]

    async def execute_async(self, *args, **kwargs):
        """Submit one execution; yields a future (or a list of them) to await."""
        await self._restarted()  # a re-prepare is waited for off the event loop
        ref = self._submit(args, kwargs)
        if self._nout is None:
            return RayDagFuture(self, ref, None)
        return [RayDagFuture(self, ref, i) for i in range(self._nout)]

    def teardown(self, kill_actors: bool = False) -> None:
        """Stop the loops (idempotent); with ``kill_actors``, also ``ray.kill`` the actors
        and return once Ray reports each of them dead (at most ``KILL_WAIT`` seconds)."""
        super().teardown()
        import ray

        if kill_actors and ray.is_initialized():  # never start a Ray to kill actors
            _kill_and_wait(list(self._session.handles), KILL_WAIT)

    def visualize(  # type: ignore[override]  # Ray's signature
        self,
        filename: str = "compiled_graph",
        format: str = "png",
        view: bool = False,
        channel_details: bool = False,
    ):
        """Ray's ``visualize``: "ascii" returns the text (printed with ``view``); other
        formats write ``filename`` (the DOT source) and ``filename.<format>``, and return
        the DOT source. dagc's graph always names each edge's channel and transport
        (``channel_details``). Without Graphviz's ``dot`` program the picture cannot be
        drawn: a warning says so and the DOT source is still written (Ray raises there)."""
        from dagc.inspect.graph import RenderUnavailableError, render

        if format == "ascii":
            if channel_details:
                raise ValueError(
                    "Parameters 'channel_details' are not compatible with 'ascii' format."
                )
            text = render(self.schedule, "ascii")
            if view:
                print(text)
            return text
        dot = render(self.schedule, "dot")
        with open(filename, "w") as f:
            f.write(dot)
        if format == "dot":
            return dot
        try:
            data = render(self.schedule, format)
        except RenderUnavailableError as e:
            warnings.warn(
                f"visualize(): {e} The DOT source is in {filename!r} "
                f"(dot -T{format} {filename} -o {filename}.{format}).",
                RuntimeWarning,
                stacklevel=2,
            )
            return dot
        with open(f"{filename}.{format}", "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        if view:
            _view(f"{filename}.{format}")
        return dot

    def __repr__(self) -> str:
        return super().__repr__().replace("<dagc.CompiledDag", "<dagc.CompiledDag (Ray API)", 1)


def _view(path: str) -> None:
    import subprocess
    import sys

    opener = "open" if sys.platform == "darwin" else "xdg-open"
    try:
        subprocess.Popen([opener, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        pass


def _kill_and_wait(handles: list, wait: float) -> None:
    """``ray.kill`` each actor, then wait until a call on it fails with
    ``ActorDiedError``. ``ray.kill`` only asks Ray to kill; a call made just after it may
    still run on the live actor, and code that tears down with ``kill_actors=True``
    expects the actors gone when it returns. Bounded by ``wait`` seconds in all."""
    import time

    import ray
    from ray.exceptions import ActorDiedError

    alive = []
    for h in handles:
        try:
            ray.kill(h)
        except Exception:  # not an actor Ray can kill: nothing to wait for
            continue
        alive.append(h)
    deadline = time.monotonic() + wait
    while alive and time.monotonic() < deadline:
        pings = [h.__ray_ready__.remote() for h in alive]
        left = []
        for h, ping in zip(alive, pings):
            try:
                ray.get(ping, timeout=max(0.0, deadline - time.monotonic()))
            except ActorDiedError:
                continue
            except Exception:  # unavailable for now, or the wait timed out: ask again
                left.append(h)
            else:
                left.append(h)  # the kill has not reached it yet
        alive = left
        if alive:
            time.sleep(0.02)
