"""Surviving actor restarts: when Ray restarts an actor of a running compiled DAG (the
actor's own ``max_restarts``), the DAG launches its running part again and goes on.

What happens (docs/faults.md, "Actor restarts"):

1. The driver notices the death as before (``Executions._on_stop``, a ``PeerDied``). The
   hook :meth:`Restarts.on_stop` decides, in that thread, from Ray's actor table (state,
   ``max_restarts``, ``num_restarts``, pid): which actors of the DAG died, and whether Ray
   restarts every one of them. If not (no process died - a crashed loop -, an actor Ray
   will not restart, or too many re-prepares within ``WINDOW_S``), it returns and the DAG
   closes as it always did.
   A death noticed while the DAG is idle (``watcher.py``: no execute() or get() to see
   it) takes the same path.
2. Otherwise the executions in flight (sent into the pipeline and not read) fail with
   ``ActorDiedError``; executions queued in the driver past ``max_inflight`` were never
   sent, so they stay queued and run on the new run; ``execute()`` from now on waits
   (the gate below) for the DAG to come back, and a thread re-launches it: the surviving
   loops are stopped, every end of the old run is closed under every lock of the
   Executions (so no execute()/get()/queue pump is inside one), the in-flight executions
   are marked lost, every actor is probed until it answers (Ray queues the call while
   the actor restarts), and a fresh :class:`Session` - a new token, so new segment and
   channel names; the same IR and generated modules - starts on the same handles.
3. The Executions adopt the new session (its submit/collect, readers, finalizer), the
   queued and the gated executions go in, in order, and the ``on_restart`` callbacks run
   with a :class:`RestartEvent`.

The schedule and generated code never change: an actor that came back on another node (or
without the GPUs it had) would need other channels, so that closes the DAG with an error
saying to compile again. A restarted actor's own state is its constructor's, as with Ray.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from functools import partial

from dagc.errors import RAY_ACTOR_DIED, ActorDiedError
from dagc.runtime.channels import PeerDied, shm

# at most this many re-prepares of one DAG within WINDOW_S seconds; one more closes it
# (an actor with max_restarts=-1 that dies right after every restart never settles)
MAX_PER_WINDOW = 5
WINDOW_S = 60.0
SEEN_WITHIN = 1.0  # how long Ray's actor table may lag behind a death the driver saw
_monotonic = time.monotonic


@dataclass(frozen=True)
class RestartEvent:
    """What ``cg.on_restart(fn)`` calls ``fn`` with: one re-prepare of the DAG after Ray
    restarted actors of it (docs/faults.md, "Actor restarts").

    Attributes:
        count: the DAG's re-prepares so far, this one included (``cg.restarts``).
        actors: the labels of the actors Ray restarted, as the schedule prints them
            (``("a1:Stage",)``).
        reason: what ended the previous run (``"a1:Stage died (its process is gone)"``).
        lost: executions that were in flight at the death and failed with
            ``ActorDiedError`` (executions queued in the driver are not lost).
        seconds: from the driver noticing the death to accepting executions again.
    """

    count: int
    actors: tuple
    reason: str
    lost: int
    seconds: float


@dataclass(frozen=True)
class _Info:
    state: str  # Ray's actor state: ALIVE, RESTARTING, DEAD, PENDING_CREATION, ...
    max_restarts: int  # -1: unbounded
    num_restarts: int
    pid: int


def actor_info(handle) -> _Info | None:
    """The actor's row in Ray's actor table (the GCS); None when it cannot be read. One
    GCS call; no dashboard needed."""
    try:
        from ray._private import state as ray_state
        from ray.core.generated import gcs_pb2

        raw = ray_state.state._connect_and_get_accessor().get_actor_info(handle._actor_id)
        if raw is None:
            return None
        table = gcs_pb2.ActorTableData  # type: ignore[attr-defined]  # generated, no stubs
        d = table.FromString(raw)
        return _Info(table.ActorState.Name(d.state), d.max_restarts, d.num_restarts, d.pid)
    except Exception:
        return None


class Restarts:
    """One compiled DAG's re-prepares. ``on_stop`` is its Executions' ``_restart`` hook;
    ``on_session(session)`` is told of each new session (CompiledDag keeps its parts in step).
    Holds no reference to the Executions between restarts (no cycle: a dropped DAG is
    released at once, as before)."""

    def __init__(self, on_session, cg_ref):
        self.count = 0
        self._cg = cg_ref  # weak: the CompiledDag, whose execute() is gated
        self._done = threading.Event()
        self._done.set()
        self.callbacks: list = []
        self._on_session = on_session
        self._lock = threading.Lock()
        self._busy = False
        self._message = ""
        self._times: list = []  # when each re-prepare began (the window)
        self._restartable: dict = {}  # actor id -> whether max_restarts != 0 (fixed)

    @property
    def busy(self) -> bool:
        """Whether a re-prepare is under way (execute() waits for it)."""
        return self._busy

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no re-prepare is under way."""
        return self._done.wait(timeout)

    # -- deciding (in the thread that noticed the death) ---------------------------------------
    def on_stop(self, runs, e) -> None:
        """``Executions._on_stop``'s hook: raises ActorDiedError (and starts re-preparing)
        when Ray restarts the actors that died; returns to let the DAG close otherwise.
        Called holding the submit lock or the read lock (never waiting for the other while
        holding ``_lock``: a thread holding it may be on its way here)."""
        with self._lock:
            if self._busy:  # any end of the old run, while re-preparing
                raise ActorDiedError(self._message) from None
            if not isinstance(e, PeerDied) or runs._closed or runs._dead:
                return
            session = runs._session
            if not self._may_restart(session):
                return  # no actor of the DAG may restart: as before
            why = session.why_stopped(e.who)
            dead = self._dead_actors(session, e.who)
            if not dead:
                return
            now = _monotonic()
            self._times = [t for t in self._times if now - t < WINDOW_S]
            if len(self._times) >= MAX_PER_WINDOW:
                n = f"{len(self._times)} times within {WINDOW_S:.0f} s"
                self._close(
                    runs,
                    session,
                    f"{why}; Ray restarted actors of this compiled DAG "
                    f"{n}, so it is not re-prepared again (the restarts do not settle)",
                )
            self._times.append(now)
            self._busy = True
            self._message = msg = (
                f"{RAY_ACTOR_DIED} {why}; the executions in flight at the death are lost. "
                f"Ray restarts {', '.join(dead)} (max_restarts) and the compiled DAG "
                f"re-prepares it: execute() again (it waits for the re-prepare; user state "
                f"of the restarted actor is its constructor's)."
            )
            done = self._done = threading.Event()
            # set here, in the thread that noticed, so no execution slips into the old
            # run's rings: execute() waits for the new run, holding no lock (_gated); the
            # old run takes nothing more (a queue past max_inflight keeps its executions,
            # and its pump and get()s wait for ``_paused``: queued.py)
            runs._submit = partial(_not_now, dead[0])
            runs._paused = done
            gate = partial(_gated, runs, done, _bound(session.options))
            runs.execute = gate  # an instance attribute: ray_graph calls it
            cg = self._cg()
            if cg is not None and "execute" in vars(cg):  # CompiledDag's own binding
                cg.execute = gate
        lost = 0  # the in-flight executions answer at once (ready());
        if runs._read_lock.acquire(timeout=1.0):  # else the re-prepare marks them
            try:  # (after the submit lock, if held: the usual order)
                lost = _lose_inflight(runs, msg)
            finally:
                runs._read_lock.release()
        args = (runs, session, why, dead, lost, now, done)
        threading.Thread(target=self._run, args=args, name="dagc-restart", daemon=True).start()
        raise ActorDiedError(msg) from None

    def _may_restart(self, session) -> bool:
        """Whether any actor of the DAG has max_restarts != 0 (asked of Ray once)."""
        for a, h in zip(session.ir.actors, session.handles):
            if a.id not in self._restartable:
                info = actor_info(h)
                if info is None:
                    return False
                self._restartable[a.id] = info.max_restarts != 0
        return any(self._restartable.values())

    def _dead_actors(self, session, who: str) -> tuple:
        """The labels of the DAG's actors whose process died, when Ray restarts every one
        of them; () when none died (a crashed loop) or one will not come back."""
        here = session.layout.driver_node
        deadline = _monotonic() + SEEN_WITHIN
        while True:
            dead = []
            for a, h in zip(session.ir.actors, session.handles):
                pid0 = session.probes[a.id].pid
                local_gone = a.node == here and not shm.pid_alive(pid0)
                info = actor_info(h)
                if info is None:
                    return ()
                if info.state == "ALIVE" and info.pid == pid0 and not local_gone:
                    continue  # alive as far as anyone can tell
                if info.state == "DEAD":
                    return ()
                if info.state == "ALIVE" and info.pid == pid0:  # Ray has not seen it yet
                    if 0 <= info.max_restarts <= info.num_restarts:
                        return ()
                dead.append(a.label)
            if dead:
                return tuple(dead)
            i = session.procs.index(who) if who in session.procs else 0
            local = i > 0 and session.ir.actors[i - 1].node == here
            if local or _monotonic() > deadline:  # a live local process: its loop crashed
                return ()
            time.sleep(0.05)

    # -- re-preparing (on its own thread) ------------------------------------------------------
    def _run(self, runs, old, why, dead, lost, t0, done) -> None:
        try:
            lost += self._relaunch(runs, old)
        except BaseException as e:  # noqa: BLE001 - the DAG closes saying why
            what = f"but the compiled DAG could not re-prepare: {type(e).__name__}: {e}"
            self._close(runs, old, f"{why}; Ray restarted {', '.join(dead)} {what}", False)
        else:
            if runs._closed:
                return
            self.count += 1
            event = RestartEvent(self.count, dead, why, lost, _monotonic() - t0)
            for fn in list(self.callbacks):
                try:
                    fn(event)
                except Exception as e:  # noqa: BLE001 - a user callback
                    warnings.warn(
                        f"dagc: an on_restart callback raised {e!r}", RuntimeWarning, stacklevel=2
                    )
        finally:
            del runs.execute  # the class's again
            cg = self._cg()
            if cg is not None and "execute" in vars(cg):
                cg.execute = runs.execute
            with self._lock:
                self._busy = False
            runs._paused = None
            done.set()

    def _relaunch(self, runs, old) -> int:
        """Start the DAG again; returns how many more executions were lost (submitted into
        the old run while the death was being noticed)."""
        opts = old.options
        old.stop_actors(wait=True)  # the survivors' loops (the restarted have none)
        with _Locked(runs):
            lost = _lose_inflight(runs, self._message)
        shm.unlink_prefix(old.prefix)  # names only: the old ends stay mapped until the
        #                                  new run replaces them (a wait on one says PeerDied)
        deadline = _monotonic() + opts["start_timeout"]
        while True:
            probes = _probe_all(runs, old, deadline)
            if runs._closed:
                return lost
            _check_placement(old, probes)
            new = old.renewed(probes)
            self._on_session(new)  # its prefix is known before anything is made
            try:
                submit, collect = new.start()
            except ActorDiedError:  # died again while starting: wait for it again
                if _monotonic() > deadline:
                    raise
                continue
            break
        with _Locked(runs):  # nobody is inside an end of the old run
            old.close_ends((), None)
            _adopt(runs, new, submit, collect)
        if runs._closed:  # torn down meanwhile: this run goes too
            from dagc.runtime.driver.executions import _release

            _release(new, (), runs._gets, True)
        return lost

    def _close(self, runs, session, why: str, raise_: bool = True) -> None:
        """Close the DAG for good, as a death Ray does not restart closes it."""
        runs._dead = why
        session.stop_actors(wait=False)
        session.release()
        session.close_ends(runs._locks, None)
        runs._submit = _refuse
        if raise_:
            raise ActorDiedError(runs._death_message()) from None


