"""The dagc IR: a networkx DiGraph of plain-data ops plus the tables the passes fill in.

Nothing here holds a live Ray object. Actors are named by stable ids ("a0", "a1", ...) in
order of first appearance; values by op ids ("t0", "t1", ...), arguments by typed
:class:`~dagc.ir.values.Arg`s (see :mod:`dagc.ir.values`). Live handles and constants are
kept by the frontend in a :class:`SideTable` that travels beside the IR.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from dagc.ir import verify
from dagc.ir.values import Arg, Ref, op_sort_key


@dataclass(frozen=True)
class Op:
    """One node of the IR graph."""

    id: str  # "t3"
    kind: str  # CALL | COLLECTIVE
    actor: str  # "a1"
    method: str  # "fwd", "allreduce.sum", "allgather"
    args: tuple[Arg, ...] = ()
    kwargs: tuple[tuple[str, Arg], ...] = ()
    num_returns: int = 1
    transport: str | None = None  # None (shm), "nccl", "auto", "gloo", "custom"
    device: str = ""  # with_tensor_transport(device=): "" (default,
    # where the transport puts tensors), "cpu",
    # "cuda": where readers receive them
    group: str | None = None  # collective group id "g0"
    where: str = ""  # the user's file:line where the node was bound
    bind_index: int | None = None  # position in its actor's bind order (0 first;
    # equal for ties); None: unconstrained

    def refs(self) -> list[Arg]:
        return [a for a in (*self.args, *(v for _, v in self.kwargs))]

    def __str__(self) -> str:
        parts = [str(a) for a in self.args] + [f"{k}={v}" for k, v in self.kwargs]
        s = f"{self.id} = {self.actor}.{self.method}({', '.join(parts)})"
        if self.num_returns != 1:
            s += f" -> {self.num_returns}"
        if self.transport:
            s += f" [{self.transport}]"
        if self.device:
            s += f" [device={self.device}]"
        if self.group:
            s += f" [{self.group}]"
        return s


@dataclass(frozen=True)
class ActorSpec:
    id: str  # "a0"
    cls: str  # the actor class name, for people
    node: str = ""  # Ray node id, filled by place
    gpu_ids: tuple = ()  # filled by place
    name: str = ""  # "a0" or the Ray actor name when it has one
    # filled by place: (method, where the user wrote it) pairs, sorted by method, e.g.
    # ("embed", "pipeline.py:23 Embedder.embed"); plain data, for comments and errors
    methods: tuple[tuple[str, str], ...] = ()
    # filled by place: the methods marked @dagc.reorderable, sorted (what reorder=
    # "critical-path" may run out of bind order; passes/schedule_ops.py)
    reorderable: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.id}:{self.cls}"

    def where(self, method: str) -> str:
        """Where the user wrote ``method`` ("pipeline.py:23 Embedder.embed"), or ""."""
        for name, where in self.methods:
            if name == method:
                return where
        return ""


@dataclass(frozen=True)
class InputSpec:
    """How ``execute(*args, **kwargs)`` maps to input fields $0, $1, ...

    ``fields`` lists, per field, either an int (positional index) or a str (keyword).
    ``direct`` is True when the InputNode itself is used: then there is one field, args[0].
    """

    fields: tuple = ()
    num_positional: int = 0
    kwargs: tuple = ()
    direct: bool = False


@dataclass(frozen=True)
class OutputSpec:
    refs: tuple[Arg, ...] = ()  # Refs (validate refuses a raw input Field)
    multi: bool = False


_CHANNEL = re.compile(
    r"(\w+): (\S+) (\S+) -> (\S+) \[(\w+)(?: via (\w+))?"
    r"(?: \(metadata over (\w+)\))?, (\d+) x (\d+) B\]"
)


@dataclass(frozen=True)
class ChannelSpec:
    """One edge carrier between processes. Plain data, printed in the schedule."""

    id: str  # "c0"
    value: Ref  # the value it carries: t3, t3.1, or INPUT ("in")
    writer: str  # actor id or DRIVER
    readers: tuple[str, ...]  # actor ids and/or DRIVER, sorted
    transport: str = "shm"  # "shm" | "tcp" | "comm" (tensor metadata + communicator)
    buffer_size: int = 1 << 20
    slots: int = 8
    communicator: str = ""  # for transport "comm": the CommGroup id ("k0")
    carrier: str = "shm"  # for transport "comm": what carries the metadata

    @property
    def over_tcp(self) -> bool:
        """Whether this channel's bytes cross nodes (a TCP channel, or comm metadata)."""
        return self.transport == "tcp" or self.carrier == "tcp"

    def __str__(self) -> str:
        comm = f" via {self.communicator}" if self.communicator else ""
        if self.carrier != "shm":
            comm += f" (metadata over {self.carrier})"
        return (
            f"{self.id}: {self.value} {self.writer} -> {','.join(self.readers)} "
            f"[{self.transport}{comm}, {self.slots} x {self.buffer_size} B]"
        )

    @classmethod
    def parse(cls, text: str) -> ChannelSpec:
        """Inverse of ``str()``."""
        m = _CHANNEL.fullmatch(text)
        if m is None:
            raise ValueError(
                f"bad channel {text!r}: expected 'c0: t3 a0 -> a1,a2 [shm, 8 x 1048576 B]'"
            )
        cid, value, writer, readers, transport, comm, carrier, slots, size = m.groups()
        return cls(
            cid,
            Ref.parse(value),
            writer,
            tuple(readers.split(",")),
            transport,
            int(size),
            int(slots),
            comm or "",
            carrier or "shm",
        )


