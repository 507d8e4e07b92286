"""The dataflow graph of a Schedule, as text (ASCII, DOT) or as a picture (SVG, PNG).

The graph is derived from the :class:`~dagc.schedule.Schedule` alone, so it can be drawn
from a ``schedule.json`` read back from disk. Nodes:

    input     the driver's write of the input ("in"); present when the DAG reads it
    t3        one CALL or COLL action, labelled ``a1:Stage.fwd`` (actor label . method)
    output    the driver's reads of the results

Edges, each labelled with the value it carries and its transport:

    from channels   writer's op -> each reader's op that uses the value
                    (transport "shm", "tcp" or "comm"; a reader that only reads the value
                    to be paced, such as an actor triggered by the input, gets the edge on
                    its first op after the read)
    same actor      producing op -> consuming op (transport "local": a plain variable)

Participants of one collective are listed with their group ("[g0]"); DOT joins them with a
dashed line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import networkx as nx

from dagc.ir import DRIVER, INPUT, Arg, Field, Ref, op_sort_key
from dagc.schedule import OP_KINDS, Action, Kind, Schedule

INPUT_NODE = "input"
OUTPUT_NODE = "output"
FORMATS = ("ascii", "dot", "svg", "png")

_TRANSPORT_STYLE = {  # DOT edge attributes per transport
    "local": "style=dotted",
    "shm": "style=solid",
    "tcp": 'style=bold, color="darkorange3"',
    "comm": 'style=bold, color="blue3"',
}


class RenderUnavailableError(RuntimeError):
    """The graph cannot be drawn as a picture here: the message says what to install."""


@dataclass(frozen=True)
class Node:
    id: str  # "t3", "input" or "output"
    actor: str  # actor id, or "driver" for input/output
    label: str  # "a1:Stage.fwd", "input", "output"
    group: str = ""  # collective group id for COLL nodes


@dataclass(frozen=True)
class Edge:
    src: str  # node id
    dst: str  # node id
    value: str  # the value ref carried: "t3", "t3.1", "in"
    transport: str  # "local" | "shm" | "tcp" | "comm"
    channel: str = ""  # channel id, "" for local edges

    @property
    def text(self) -> str:
        """``t2 (shm c1)`` / ``t2 (local)``: what the edge carries and how."""
        via = f" {self.channel}" if self.channel else ""
        return f"{self.value} ({self.transport}{via})"


@dataclass(frozen=True)
class DataflowGraph:
    nodes: tuple[Node, ...]  # topological order: input first, output last
    edges: tuple[Edge, ...]  # sorted by (destination order, source order, value)

    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def incoming(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == node_id]


# -- building the graph -------------------------------------------------------------------


def _uses(arg: Arg, value: Ref) -> bool:
    """Does argument ``arg`` (t3, t3.1, $0) read ``value`` (t3, t3.1, in)?"""
    if value == INPUT:
        return isinstance(arg, Field)
    return (
        isinstance(arg, Ref)
        and arg.op == value.op
        and (arg == value or arg.index is None or value.index is None)
    )


def _op_nodes(schedule: Schedule) -> dict[str, tuple[Node, Action]]:
    out = {}
    for actor in schedule.actors:
        label = schedule.label(actor)
        for _, a in schedule.of(actor):
            if a.kind in OP_KINDS:
                out[a.value.op] = (Node(a.value.op, actor, f"{label}.{a.method}", a.group), a)
    return out


def _consumers(schedule: Schedule, reader: str, value: Ref, channel: str) -> list[str]:
    """Node ids on ``reader`` fed by ``value`` arriving through ``channel``."""
    if reader == DRIVER:
        return [OUTPUT_NODE]
    acts = [a for _, a in schedule.of(reader)]
    users = [
        a.value.op
        for a in acts
        if a.kind in OP_KINDS and any(_uses(r, value) for r in schedule.call(a.value).refs())
    ]
    if users:
        return users
    # paced only: the first op after the read
    after = False
    for a in acts:
        after = after or (a.kind not in OP_KINDS and schedule.channel_of(reader, a).id == channel)
        if after and a.kind in OP_KINDS:
            return [a.value.op]
    return []


def build_graph(schedule: Schedule) -> DataflowGraph:
    """The dataflow graph of ``schedule`` (see the module docstring for what it holds)."""
    ops = _op_nodes(schedule)
    nodes: dict[str, Node] = {k: n for k, (n, _) in ops.items()}
    edges: set[Edge] = set()
    driver_writes_input = any(
        a.kind == Kind.SEND and a.value == INPUT for _, a in schedule.of(DRIVER)
    )
    if driver_writes_input or any(c.value == INPUT for c in schedule.channels):
        nodes[INPUT_NODE] = Node(INPUT_NODE, DRIVER, INPUT_NODE)
    if any(a.kind == Kind.RECV for _, a in schedule.of(DRIVER)) or any(
        DRIVER in c.readers for c in schedule.channels
    ):
        nodes[OUTPUT_NODE] = Node(OUTPUT_NODE, DRIVER, OUTPUT_NODE)
    for c in schedule.channels:
        src = INPUT_NODE if c.value == INPUT else c.value.op
        if src not in nodes:
            continue
        for r in c.readers:
            for dst in _consumers(schedule, r, c.value, c.id):
                edges.add(Edge(src, dst, str(c.value), c.transport, c.id))
    for node, act in ops.values():
        for ref in schedule.call(act.value).refs():
            if not isinstance(ref, Ref) or ref.op not in ops:
                continue
            if ops[ref.op][0].actor == node.actor:
                edges.add(Edge(ref.op, node.id, str(ref), "local"))
    order = _topological(nodes, edges)
    rank = {n: i for i, n in enumerate(order)}
    return DataflowGraph(
        nodes=tuple(nodes[n] for n in order),
        edges=tuple(
            sorted(edges, key=lambda e: (rank[e.dst], rank[e.src], e.value, e.transport, e.channel))
        ),
    )


def _node_key(node_id: str) -> str:
    if node_id == INPUT_NODE:
        return "0"
    if node_id == OUTPUT_NODE:
        return "2"
    return "1" + op_sort_key(node_id)


def _topological(nodes: dict[str, Node], edges) -> list[str]:
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from((e.src, e.dst) for e in edges)
    return list(nx.lexicographical_topological_sort(g, key=_node_key))


# -- text forms ---------------------------------------------------------------------------


def to_ascii(schedule: Schedule) -> str:
    """The graph as a terminal listing, one node per line in topological order.

    Each node is followed by its incoming edges, e.g.::

        dataflow graph: 2 ops, 3 edges
        input   driver writes the input
        t0      a0:Stage.fwd
                  <- in (shm c0) from input
        t1      a1:Stage.fwd
                  <- t0 (shm c1) from a0:Stage.fwd
        output  driver reads the results
                  <- t1 (shm c2) from a1:Stage.fwd
    """
    g = build_graph(schedule)
    n_ops = sum(1 for n in g.nodes if n.id not in (INPUT_NODE, OUTPUT_NODE))
    width = max([len(n.id) for n in g.nodes] + [6])
    lines = [f"dataflow graph: {n_ops} ops, {len(g.edges)} edges"]
    for n in g.nodes:
        if n.id == INPUT_NODE:
            desc = "driver writes the input"
        elif n.id == OUTPUT_NODE:
            desc = "driver reads the results"
        else:
            desc = n.label + (f"  [{n.group}]" if n.group else "")
        lines.append(f"{n.id.ljust(width)}  {desc}")
        for e in g.incoming(n.id):
            lines.append(f"{'':{width}}    <- {e.text} from {g.node(e.src).label}")
    return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    """A DOT double-quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(schedule: Schedule) -> str:
    """The graph as Graphviz DOT text: one cluster per actor, edges labelled with transport.

    Byte-identical for equal schedules. Looks like::

        digraph dagc {
          rankdir=TB;
          ...
          subgraph "cluster_a0" {
            label="a0:Stage";
            "t0" [label="a0:Stage.fwd\\nt0"];
          }
          "input" -> "t0" [label="in (shm c0)", style=solid];
        }
    """
    g = build_graph(schedule)
    lines = [
        "digraph dagc {",
        "  rankdir=TB;",
        '  graph [fontname="Helvetica", fontsize=11];',
        '  node [shape=box, style="rounded", fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    for special in (INPUT_NODE, OUTPUT_NODE):
        if any(n.id == special for n in g.nodes):
            lines.append(f"  {_q(special)} [label={_q(special)}, shape=oval];")
    for actor in schedule.actors:
        members = [n for n in g.nodes if n.actor == actor and n.id not in (INPUT_NODE, OUTPUT_NODE)]
        if not members:
            continue
        lines.append(f"  subgraph {_q('cluster_' + actor)} {{")
        lines.append(f"    label={_q(schedule.labels.get(actor, actor))};")
        lines.append('    style="rounded"; color="gray50";')
        for n in members:
            extra = f" [{n.group}]" if n.group else ""
            lines.append(f"    {_q(n.id)} [label={_q(n.label + chr(10) + n.id + extra)}];")
        lines.append("  }")
    for e in g.edges:
        style = _TRANSPORT_STYLE.get(e.transport, "style=solid")
        lines.append(f"  {_q(e.src)} -> {_q(e.dst)} [label={_q(e.text)}, {style}];")
    for group, ids in sorted(_collective_groups(g).items(), key=lambda kv: kv[0]):
        for a, b in zip(ids, ids[1:]):
            lines.append(
                f"  {_q(a)} -> {_q(b)} [label={_q(group)}, style=dashed, "
                f"dir=none, constraint=false];"
            )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _collective_groups(g: DataflowGraph) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in g.nodes:
        if n.group:
            groups.setdefault(n.group, []).append(n.id)
    return groups


# -- pictures -----------------------------------------------------------------------------

_INSTALL_HINT = (
    "install the Python package (pip install graphviz) and the Graphviz "
    "'dot' program (e.g. apt-get install graphviz, brew install graphviz, "
    "conda install -c conda-forge graphviz)"
)


def _pipe(dot_text: str, fmt: str) -> bytes:
    try:
        import graphviz
    except ImportError as e:
        raise RenderUnavailableError(
            f"drawing the graph as {fmt} needs Graphviz: {_INSTALL_HINT}. "
            f"format='dot' and format='ascii' work without it."
        ) from e
    try:
        return graphviz.Source(dot_text).pipe(format=fmt)
    except graphviz.ExecutableNotFound as e:
        raise RenderUnavailableError(
            f"drawing the graph as {fmt} needs the Graphviz 'dot' program on PATH, which "
            f"was not found: {_INSTALL_HINT}. format='dot' and format='ascii' work "
            f"without it."
        ) from e


@overload
def render(schedule: Schedule, format: Literal["png"]) -> bytes: ...
@overload
def render(schedule: Schedule, format: Literal["ascii", "dot", "svg"] = "ascii") -> str: ...
@overload
def render(schedule: Schedule, format: str) -> str | bytes: ...


def render(schedule: Schedule, format: str = "ascii") -> str | bytes:
    """The graph in ``format``: "ascii" and "dot" (str), "svg" (str) or "png" (bytes).

    svg and png need the ``graphviz`` package and the ``dot`` program; without them this
    raises :class:`RenderUnavailableError` (a RuntimeError) saying what to install.
    """
    if format == "ascii":
        return to_ascii(schedule)
    if format == "dot":
        return to_dot(schedule)
    if format == "svg":
        return _pipe(to_dot(schedule), "svg").decode("utf-8")
    if format == "png":
        return _pipe(to_dot(schedule), "png")
    raise ValueError(f"unknown graph format {format!r}; use one of: {', '.join(FORMATS)}")