def _bound(options) -> float:
    """How long execute() waits for a re-prepare: the actor's coming back and the start
    round are each bounded by start_timeout, stopping the old loops by teardown_timeout."""
    return 2 * options["start_timeout"] + options["teardown_timeout"]


def _gated(runs, done, bound, *args, **kwargs):
    """``execute()`` while the DAG re-prepares: wait for the new run (no lock held), then
    execute as always (every check made afresh)."""
    if not done.wait(bound):
        why = f"waited {bound:.0f} s for the compiled DAG to re-prepare a restarted actor"
        raise ActorDiedError(f"{RAY_ACTOR_DIED} execute() {why}; nothing was submitted.")
    return type(runs).execute(runs, *args, **kwargs)


def _not_now(who, args, kwargs):
    """``Executions._submit`` between the death and the new run: sends nothing (a queued
    execution stays queued; the hook answers the PeerDied with ActorDiedError)."""
    raise PeerDied(who)


def _refuse(args, kwargs):
    raise ActorDiedError(f"{RAY_ACTOR_DIED} the compiled DAG is closed")


def _lose_inflight(runs, msg: str) -> int:
    """Every execution sent into the pipeline and not read belongs to the old run: it is
    lost (its get() raises ActorDiedError(msg)) and no longer counts in flight. Executions
    queued in the driver (queued.py: ``_sent`` up to ``_submitted``) were never sent: they
    keep their places and enter the new run. Under the submit and read locks."""
    runs._take_abandoned()
    lost = 0
    end = getattr(runs, "_sent", runs._submitted)
    for i in range(runs._read_next, end):
        runs._fetched += 1
        if i in runs._abandoned:
            runs._abandoned.discard(i)
        else:
            runs._lost[i] = msg
            lost += 1
    runs._read_next = end
    runs._fetched += runs._unsettled  # failed fast, slower outputs never coming now
    runs._unsettled = 0
    return lost


