"""Deaths of idle DAGs' actors: one daemon thread per driver process notices them.

A DAG learns of an actor's death when it waits for one of its channels (the waits check
the control word and the peers' pids: ``channels/control.py``). An idle DAG waits for
nothing, so without this thread it would notice only at its next execution, which would
fail. The watcher looks at every live DAG every ``INTERVAL`` seconds and, when one of
its processes is gone, takes the path a ``get()`` that saw the death takes
(``Executions._on_stop`` with a ``PeerDied``): the DAG re-prepares an actor Ray restarts
(``restart.py``) or closes, so the next ``execute()`` runs on the restarted actor (or
raises ``ActorDiedError`` at once).

What it looks at, per DAG (none of it touches the hot path):

* the driver's node's control word: ``FAILED`` when a process there saw a death (a loop
  reading a TCP channel from an actor on another node sees its EOF, and says so there);
* the pids of the DAG's actors on the driver's node (``os.kill(pid, 0)``);
* while nothing is in flight, whether a TCP channel the driver reads has ended (an actor on
  another node writing to the driver died: its socket is at EOF), under the DAG's locks
  taken only if free, so no execution races the look;
* every ``ASK_EVERY`` looks, Ray's actor table (one GCS call per actor) for the actors on
  other nodes that the driver does not read: one in the middle of a chain on a third node
  has no socket here to end. Dead, restarting, or alive with another pid than it had at
  the compile: it died.

The thread starts with the first DAG compiled and ends once no DAG is live: a dropped DAG
wakes it (a finalizer), a torn-down one ends it within ``INTERVAL``. A DAG on the
driver's node alone (and a DAG the driver reads every remote actor of) makes no Ray call
unless a death is seen (the restart path asks Ray's actor table).
"""

from __future__ import annotations

import threading
import weakref

from dagc.errors import DagcError
from dagc.ir import DRIVER
from dagc.runtime.channels import PeerDied, shm
from dagc.runtime.channels.control import C_WHO, FAILED
from dagc.runtime.driver.wake import Wake

INTERVAL = 0.5  # seconds between two looks at every live DAG
ASK_EVERY = 4  # looks between two reads of Ray's actor table (actors on other nodes)


class Watcher:
    """The process's watcher thread and the live DAGs' Executions (weakly)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.dags: weakref.WeakSet = weakref.WeakSet()
        self.wake = Wake()  # set by finalizers too: see wake.py
        self.thread: threading.Thread | None = None

    def watch(self, runs) -> None:
        with self.lock:
            self.dags.add(runs)
            weakref.finalize(runs, self.wake.set)  # dropped: maybe the last one
            if self.thread is None:
                self.thread = threading.Thread(target=self._main, name="dagc-watcher", daemon=True)
                self.thread.start()

    def _main(self) -> None:
        n = 0
        while True:
            n += 1
            self.wake.wait(INTERVAL)
            with self.lock:
                # weak: a DAG dropped meanwhile is collected at once, as without the watcher
                live = [weakref.ref(r) for r in self.dags if not (r._closed or r._dead)]
                if not live:
                    self.dags.clear()
                    self.thread = None
                    return
            for ref in live:
                runs = ref()
                if runs is None:
                    continue
                try:
                    look(runs, ask_ray=n % ASK_EVERY == 0)
                except Exception:  # released under us (a teardown, a restart): next look
                    pass
                runs = None


def look(runs, ask_ray: bool = False) -> None:
    """One look at one DAG; a death found takes get()'s path (restart or close).
    ``ask_ray``: also read Ray's actor table for the remote actors the driver does not read."""
    if runs._closed or runs._dead or getattr(runs, "_paused", None) is not None:
        return  # closed, or re-preparing after a death already seen
    session = runs._session
    who = _gone(session)
    if who is None and ask_ray:
        who = _gone_remote(session)
    tcp = _tcp_readers(session) if who is None else []
    if who is None and not tcp:
        return
    # looked at under the submit and read locks, taken only if free (a thread inside
    # execute()/get() waits on the channels and notices the death itself); then get()'s
    # path, holding the read lock as a get() does (closing the ends takes the submit lock)
    sub, rd = runs._submit_lock, runs._read_lock
    if not sub.acquire(blocking=False):
        return
    if not rd.acquire(blocking=False):
        sub.release()
        return
    try:
        try:
            if runs._session is not session or runs._closed or runs._dead:
                return
            if who is None:
                who = _ended(runs, tcp)
                if who is None:
                    return
        finally:
            sub.release()
        try:
            runs._on_stop(PeerDied(who))
        except DagcError:
            pass  # ActorDiedError: re-preparing, or closed; the next execute() says so
    finally:
        rd.release()


def _gone(session) -> str | None:
    """The process of the DAG on this node that died, if any: the control word says a
    process here saw a death, or an actor's pid is gone (marked as a wait would mark it)."""
    ctl = session.control
    if ctl is None:
        return None
    procs = session.procs
    if ctl.state == FAILED:
        i = ctl.words[C_WHO] - 1
        return procs[i] if 0 <= i < len(procs) else "?"
    for i in range(1, len(procs)):
        pid = ctl.pid(i)
        if pid and not shm.pid_alive(pid):
            ctl.fail(i)
            return procs[i]
    return None


def _gone_remote(session) -> str | None:
    """The process of an actor on another node, not read by the driver, that Ray's actor
    table says is dead, restarting, or running in another process than at the compile."""
    from dagc.runtime.driver.restart import actor_info

    here = session.layout.driver_node
    read = {c.writer for c in _read_over_tcp(session)}
    for i, (a, h) in enumerate(zip(session.ir.actors, session.handles), start=1):
        if a.node == here or a.id in read:
            continue
        info = actor_info(h)
        if info is not None and (info.state != "ALIVE" or info.pid != session.probes[a.id].pid):
            return session.procs[i]
    return None


def _read_over_tcp(session) -> list:
    """The DAG's channels the driver reads over TCP (from actors on other nodes)."""
    return [c for c in session.ir.channels if c.over_tcp and DRIVER in c.readers]


def _tcp_readers(session) -> list:
    """[(reader, writer's process name)] of the TCP channels the driver reads."""
    index = session.layout.index
    return [
        (session.readers[c.id], session.procs[index[c.writer]])
        for c in _read_over_tcp(session)
        if c.id in session.readers
    ]


def _ended(runs, tcp: list) -> str | None:
    """While nothing is in flight (so no message can be there), a TCP channel the driver
    reads that is ready has ended: its writer's name. Under the submit and read locks."""
    if runs._unsettled or runs._read_next < getattr(runs, "_sent", runs._submitted):
        return None
    for r, who in tcp:
        if r.ready():
            return who
    return None


WATCHER = Watcher()


def watch(runs) -> None:
    """Watch ``runs`` (a started DAG's Executions) for deaths while it is live."""
    WATCHER.watch(runs)


def poke() -> None:
    """A DAG closed: let the thread look now (and end if it was the last)."""
    WATCHER.wake.set()


__all__ = ["INTERVAL", "Watcher", "WATCHER", "watch", "poke", "look"]