@dataclass(frozen=True)
class CommGroup:
    """A communicator the DAG needs: a backend over a fixed, ordered set of actors
    (rank = index)."""

    id: str  # "k0"
    backend: str  # "gloo" | "nccl" | "customN"
    members: tuple[str, ...]  # actor ids; rank = position

    def rank(self, actor: str) -> int:
        return self.members.index(actor)

    def __str__(self) -> str:
        return f"{self.id}: {self.backend} over {','.join(self.members)}"


@dataclass(frozen=True)
class IR:
    """The compiler's state between passes. Passes return new IRs; nothing mutates one."""

    graph: nx.DiGraph
    actors: tuple[ActorSpec, ...]
    inputs: InputSpec
    output: OutputSpec
    channels: tuple[ChannelSpec, ...] = ()
    comm_groups: tuple[CommGroup, ...] = ()
    collectives: tuple = ()  # (group id "g0", CommGroup id) pairs, set by lower-comm
    schedule: Any = None  # dagc.schedule.Schedule once the schedule pass ran
    passes: tuple[str, ...] = ()  # names of the passes run so far
    options: tuple = ()  # compile options that change the output (sorted pairs)

    # -- helpers -------------------------------------------------------------------------
    def op(self, op_id: str) -> Op:
        return self.graph.nodes[op_id]["op"]

    def ops(self) -> list[Op]:
        return [self.graph.nodes[n]["op"] for n in self.graph.nodes]

    def actor(self, actor_id: str) -> ActorSpec:
        return self._actors_by_id[actor_id]

    @functools.cached_property
    def _actors_by_id(self) -> dict[str, ActorSpec]:
        return {a.id: a for a in self.actors}

    def replace(self, **changes) -> IR:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        lines = ["actors: " + ", ".join(a.label for a in self.actors)]
        lines.append(f"inputs: fields={list(self.inputs.fields)} direct={self.inputs.direct}")
        shown = bind_reordered((o.actor, o.id, o.bind_index) for o in self.ops())
        for n in nx.lexicographical_topological_sort(self.graph, key=op_sort_key):
            op = self.op(n)
            lines.append("  " + str(op) + (f" [bind {op.bind_index}]" if op.actor in shown else ""))
        lines.append(
            "output: "
            + ("[" if self.output.multi else "")
            + ", ".join(map(str, self.output.refs))
            + ("]" if self.output.multi else "")
        )
        for c in self.channels:
            lines.append("  " + str(c))
        for g in self.comm_groups:
            lines.append("  " + str(g))
        return "\n".join(lines)

    def verify(self) -> None:
        """Check the IR's invariants (see :mod:`dagc.ir.verify`): the graph, channels,
        communicator groups and, once scheduled, the schedule against them. The error
        shows the printed IR, and the schedule table with the problems marked."""
        problems, marks = verify.problems(self)
        if problems:
            text = (
                "IR verification failed:\n  " + "\n  ".join(problems) + "\n--- IR ---\n" + str(self)
            )
            if self.schedule is not None:
                text += "\n--- schedule ---\n" + self.schedule.table(marks)
            raise AssertionError(text)

    def fingerprint(self) -> str:
        """A stable hash of everything that decides the generated code (computed once)."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(self).encode())
        h.update(json.dumps([dataclasses.astuple(a)[:2] for a in self.actors]).encode())
        if any(a.methods for a in self.actors):  # they name the user's code in comments
            h.update(json.dumps([a.methods for a in self.actors]).encode())
        h.update(repr(self.options).encode())
        return h.hexdigest()[:12]


def bind_reordered(ops) -> set[str]:
    """Actors whose bind order is not the order of their op ids.

    ``ops`` yields (actor, op id, bind index or None). Only for those actors do the IR and
    the schedule table print bind positions: elsewhere op ids already show the order.
    """
    binds: dict[str, list] = {}
    for actor, op_id, bind in ops:
        if bind is not None and bind >= 0:
            binds.setdefault(actor, []).append((op_sort_key(op_id), bind))
    out = set()
    for actor, pairs in binds.items():
        seq = [b for _, b in sorted(pairs)]
        if any(x >= y for x, y in zip(seq, seq[1:])):
            out.add(actor)
    return out


@dataclass
class SideTable:
    """Live objects the IR refers to by id: actor handles, constants, communicators."""

    handles: dict = field(default_factory=dict)  # actor id -> ActorHandle
    constants: list = field(default_factory=list)  # "#k" -> object
    communicators: dict = field(default_factory=dict)  # transport name -> user Communicator