class _Locked:
    """Every lock of the Executions (submit, read, and a queue's wait lock), in order."""

    def __init__(self, runs):
        self.locks = runs._locks

    def __enter__(self):
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc):
        for lock in reversed(self.locks):
            lock.release()


def _probe_all(runs, session, deadline: float) -> dict:
    """{actor id: Probe} once every actor answers. Ray queues a call to a restarting actor
    until it is back; a call that met the dead process is sent again. An actor Ray will not
    restart, or none back by ``deadline``, is an ActorDiedError."""
    import ray
    from ray.exceptions import RayActorError

    from dagc.runtime.actor import lifecycle

    actors = session.ir.actors

    def ask(i):
        return session.handles[i].__ray_call__.remote(lifecycle.probe, "", (), "")

    pending = {ask(i): i for i in range(len(actors))}
    got: dict = {}
    while pending:
        if runs._closed:
            return got
        left = deadline - _monotonic()
        if left <= 0:
            names = ", ".join(actors[i].label for i in pending.values())
            limit = session.options["start_timeout"]
            raise ActorDiedError(f"{names} did not come back within start_timeout={limit} s")
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=min(0.5, left))
        for ref in ready:
            i = pending.pop(ref)
            try:
                got[actors[i].id] = ray.get(ref)
            except RayActorError as e:
                info = actor_info(session.handles[i])
                if info is None or info.state == "DEAD":
                    raise ActorDiedError(
                        f"{actors[i].label} died and Ray does not restart "
                        f"it: {str(e).splitlines()[0]}"
                    ) from None
                time.sleep(0.05)
                pending[ask(i)] = i
    return got


