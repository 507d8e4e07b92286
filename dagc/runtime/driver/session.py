"""A compiled DAG's resources in the driver: its token, control segment, channel ends and
actor handles; starting the loops (the rounds of actor calls) and stopping them.

Compiling takes three rounds of actor calls at most: the probe (``calls.probe_actors``,
before lowering), a prepare round only when other nodes or TCP channels are involved (each
other node's first actor creates that node's control and ring segments; TCP writers start
listening), and the start round (open the ends, form communicators, bind the module, start
the thread). A :class:`Session` knows nothing of executions (``executions.py``).
"""

from __future__ import annotations

import os
import secrets
import traceback

from dagc.ir import DRIVER
from dagc.runtime import channels as ch
from dagc.runtime import generated
from dagc.runtime.actor import function_host, lifecycle, prepared
from dagc.runtime.actor.plan import tcp_channel_name
from dagc.runtime.channels import shm, sweep
from dagc.runtime.driver import plans
from dagc.runtime.driver.calls import ray_get
from dagc.runtime.driver.runtime import DriverRuntime, arguments_not_picklable


class Session:
    """One compiled DAG's resources in the driver. ``start()`` runs the rounds and returns
    the driver module's (submit, collect); ``stop_actors``, ``close_ends``, ``release``
    undo it."""

    def __init__(self, ir, side, modules, options: dict, probes: dict, driver_node: str):
        self.ir = ir
        self.side = side
        self.modules = modules
        self.options = options
        self.probes = probes  # actor id -> lifecycle.Probe
        self.token = secrets.token_hex(12)
        self.layout = plans.Layout.of(ir, self.token, driver_node)
        self.prefix = self.layout.prefix
        self.procs = list(self.layout.procs)
        self.handles = [side.handles[a.id] for a in ir.actors]
        self.secret = b""
        self.control = None
        self.readers: dict = {}
        self.writers: dict = {}
        self.runtime: DriverRuntime | None = None

    def renewed(self, probes: dict) -> Session:
        """A fresh session of the same DAG (same IR, modules and options; a new token, so
        new segment and channel names) for actors whose probe results are ``probes``: the
        DAG's next run after Ray restarted one of its actors (``restart.py``)."""
        return Session(
            self.ir, self.side, self.modules, self.options, probes, self.layout.driver_node
        )

    # -- start ---------------------------------------------------------------------------------
    def start(self):
        """Make the segments, run the prepare and start rounds, bind the driver module.
        On failure everything made so far is stopped and released before raising."""
        here = self.layout.driver_node
        try:  # this node's segments of DAGs whose processes all died together
            sweep.sweep_stale()
        except OSError:
            pass
        self.control = ch.Control(
            self.layout.ctl_name(here),
            create=True,
            nprocs=self.layout.node_procs(here),
            index=0,
            pid=os.getpid(),
        )
        try:
            return self._launch()
        except BaseException as e:
            self.stop_actors(wait=True)
            self.close_ends((), 1.0)
            self.release()
            # let go of the ends now: the exception the caller may keep holds this object
            # and, in its traceback's frames, whatever they referenced (wake pipes, sockets)
            self.readers, self.writers = {}, {}
            traceback.clear_frames(e.__traceback__)
            raise

    def _launch(self):
        ir, opts, layout = self.ir, self.options, self.layout
        here = layout.driver_node
        for a in ir.actors:
            if a.node == here:  # a pid means something on its own node only
                self.control.set_pid(layout.index[a.id], self.probes[a.id].pid)
        waiter = ch.Waiter(self.control, self.procs, opts["wait"])
        local = layout.local_actors()
        for c in ir.channels:
            if not c.over_tcp and layout.node_of[c.writer] == here:
                ch.create_segment(
                    self.prefix + c.id, len(c.readers), c.slots, c.buffer_size
                ).close()
        addrs = self._prepare_nodes(waiter)
        for c in ir.channels:
            seg = self.prefix + c.id
            if c.writer == DRIVER and not c.over_tcp:
                self.writers[c.id] = ch.Writer(
                    seg, len(c.readers), c.slots, c.buffer_size, waiter, local, create=False
                )
            if DRIVER in c.readers:
                if c.over_tcp:
                    from dagc.runtime.channels import tcp

                    host, port = addrs[c.id]
                    self.readers[c.id] = tcp.TcpReader(
                        host,
                        port,
                        self.secret,
                        c.readers.index(DRIVER),
                        waiter,
                        layout.index[c.writer],
                        channel=tcp_channel_name(self.token, c.id),
                        connect_timeout=opts["start_timeout"],
                    )
                else:
                    r = self.readers[c.id] = ch.Reader(seg, c.readers.index(DRIVER), waiter, -1)
                    r.peers = local
        for w in self.writers.values():  # execute()'s arguments: see Executions.execute
            w.on_encode_error = arguments_not_picklable
        for cid, dev in plans.read_devices(ir, DRIVER).items():
            from dagc.runtime.comm.packing import OnDevice  # with_tensor_transport(device=)

            self.readers[cid] = OnDevice(self.readers[cid], dev)
        # the driver has mapped its ends: the last process here removes the names
        self.control.mark_opened(layout.node_names(here))
        comms, rdv = self._prepare_comms()
        constants = self.side.constants
        todo = [
            plans.actor_plan(
                layout,
                ir,
                a,
                self.modules[a.id],
                constants,
                comms,
                rdv,
                addrs,
                self.secret,
                opts["wait"],
            )
            for a in ir.actors
        ]
        refs = [h.__ray_call__.remote(lifecycle.start, p) for h, p in zip(self.handles, todo)]
        ray_get(refs, opts["start_timeout"], self.procs, what="start the loops")
        mod = self.modules[DRIVER]
        ns = generated.load(mod.source, mod.filename)
        self.runtime = DriverRuntime(
            self.readers, self.writers, ir.inputs, opts.get("_read_slice", 0.1), opts["get_timeout"]
        )
        return ns["bind"](self.runtime)

    def _prepare_nodes(self, waiter) -> dict:
        """Round 1: other nodes' leaders create their segments; TCP writers start listening.

        Returns {channel id: (host, port)} for every channel carried over TCP.
        """
        layout, timeout = self.layout, self.options["start_timeout"]
        tcp_chans = [c for c in self.ir.channels if c.over_tcp]
        if not tcp_chans and not layout.spans_nodes():
            return {}
        from dagc.runtime.channels import tcp

        self.secret = tcp.new_secret()
        addrs: dict = {}
        for c in tcp_chans:
            if c.writer == DRIVER:
                ridx = tuple(layout.index[r] for r in c.readers)
                tw = tcp.TcpWriter(
                    tcp_channel_name(self.token, c.id),
                    len(c.readers),
                    c.slots,
                    self.secret,
                    waiter,
                    ridx,
                    reader_names=[self.procs[i] for i in ridx],
                    connect_timeout=timeout,
                )
                addrs[c.id] = tw.listen(_driver_ip())
                self.writers[c.id] = tw
        ips = {a: p.ip for a, p in self.probes.items()}
        specs = plans.prepare_specs(layout, self.secret, ips, timeout)
        refs = [
            self.side.handles[aid].__ray_call__.remote(prepared.prepare, self.token, spec)
            for aid, spec in specs.items()
        ]
        for got in ray_get(refs, timeout, self.procs, what="prepare their nodes' channels"):
            addrs.update(got)
        return addrs

    def _prepare_comms(self) -> tuple[dict, dict]:
        """Rank 0 of every communicator group makes its rendezvous info. Returns
        ({group id: unconfigured communicator}, {group id: rendezvous})."""
        if not self.ir.comm_groups:
            return {}, {}
        from dagc.runtime.comm.backends import make_communicator

        comms, refs = {}, {}
        for g in self.ir.comm_groups:
            comm = self.side.communicators.get(g.backend)
            if comm is None:
                if g.backend == "custom-option":
                    comm = self.options["communicator"]
                else:
                    comm = make_communicator(g.backend)
            comms[g.id] = comm
            h = self.side.handles[g.members[0]]
            refs[g.id] = h.__ray_call__.remote(lifecycle.comm_prepare, comm)
        vals = ray_get(
            list(refs.values()),
            self.options["start_timeout"],
            self.procs,
            what="prepare communicators",
        )
        return comms, dict(zip(refs.keys(), vals))

    # -- stop ------------------------------------------------------------------------------------
    def stop_actors(self, wait: bool, ask: bool = True) -> None:
        """Close the DAG (the control word), wake the driver's waits, ask every loop to stop
        (with ``ask``, and only while Ray is connected: a Ray call after ``ray.shutdown()``
        would start a new Ray); with ``wait``, for at most ``teardown_timeout``."""
        if self.control is not None:
            try:
                self.control.close()
            except Exception:
                pass
        for r in self.readers.values():
            r.wake()
        for w in self.writers.values():
            w.wake_all()
        refs = []
        if not ask or not _ray_connected():
            return
        for h in self.handles:
            try:
                refs.append(h.__ray_call__.remote(lifecycle.stop, self.token, 2.0))
            except Exception:
                pass
        if wait and refs:
            import ray

            try:
                ray.wait(refs, num_returns=len(refs), timeout=self.options["teardown_timeout"])
            except Exception:
                pass

    def close_ends(self, locks, wait: float | None) -> bool:
        """Unmap the driver's channel ends once no execute() or get() uses them.

        Takes ``locks`` in order (the submit lock, then the read lock: the order execute()
        takes them), each for at most ``wait`` seconds, or only if free at once when ``wait``
        is None; then closes the ends and releases the control. Returns whether it did.
        """
        held = []
        try:
            for lock in locks:
                if not (
                    lock.acquire(blocking=False) if wait is None else lock.acquire(timeout=wait)
                ):
                    return False
                held.append(lock)
            for r in self.readers.values():
                r.close()
            for w in self.writers.values():
                w.close()
            if self.control is not None:
                self.control.release()
            return True
        finally:
            for lock in reversed(held):
                lock.release()

    def memory(self, timeout: float = 30.0) -> dict:
        """Shared memory held by this DAG's channels (``CompiledDag.memory``)."""
        import ray

        ends = [
            dict(e.stats(), pid=os.getpid(), process="driver")
            for e in list(self.writers.values()) + list(self.readers.values())
            if hasattr(e, "stats")
        ]
        refs = [h.__ray_call__.remote(lifecycle.memory, self.token) for h in self.handles]
        for actor, got in zip(self.ir.actors, ray.get(refs, timeout=timeout)):
            ends += [dict(e, process=actor.label) for e in got]
        return summarize_memory(ends)

    def release(self) -> None:
        """Remove whatever is left of the DAG's segments on this node, and kill the actors
        the DAG owns (created for its function nodes; ``actor/function_host.py``)."""
        try:
            shm.unlink_prefix(self.prefix)
        finally:
            function_host.release(self.side)

    # -- why a loop stopped ----------------------------------------------------------------------
    def crash_report(self, who: str) -> str | None:
        """If ``who``'s process is alive, its loop crashed: fetch the traceback."""
        import ray

        i = self.procs.index(who) if who in self.procs else -1
        if i <= 0:
            return None
        actor = self.ir.actors[i - 1]
        if actor.node == self.layout.driver_node and not shm.pid_alive(self.probes[actor.id].pid):
            return None
        try:
            st = ray.get(
                self.handles[i - 1].__ray_call__.remote(lifecycle.status, self.token), timeout=2.0
            )
            return st.get("crash")
        except Exception:
            return None

    def why_stopped(self, who: str) -> str:
        """What ended the DAG when ``who`` stopped: its death, its loop's crash, or - when
        that crash came from a peer dying under it (a communicator op whose other end
        closed) - the peer's death."""
        crash = self.crash_report(who)
        if not crash:
            return f"{who} died (its process is gone)"
        here = self.layout.driver_node
        gone = [
            a.label
            for a in self.ir.actors
            if a.node == here and a.label != who and not shm.pid_alive(self.probes[a.id].pid)
        ]
        if gone:
            last = crash.strip().splitlines()[-1]
            return (
                f"{gone[0]} died (its process is gone); {who}'s dagc loop stopped after it: {last}"
            )
        return f"{who} (its dagc loop crashed: {crash.strip()})"


def summarize_memory(ends: list) -> dict:
    """``cg.memory()``: per channel, what its writer reserved in /dev/shm (ring and big-value
    segments) and what each reader maps; ``shm_bytes`` is the DAG's total. A big-value
    segment the writer has let go but a reader's held views still use counts at that
    reader (``reader_big_bytes``)."""
    channels: dict = {}
    for e in ends:
        c = channels.setdefault(e["channel"], {"readers": []})
        if e["role"] == "writer":
            c.update({k: v for k, v in e.items() if k not in ("role", "channel")})
        else:
            c["readers"].append({k: v for k, v in e.items() if k not in ("role", "channel")})
    total = big = 0
    for c in channels.values():
        total += c.get("shm_bytes", 0)
        big += c.get("big_bytes", 0)
        # reader mappings of big segments beyond the writer's own (views still held)
        extra = max((r.get("big_bytes", 0) for r in c["readers"]), default=0)
        extra = max(0, extra - c.get("big_bytes", 0))
        c["reader_big_bytes"] = extra
        total += extra
        big += extra
    return {"shm_bytes": total, "big_bytes": big, "channels": channels}


def _ray_connected() -> bool:
    import ray

    return ray.is_initialized()


def _driver_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
