"""Where everything of one compiled DAG lives, and what each actor is told: plain data
computed from the lowered IR, the compile token and the probe results. No Ray, no I/O.

A :class:`Layout` names the DAG's processes (control index 0 is the driver), nodes, node
control segments and segment names; :func:`prepare_specs` and :func:`actor_plan` turn it
into what the prepare and start rounds send (``actor/plan.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dagc.ir import DRIVER
from dagc.runtime.actor.plan import (
    ActorPlan,
    CollectiveOp,
    CommIn,
    CommOut,
    Membership,
    PrepareSpec,
    RingIn,
    RingOut,
    TcpIn,
    TcpOut,
)
from dagc.runtime.channels import shm
from dagc.schedule import Kind


@dataclass(frozen=True)
class Layout:
    token: str
    prefix: str  # every segment name of the DAG starts with it
    driver_node: str
    procs: tuple  # process labels by control index (0 = driver)
    index: Mapping[str, int]  # actor id (and DRIVER) -> control index
    node_of: Mapping[str, str]  # actor id (and DRIVER) -> node
    nodes: tuple  # the driver's node first, then sorted
    cleaner: Mapping[str, str]  # node -> its first actor: sweeps and cleans the node
    channels: tuple  # the IR's ChannelSpecs
    actors: tuple  # the IR's ActorSpecs

    @classmethod
    def of(cls, ir, token: str, driver_node: str) -> Layout:
        node_of = {a.id: a.node for a in ir.actors}
        node_of[DRIVER] = driver_node
        index = {DRIVER: 0}
        index.update({a.id: i + 1 for i, a in enumerate(ir.actors)})
        return cls(
            token=token,
            prefix=shm.dag_prefix(token),
            driver_node=driver_node,
            procs=(DRIVER,) + tuple(a.label for a in ir.actors),
            index=index,
            node_of=node_of,
            nodes=(driver_node,) + tuple(sorted({a.node for a in ir.actors} - {driver_node})),
            cleaner={a.node: a.id for a in reversed(ir.actors)},
            channels=tuple(ir.channels),
            actors=tuple(ir.actors),
        )

    def ctl_name(self, node: str) -> str:
        """Each node's control segment (nodes may share a /dev/shm in a test cluster)."""
        return f"{self.prefix}ctl.{self.nodes.index(node)}"

    def node_names(self, node: str) -> tuple:
        """The names of the segments made on ``node`` (its control last): removed by the
        last of the node's processes to map its ends (``Control.mark_opened``)."""
        return tuple(
            self.prefix + c.id
            for c in self.channels
            if not c.over_tcp and self.node_of[c.writer] == node
        ) + (self.ctl_name(node),)

    def node_procs(self, node: str) -> int:
        """How many of the DAG's processes run on ``node`` (the driver included)."""
        return (node == self.driver_node) + sum(a.node == node for a in self.actors)

    def local_actors(self) -> tuple:
        """Control indices of the actors on the driver's node (their pids mean something here)."""
        return tuple(self.index[a.id] for a in self.actors if a.node == self.driver_node)

    def spans_nodes(self) -> bool:
        return any(a.node != self.driver_node for a in self.actors)


def prepare_specs(layout: Layout, secret: bytes, ips: Mapping[str, str], timeout: float) -> dict:
    """{actor id: PrepareSpec} for the prepare round: the first actor of each node other
    than the driver's creates that node's control and rings; every actor that writes a TCP
    channel starts listening. The driver's own TCP writers are not in it."""
    leaders: dict = {}
    specs: dict = {}
    for a in layout.actors:
        if a.node != layout.driver_node and a.node not in leaders:
            leaders[a.node] = a.id
            specs[a.id] = dict(
                ctl=layout.ctl_name(a.node),
                index=layout.index[a.id],
                nprocs=layout.node_procs(a.node),
                segments=tuple(
                    RingOut(layout.prefix + c.id, len(c.readers), c.slots, c.buffer_size)
                    for c in layout.channels
                    if not c.over_tcp and layout.node_of[c.writer] == a.node
                ),
            )
    for c in layout.channels:
        if c.over_tcp and c.writer != DRIVER:
            ridx = tuple(layout.index[r] for r in c.readers)
            spec = specs.setdefault(c.writer, {})
            spec["tcp"] = spec.get("tcp", ()) + (
                TcpOut(c.id, len(c.readers), c.slots, ridx, tuple(layout.procs[i] for i in ridx)),
            )
    return {
        aid: PrepareSpec(secret=secret, host=ips[aid], timeout=timeout, **kw)
        for aid, kw in specs.items()
    }