def _check_placement(session, probes: dict) -> None:
    """The restarted actors run where the DAG was lowered for (node; GPUs or none)."""
    for a in session.ir.actors:
        p = probes[a.id].place
        if p.node != a.node or bool(p.gpus) != bool(a.gpu_ids):
            where = "another node" if p.node != a.node else ("GPUs" if p.gpus else "no GPU")
            raise ActorDiedError(
                f"{a.label} came back with {where} (node {p.node[:12]}, GPUs {list(p.gpus)}; "
                f"compiled for node {a.node[:12]}, GPUs {list(a.gpu_ids)}): its channels were "
                f"lowered for where it ran, so compile the DAG again"
            )


def _adopt(runs, session, submit, collect) -> None:
    """The Executions run on ``session`` from now on. Under every lock of the Executions."""
    from dagc.runtime.driver import executions as ex

    old = runs._session
    runs._session = session
    runs._collect = collect
    runs._readers = session.readers
    runs._gather = getattr(session.runtime, "gathered", None)
    runs._submit = submit  # last: the gated execute()s go in from here
    fin = runs._finalizer
    runs._finalizer = weakref.finalize(runs, ex._release, session, runs._locks, runs._gets, False)
    runs._finalizer.atexit = False
    fin.detach()
    try:
        from ray.dag import compiled_dag_node

        compiled_dag_node._compiled_dags.pop(f"dagc-{old.token}", None)
    except Exception:
        pass
    ex._register_with_ray(runs)
    resume = getattr(runs, "_resume", None)  # a queue's executions go into the new run
    if resume is not None:
        resume()
