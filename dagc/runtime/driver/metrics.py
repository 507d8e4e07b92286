"""Each live DAG's metrics, exported through Ray's metrics API (docs/metrics.md).

The hot path keeps counters only: ``Executions`` counts submitted, fetched and failed
executions (it did so before metrics existed, bar the failures), and one execution in
``STRIDE`` notes its submit and read times in a :class:`Stamps` ring (a mask test per
``execute()`` and per result read; the clock is read for the timed ones only). Everything
else happens on one daemon thread per driver process, the sampler, which wakes every
``DAGC_METRICS_INTERVAL`` seconds, turns the counters into Ray metrics, and asks each actor
(one ``__ray_call__`` per actor and wake) for its loop thread's CPU time and its channel
ends' shared memory. It starts with the first DAG compiled while metrics are on and ends
once no DAG is live.

Ray prefixes ``ray_`` to every name at its Prometheus endpoint and appends ``_total`` to
counters: ``dagc_executions`` is scraped as ``ray_dagc_executions_total``.

Labels: ``dag``, the DAG's slot in this driver process ("0", "1", ...: the lowest free one
at compile, reused once a DAG is closed, so a process that compiles many DAGs in turn does
not grow Prometheus' series), and ``actor`` (the schedule's label, "a1:Stage") on
per-actor metrics. Ray adds its own (``WorkerId`` names the driver process).
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref

from dagc import config
from dagc.runtime.driver.wake import Wake

# one execution in STRIDE is timed (a power of two: executions.py tests i & (STRIDE - 1))
STRIDE = 16
_RING = 64  # timed executions kept between two samples (the latest win)
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_ns = time.monotonic_ns

# seconds; Ray needs the boundaries up front. 10 us (shared-memory hand-off) to 60 s.
LATENCY_BOUNDARIES = [
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
]

# name -> (kind, description, tag keys); docs/metrics.md documents the same names
METRICS = {
    "dagc_executions": (
        "counter",
        "executions submitted (execute() calls that returned a DagRef)",
        ("dag",),
    ),
    "dagc_failures": (
        "counter",
        "executions whose result was an error (a TaskError raised by get())",
        ("dag",),
    ),
    "dagc_executions_in_flight": ("gauge", "executions submitted and not yet fetched", ("dag",)),
    "dagc_execution_latency_seconds": (
        "histogram",
        f"time from execute() to the driver reading the result, one execution in {STRIDE}",
        ("dag",),
    ),
    "dagc_actor_busy_fraction": (
        "gauge",
        "CPU time of the actor's dagc loop thread per second of the sampling interval (0..1)",
        ("dag", "actor"),
    ),
    "dagc_shm_bytes": (
        "gauge",
        "shared memory (/dev/shm) the DAG's channels hold (cg.memory()['shm_bytes'])",
        ("dag",),
    ),
}


class Stamps:
    """Submit and read times of the timed executions (index % STRIDE == 0), in rings the
    sampler reads: written under the DAG's submit / read lock, read without a lock (a
    torn pair loses one sample, nothing else)."""

    __slots__ = ("t0", "lat", "done", "failed")

    def __init__(self):
        self.t0 = [0] * _RING
        self.lat = [0] * _RING
        self.done = 0  # latencies written so far
        self.failed = 0  # executions answered by an error (DagRef._settle)

    def begin(self, i: int) -> None:
        self.t0[(i // STRIDE) % _RING] = _ns()

    def end(self, i: int) -> None:
        t0 = self.t0[(i // STRIDE) % _RING]
        if t0:
            d = self.done
            self.lat[d % _RING] = _ns() - t0
            self.done = d + 1


@functools.cache
def enabled() -> bool:
    """Whether DAGs compiled in this process export metrics: ``DAGC_METRICS`` "1" or "0",
    or by default ("auto") when Ray's metrics agent can run here (``ray[default]``'s
    packages import; without them Ray would drop the values anyway). Decided once."""
    mode = config.METRICS
    if mode in ("0", "1"):
        return mode == "1"
    try:
        from ray._private.utils import get_dashboard_dependency_error

        return get_dashboard_dependency_error() is None
    except Exception:
        return False


class _Dag:
    """What the sampler remembers of one DAG between wakes."""

    def __init__(self, slot: int):
        self.slot = slot
        self.tags = {"dag": str(slot)}
        self.submitted = self.failed = self.done = 0
        self.cpu: dict = {}  # actor label -> (loop cpu ns, monotonic ns)
        self.actors: set = set()
        self.retired = False  # closed: its gauges are (being) zeroed, its slot free


class Sampler:
    """The process's sampler thread and its table of live DAGs."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.dags: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.closed: list[_Dag] = []  # dropped or torn down: zero their gauges
        self.wake = Wake()  # gone() runs from garbage collection: it only wakes the thread
        self.thread: threading.Thread | None = None
        self.metrics: dict | None = None
        self.interval = config.METRICS_INTERVAL

    def watch(self, runs) -> None:
        with self.lock:
            used = {d.slot for d in self.dags.values()}
            slot = next(i for i in range(len(used) + 1) if i not in used)
            d = self.dags[runs] = _Dag(slot)
            weakref.finalize(runs, self.gone, d)  # dropped without teardown
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._main, name="dagc-metrics", daemon=True)
                self.thread.start()

    def gone(self, d: _Dag) -> None:
        """A DAG was dropped (garbage collection, any thread): zero its gauges, and let the
        thread end now if it was the last (an idle one would linger up to an interval)."""
        self.wake.set(d)  # no lock here: see wake.py

    def _main(self) -> None:
        while True:
            dropped = self.wake.wait(self.interval)
            if dropped:
                with self.lock:
                    for d in dropped:
                        if not d.retired:  # a torn-down DAG's gauges were zeroed at close
                            d.retired = True
                            self.closed.append(d)
            try:
                self.sample()
            except Exception:  # Ray shut down under us, a metric refused: next wake
                pass
            with self.lock:
                if not self.dags and not self.closed and self.wake.empty():
                    self.thread = None
                    return

    def sample(self) -> None:
        """One wake: every live DAG's metrics, then the closed ones' gauges set to 0."""
        import ray

        if not ray.is_initialized():  # no Ray call now (one would start a new Ray)
            with self.lock:
                self.closed.clear()
            return
        m = self.metrics
        if m is None:
            m = self.metrics = _make_metrics()
        with self.lock:
            live = [(r, d) for r, d in self.dags.items() if not (r.closed or r.dead)]
            for r, d in list(self.dags.items()):
                if r.closed or r.dead:
                    del self.dags[r]
                    d.retired = True
                    self.closed.append(d)
            closed, self.closed = self.closed, []
        for d in closed:  # first: a live DAG may hold a closed one's slot now
            m["dagc_executions_in_flight"].set(0, tags=d.tags)
            m["dagc_shm_bytes"].set(0, tags=d.tags)
            for a in d.actors:
                m["dagc_actor_busy_fraction"].set(0, tags=dict(d.tags, actor=a))
        for runs, d in live:
            self._sample_dag(m, runs, d)

    def _sample_dag(self, m: dict, runs, d: _Dag) -> None:
        tags = d.tags
        st = getattr(runs, "_stamps", None)  # None: still being made
        if st is None:
            return
        sub, failed = runs._submitted, st.failed
        if sub > d.submitted:
            m["dagc_executions"].inc(sub - d.submitted, tags=tags)
        if failed > d.failed:
            m["dagc_failures"].inc(failed - d.failed, tags=tags)
        d.submitted, d.failed = sub, failed
        m["dagc_executions_in_flight"].set(max(0, sub - runs._fetched), tags=tags)
        done = st.done
        for k in range(max(d.done, done - _RING), done):
            m["dagc_execution_latency_seconds"].observe(st.lat[k % _RING] / 1e9, tags=tags)
        d.done = done
        self._sample_actors(m, runs._session, d)

    def _sample_actors(self, m: dict, session, d: _Dag) -> None:
        """Each actor's loop CPU time and channel memory: one Ray call each, answers
        waited for a bounded time (a busy or dead actor is skipped this wake)."""
        import ray

        from dagc.runtime.driver.session import summarize_memory

        ends = []
        for e in list(session.writers.values()) + list(session.readers.values()):
            if hasattr(e, "stats"):
                try:
                    ends.append(dict(e.stats(), process="driver"))
                except Exception:  # closed under us: the DAG is going
                    return
        actors = session.ir.actors
        refs = [h.__ray_call__.remote(actor_sample, session.token) for h in session.handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(2.0, self.interval))
        answered = set(ready)
        for a, ref in zip(actors, refs):
            if ref not in answered:
                continue
            try:
                got = ray.get(ref, timeout=0)
            except Exception:
                continue
            if got is None:
                continue
            cpu, now, memory = got
            ends += [dict(e, process=a.label) for e in memory]
            last = d.cpu.get(a.label)
            d.cpu[a.label] = (cpu, now)
            if last is not None and now > last[1]:
                busy = min(1.0, max(0.0, (cpu - last[0]) / (now - last[1])))
                d.actors.add(a.label)
                m["dagc_actor_busy_fraction"].set(busy, tags=dict(d.tags, actor=a.label))
        m["dagc_shm_bytes"].set(summarize_memory(ends)["shm_bytes"], tags=d.tags)