def actor_plan(
    layout: Layout,
    ir,
    actor,
    module,
    constants,
    communicators: Mapping,
    rendezvous: Mapping,
    addrs: Mapping,
    secret: bytes,
    wait: str,
) -> ActorPlan:
    """Everything ``actor`` (an ActorSpec) needs: its ends, groups and module.
    ``communicators``/``rendezvous``: per CommGroup id, the unconfigured instance and what
    its rank 0 prepared; ``addrs``: {channel id: (host, port)} of every TCP channel."""
    me = actor.id
    readers, writers, tcp_readers, comm_writers, comm_readers = {}, {}, {}, {}, {}
    groups = {g.id: g for g in ir.comm_groups}
    for c in ir.channels:
        seg = layout.prefix + c.id
        if c.writer == me and not c.over_tcp:
            writers[c.id] = RingOut(seg, len(c.readers), c.slots, c.buffer_size)
        if c.writer == me and c.transport == "comm":
            g = groups[c.communicator]
            comm_writers[c.id] = CommOut(
                c.communicator, {r: g.rank(r) for r in c.readers}, tuple(c.readers)
            )
        if me in c.readers and c.over_tcp:
            host, port = addrs[c.id]
            tcp_readers[c.id] = TcpIn(host, port, c.readers.index(me), layout.index[c.writer])
        elif me in c.readers:
            readers[c.id] = RingIn(seg, c.readers.index(me), layout.index[c.writer])
            if c.transport == "comm":
                comm_readers[c.id] = CommIn(c.communicator, groups[c.communicator].rank(c.writer))
    devices = read_devices(ir, me)
    member = {
        g.id: Membership(communicators[g.id], g.rank(me), len(g.members), rendezvous[g.id])
        for g in ir.comm_groups
        if me in g.members
    }
    collectives = {}
    steps = {e.action.group: e.step for e in ir.schedule.of(me) if e.action.kind is Kind.COLL}
    for gid, kid in ir.collectives:
        if gid in steps:
            op = next(o for o in ir.ops() if o.group == gid and o.actor == me)
            collectives[gid] = CollectiveOp(kid, op.method, steps[gid])
    return ActorPlan(
        token=layout.token,
        prefix=layout.prefix,
        index=layout.index[me],
        procs=layout.procs,
        actor=me,
        label=actor.label,
        filename=module.filename,
        source=module.source,
        constants=tuple(constants),
        wait=wait,
        ctl=layout.ctl_name(actor.node),
        readers=readers,
        writers=writers,
        tcp_readers=tcp_readers,
        groups=member,
        comm_writers=comm_writers,
        comm_readers=comm_readers,
        collectives=collectives,
        devices=devices,
        secret=secret,
        node_cleanup=actor.node != layout.driver_node and layout.cleaner[actor.node] == me,
        node_names=layout.node_names(actor.node),
        producers=producers(ir, actor),
    )


def producers(ir, actor) -> dict:
    """{channel id: (method, schedule step, where)} for every channel ``actor`` (an
    ActorSpec) writes: the op that made the value, named when the value cannot be sent."""
    made = {}
    for e in ir.schedule.of(actor.id):
        a = e.action
        if a.kind is Kind.CALL:
            made[a.value.op] = (a.method, e.step, actor.where(a.method))
        elif a.kind is Kind.COLL:
            made[a.value.op] = (ir.op(a.value.op).method, e.step, "")
    return {
        c.id: made[c.value.op] for c in ir.channels if c.writer == actor.id and c.value.op in made
    }


def read_devices(ir, reader: str) -> dict:
    """{channel id: "cpu" | "cuda"} for the channels ``reader`` reads whose value's op has a
    ``with_tensor_transport(device=...)`` hint (Op.device)."""
    out = {}
    for c in ir.channels:
        if reader in c.readers and c.value.op in ir.graph:
            dev = ir.op(c.value.op).device
            if dev:
                out[c.id] = dev
    return out
