"""Starting a compiled DAG's loops: segments, the prepare round, plans, the start round.

Compiling takes three rounds of actor calls at most: the probe (in api.py), a prepare round
only when other nodes or TCP channels are involved, and the start round.
"""
from __future__ import annotations

import linecache
import os
import traceback

from dagc.errors import ExecuteArgumentError
from dagc.ir import DRIVER
from dagc.runtime import channels as ch
from dagc.runtime.channels import shm, sweep
from dagc.runtime.actor import loop as worker
from dagc.runtime.driver.calls import ray_get
from dagc.runtime.failure import Failure


class _DriverRuntime:
    """The ``rt`` object the generated driver module binds against."""

    Failure = Failure

    def __init__(self, readers, writers, ir):
        self._readers = readers
        self._writers = writers
        self._inputs = ir.inputs

    def reader(self, cid):
        return self._readers[cid]

    def writer(self, cid):
        return self._writers[cid]

    def bad_input(self, args, kwargs):
        spec = self._inputs
        want = f"{spec.num_positional} positional argument(s)"
        if spec.kwargs:
            want += " and keyword argument(s) " + ", ".join(spec.kwargs)
        raise ExecuteArgumentError(
            f"execute() takes {want} (as the DAG uses its InputNode), got "
            f"{len(args)} positional and keyword(s) {sorted(kwargs) or 'none'}.")