def actor_sample(instance, token: str):
    """Run in an actor (``__ray_call__``): (its loop thread's CPU ns, monotonic ns, its
    channel ends' memory records), or None when it runs no loop of ``token``."""
    from dagc.runtime.actor import lifecycle
    from dagc.runtime.actor.loop import LOOPS

    loop = LOOPS.get(token)
    t = loop.thread if loop is not None else None
    if t is None or t.native_id is None:
        return None
    return thread_cpu_ns(t.native_id), _ns(), lifecycle.memory(instance, token)


def thread_cpu_ns(tid: int) -> int:
    """CPU time of thread ``tid`` of this process, from /proc (a thread that ended: 0)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0


def _make_metrics() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    out: dict = {}
    for name, (kind, desc, keys) in METRICS.items():
        if kind == "counter":
            out[name] = Counter(name, desc, tag_keys=keys)
        elif kind == "gauge":
            out[name] = Gauge(name, desc, tag_keys=keys)
        else:
            out[name] = Histogram(name, desc, boundaries=LATENCY_BOUNDARIES, tag_keys=keys)
    return out


SAMPLER = Sampler()


def watch(runs) -> Stamps:
    """The :class:`Stamps` of ``runs`` (an ``Executions`` being made); its metrics are
    exported while it is live if metrics are on (:func:`enabled`)."""
    if enabled():
        SAMPLER.watch(runs)
    return Stamps()


__all__ = [
    "METRICS",
    "STRIDE",
    "Stamps",
    "Sampler",
    "SAMPLER",
    "watch",
    "enabled",
    "actor_sample",
    "thread_cpu_ns",
]