class LaunchMixin:
    """CompiledDag's start-up side; it fills the driver's ends and ``_submit``/``_collect``."""

    def _ctl_name(self, node: str) -> str:
        """Each node's control segment (nodes may share a /dev/shm in a test cluster)."""
        return f"{self._prefix}ctl.{self._nodes.index(node)}"

    def _node_names(self, node: str) -> tuple:
        """The names of the segments made on ``node`` (its control last): removed by the
        last of the node's processes to map its ends (``Control.mark_opened``)."""
        return tuple(self._prefix + c.id for c in self._ir.channels
                     if not c.over_tcp and self._node_of[c.writer] == node) + (
            self._ctl_name(node),)

    def _node_procs(self, node: str) -> int:
        """How many of the DAG's processes run on ``node`` (the driver included)."""
        return (node == self._driver_node) + sum(a.node == node for a in self._ir.actors)

    def _start(self) -> None:
        ir = self._ir
        here = self._driver_node
        node_of = {a.id: a.node for a in ir.actors}
        node_of[DRIVER] = here
        self._node_of = node_of
        # the first actor on each node sweeps and cleans its segments (the driver its own)
        self._cleaner = {a.node: a.id for a in reversed(ir.actors)}
        self._nodes = [here] + sorted({a.node for a in ir.actors} - {here})
        try:   # this node's segments of DAGs whose processes all died together
            sweep.sweep_stale()
        except OSError:
            pass
        self._control = ch.Control(self._ctl_name(here), create=True,
                                   nprocs=self._node_procs(here), index=0, pid=os.getpid())
        try:
            self._launch()
        except BaseException as e:
            self._closed = True
            self._stop_actors(wait=True)
            self._release()
            # let go of the ends now: the exception the caller may keep holds this object
            # and, in its traceback's frames, whatever they referenced (wake pipes, sockets)
            self._readers, self._writers = {}, {}
            traceback.clear_frames(e.__traceback__)
            raise

    def _launch(self) -> None:
        ir, opts, here, node_of = self._ir, self._options, self._driver_node, self._node_of
        for a, probe in zip(ir.actors, self._probes):
            if a.node == here:     # a pid means something on its own node only
                self._control.set_pid(self._index[a.id], probe["pid"])
        waiter = ch.Waiter(self._control, self._procs, opts["wait"])
        local = tuple(self._index[a.id] for a in ir.actors if a.node == here)
        for c in ir.channels:
            if not c.over_tcp and node_of[c.writer] == here:
                ch.create_segment(self._prefix + c.id, len(c.readers), c.slots,
                                  c.buffer_size).close()
        addrs = self._prepare_nodes(waiter)
        for c in ir.channels:
            seg = self._prefix + c.id
            if c.writer == DRIVER and not c.over_tcp:
                self._writers[c.id] = ch.Writer(seg, len(c.readers), c.slots,
                                                c.buffer_size, waiter, local, create=False)
            if DRIVER in c.readers:
                if c.over_tcp:
                    from dagc.runtime.channels import tcp
                    host, port = addrs[c.id]
                    self._readers[c.id] = tcp.TcpReader(
                        host, port, self._secret, c.readers.index(DRIVER), waiter,
                        self._index[c.writer], channel=worker.tcp_channel_name(
                            self._token, c.id), connect_timeout=opts["start_timeout"])
                else:
                    r = self._readers[c.id] = ch.Reader(seg, c.readers.index(DRIVER),
                                                        waiter, -1)
                    r.peers = local
        for w in self._writers.values():     # execute()'s arguments: see execute()
            w.on_encode_error = arguments_not_picklable
        # the driver has mapped its ends: the last process here removes the names
        self._control.mark_opened(self._node_names(here))
        rdv = self._prepare_comms()
        plans = [self._plan(a, rdv, addrs) for a in ir.actors]
        refs = [h.__ray_call__.remote(worker.start, p) for h, p in zip(self._handles, plans)]
        ray_get(refs, self._options["start_timeout"], self._procs, what="start the loops")
        ns_drv = {}
        mod = self._modules[DRIVER]
        exec(compile(mod.source, mod.filename, "exec"), ns_drv)
        linecache.cache[mod.filename] = (len(mod.source), None,
                                         mod.source.splitlines(True), mod.filename)
        self._submit, self._collect = ns_drv["bind"](_DriverRuntime(self._readers,
                                                                    self._writers, ir))

    def _prepare_nodes(self, waiter) -> dict:
        """Round 1: other nodes' leaders create their segments; TCP writers start listening.

        Returns {channel id: (host, port)} for every channel carried over TCP.
        """
        ir, here = self._ir, self._driver_node
        node_of = self._node_of
        tcp_chans = [c for c in ir.channels if c.over_tcp]
        if not tcp_chans and all(a.node == here for a in ir.actors):
            return {}
        from dagc.runtime.channels import tcp
        self._secret = tcp.new_secret()
        specs: dict[str, dict] = {}
        leaders = {}
        for a in ir.actors:
            if a.node != here and a.node not in leaders:
                leaders[a.node] = a.id
                specs[a.id] = {"ctl": self._ctl_name(a.node), "index": self._index[a.id],
                               "nprocs": self._node_procs(a.node), "segments": [
                    (self._prefix + c.id, len(c.readers), c.slots, c.buffer_size)
                    for c in ir.channels
                    if not c.over_tcp and node_of[c.writer] == a.node]}
        ip = {a.id: p["ip"] for a, p in zip(ir.actors, self._probes)}
        addrs: dict = {}
        for c in tcp_chans:
            ridx = tuple(self._index[r] for r in c.readers)
            names = tuple(self._procs[i] for i in ridx)
            if c.writer == DRIVER:
                tw = tcp.TcpWriter(worker.tcp_channel_name(self._token, c.id), len(c.readers),
                                   c.slots, self._secret, waiter, ridx, reader_names=list(names),
                                   connect_timeout=self._options["start_timeout"])
                addrs[c.id] = tw.listen(_driver_ip())
                self._writers[c.id] = tw
            else:
                specs.setdefault(c.writer, {}).setdefault("tcp", []).append(
                    (c.id, len(c.readers), c.slots, ridx, names))
        refs = []
        for aid, spec in specs.items():
            spec.update(secret=self._secret, host=ip[aid],
                        timeout=self._options["start_timeout"])
            refs.append(self._side.handles[aid].__ray_call__.remote(worker.prepare,
                                                                    self._token, spec))
        for got in ray_get(refs, self._options["start_timeout"], self._procs,
                           what="prepare their nodes' channels"):
            addrs.update(got)
        return addrs

    def _prepare_comms(self) -> dict:
        """Rank 0 of every communicator group makes its rendezvous info."""
        if not self._ir.comm_groups:
            return {}
        from dagc.runtime.comm.backends import make_communicator
        self._comm_objs = {}
        refs = {}
        for g in self._ir.comm_groups:
            comm = self._side.communicators.get(g.backend)
            if comm is None:
                if g.backend == "custom-option":
                    comm = self._options["communicator"]
                else:
                    comm = make_communicator(g.backend)
            self._comm_objs[g.id] = comm
            h = self._side.handles[g.members[0]]
            refs[g.id] = h.__ray_call__.remote(worker.comm_prepare, comm)
        vals = ray_get(list(refs.values()), self._options["start_timeout"], self._procs,
                        what="prepare communicators")
        return dict(zip(refs.keys(), vals))

    def _plan(self, actor, rdv, addrs) -> worker.ActorPlan:
        ir = self._ir
        readers, writers, comm_channels, tcp_readers = {}, {}, {}, {}
        groups = {g.id: g for g in ir.comm_groups}
        for c in ir.channels:
            seg = self._prefix + c.id
            over_tcp = c.over_tcp
            if c.writer == actor.id and not over_tcp:
                writers[c.id] = (seg, len(c.readers), c.slots, c.buffer_size,
                                 tuple(self._index[r] for r in c.readers))
            if c.writer == actor.id and c.transport == "comm":
                if c.transport == "comm":
                    g = groups[c.communicator]
                    comm_channels[c.id] = ("w", c.communicator,
                                           {r: g.rank(r) for r in c.readers}, c.readers)
            if actor.id in c.readers and over_tcp:
                host, port = addrs[c.id]
                tcp_readers[c.id] = (host, port, c.readers.index(actor.id),
                                     self._index[c.writer])
            elif actor.id in c.readers:
                readers[c.id] = (seg, c.readers.index(actor.id), self._index[c.writer])
                if c.transport == "comm":
                    g = groups[c.communicator]
                    comm_channels[c.id] = ("r", c.communicator, g.rank(c.writer))
        comm_groups = {}
        for g in ir.comm_groups:
            if actor.id in g.members:
                comm_groups[g.id] = (self._comm_objs[g.id], g.rank(actor.id), len(g.members),
                                     rdv[g.id])
        collectives = {}
        steps = {a.group: a.step for a in ir.schedule.of(actor.id) if a.kind == "coll"}
        for gid, kid in ir.collectives:
            if gid in steps:
                op = next(o for o in ir.ops() if o.group == gid and o.actor == actor.id)
                collectives[gid] = (kid, op.method, steps[gid])
        mod = self._modules[actor.id]
        return worker.ActorPlan(
            token=self._token, prefix=self._prefix, index=self._index[actor.id],
            procs=self._procs, actor=actor.id, label=actor.label, filename=mod.filename,
            source=mod.source,
            constants=self._side.constants, readers=readers, writers=writers,
            wait=self._options["wait"], comm_groups=comm_groups, comm_channels=comm_channels,
            collectives=collectives, ctl=self._ctl_name(actor.node),
            tcp_readers=tcp_readers, secret=self._secret,
            node_cleanup=actor.node != self._driver_node
            and self._cleaner[actor.node] == actor.id,
            node_names=self._node_names(actor.node))


class ArgumentsNotSent(TypeError):
    """``execute()``'s arguments could not be pickled (raised by the driver's writers)."""


def arguments_not_picklable(exc: Exception, value):
    """The driver's writers' ``on_encode_error``: encoding the user's arguments failed.
    Only this becomes execute()'s "could not send its arguments" error; anything else
    raised while submitting is dagc's own bug and propagates as it is."""
    raise ArgumentsNotSent(f"execute() could not send its arguments to the actors: "
                           f"{type(exc).__name__}: {exc}. Pass picklable values.") from exc


def _driver_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()
