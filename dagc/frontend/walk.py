"""Ray DAG -> dagc IR: the walk behind ``dagc.trace`` (the stage is named as JAX names it;
this module is the walk itself, so "trace" keeps one meaning: the stage).

``walk(dag)`` returns ``(ir, side)``: the IR names actors "a0", "a1", ... in order of first
appearance and values "t0", "t1", ... in a deterministic depth-first order over the
arguments, so the same DAG always gives the same IR. Each op records its position in its
actor's bind order (Ray's per-handle bind index, ranked), which the schedule keeps. Live
objects (actor handles, constants, user communicators) go into the side table, never into
the IR. A function node (``f.bind()``) is a call on an actor id of its own whose side-table
entry says what to create for it when the DAG is loaded (``functions.py``). A DAG node hidden
inside an argument object is refused (``find_nodes``), and so is a call whose result reaches
no output (a "leaf node", as Ray Compiled Graph refuses it: ``leaves.py``). A node's
transport and device hints become names in ``hints.py``. Messages start with Ray's wording
where Ray has one, so code written against ``experimental_compile`` matches them, and go on
to say where and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx

from dagc.errors import CompileError
from dagc.frontend.find_nodes import find_nodes
from dagc.frontend.functions import function_actor
from dagc.frontend.hints import collective_transport, device_of, transport_of
from dagc.frontend.inputs import check_input_attributes
from dagc.frontend.leaves import find_leaves, raise_leaves
from dagc.frontend.ray_nodes import describe, ray_dag, reached_nodes
from dagc.ir import (
    CALL,
    COLLECTIVE,
    IR,
    ActorSpec,
    Arg,
    Const,
    Field,
    InputSpec,
    Op,
    OutputSpec,
    Ref,
    SideTable,
)

# Ray's collective op classes -> dagc's collective kinds (the method name's first part)
_COLLECTIVES = {
    "AllReduceOp": "allreduce",
    "AllGatherOp": "allgather",
    "ReduceScatterOp": "reducescatter",
}


class _Walker:
    def __init__(self) -> None:
        self.rd, self.CollectiveOutputNode, self.InputAttributeNode = ray_dag()
        self.graph = nx.DiGraph()
        self.side = SideTable()
        self.memo: dict[int, Arg] = {}  # id(ray node) -> Arg
        self.keep_alive: list = []  # nodes whose id() we memoised
        self.actor_ids: dict[Any, str] = {}  # ActorId -> "aN"
        self.actor_specs: list[ActorSpec] = []
        self.groups: dict[int, str] = {}
        self.pos_keys: set[int] = set()
        self.kw_keys: set[str] = set()
        self.direct = False
        self.input_node: Any = None
        self.input_uses: list[tuple[str, Any]] = []  # ("direct", None) | ("pos", i) | ("kw", k)
        self.n_ops = 0

    # -- actors --------------------------------------------------------------------------
    def actor_of(self, node) -> str:
        handle = node._get_actor_handle()
        if handle is None:
            raise CompileError(
                f"{describe(node)}: the method is bound on an actor class (Actor.bind()), not a "
                f"live actor. Create the actor first: a = Actor.remote(); a.method.bind(...)."
            )
        key = handle._ray_actor_id
        aid = self.actor_ids.get(key)
        if aid is None:
            aid = f"a{len(self.actor_ids)}"
            self.actor_ids[key] = aid
            cls = handle._ray_actor_creation_function_descriptor.class_name
            self.actor_specs.append(ActorSpec(id=aid, cls=cls.rsplit(".", 1)[-1], name=aid))
            self.side.handles[aid] = handle
        return aid

    # -- arguments -----------------------------------------------------------------------
    def arg(self, value, consumer, position) -> Arg:
        """``position``: the argument's index, or its keyword (a str)."""
        rd = self.rd
        if isinstance(value, rd.DAGNode):
            return self.node(value)
        import ray

        if isinstance(value, ray.ObjectRef):
            raise CompileError(
                f"{describe(consumer)}: an ObjectRef is bound as an argument; compiled DAGs "
                f"take values, not ObjectRefs. Pass the value (ray.get it first) or feed it "
                f"through the InputNode."
            )
        where = (
            f"keyword argument {position}="
            if isinstance(position, str)
            else f"argument {position} "
        )
        found = find_nodes(value, lambda v: isinstance(v, rd.DAGNode))
        if found:
            node, path = found[0]
            kind = type(value).__name__
            # where and why, then Ray's sentences (code written for Ray matches them)
            raise CompileError(
                f"{describe(consumer)} {where}{path}: a DAG node ({describe(node)}) is nested "
                f"inside a {kind} argument, where it would be passed as the node object, not "
                f"its result; compiled DAGs take DAG nodes only as top-level arguments. Pass "
                f"the node as its own argument and build the {kind} inside the method. "
                f"(Found {len(found)} DAGNodes from the arg {where.strip()} in "
                f"{describe(consumer)}. Please ensure that the argument is a single DAGNode "
                f"and that a DAGNode is not allowed to be placed inside any type of "
                f"container.)"
            )
        self.side.constants.append(value)
        return Const(len(self.side.constants) - 1)

    def input_field(self, kind: str, key) -> Arg:
        self.input_uses.append((kind, key))
        if kind == "direct":
            self.direct = True
        elif kind == "pos":
            self.pos_keys.add(key)
        else:
            self.kw_keys.add(key)
        return _InputUse(kind, key)  # placeholder, numbered in finish()

    def check_input(self, node):
        if self.input_node is None:
            self.input_node = node
        elif node is not self.input_node:
            raise CompileError(
                "the DAG uses two different InputNodes; a compiled DAG has one "
                "InputNode: build the whole DAG inside one `with InputNode() as inp:`."
            )

    # -- nodes ---------------------------------------------------------------------------
    def node(self, node) -> Arg:
        key = id(node)
        if key in self.memo:
            return self.memo[key]
        self.keep_alive.append(node)
        rd = self.rd
        if isinstance(node, rd.InputNode):
            self.check_input(node)
            result = self.input_field("direct", None)
        elif isinstance(node, self.InputAttributeNode):
            self.check_input(node._dag_input_node)
            k = node.key
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise CompileError(f"input attribute {k!r}: use inp[i] (int) or inp['key'] (str).")
            result = self.input_field("pos" if isinstance(k, int) else "kw", k)
        elif isinstance(node, rd.ClassMethodNode):
            result = self.method(node)
        elif isinstance(node, rd.MultiOutputNode):
            raise CompileError("a MultiOutputNode must be the root of the DAG, not an argument.")
        elif isinstance(node, rd.FunctionNode):
            result = self.function(node)
        elif isinstance(node, rd.ClassNode):
            raise CompileError(
                f"{describe(node)}: actor creation inside the DAG (Actor.bind()) cannot be "
                f"compiled. Create the actor with Actor.remote() and bind its methods."
            )
        else:
            raise CompileError(
                f"{describe(node)}: unsupported DAG node type {type(node).__name__}."
            )
        self.memo[key] = result
        return result

    def new_id(self) -> str:
        i = self.n_ops
        self.n_ops += 1
        return f"t{i}"

    def method(self, node) -> Ref:
        if node.is_class_method_output:
            base = self.node(node.class_method_call)
            assert isinstance(base, Ref)  # a method call's value (method() made it)
            return Ref(base.op, node.output_idx)
        is_coll = isinstance(node, self.CollectiveOutputNode) and node.collective_op is not None
        args = tuple(self.arg(a, node, i) for i, a in enumerate(node.get_args()))
        kwargs = tuple((k, self.arg(v, node, k)) for k, v in node.get_kwargs().items())
        aid = self.actor_of(node)  # after the arguments: actors number in dataflow order
        num_returns = 1
        if not is_coll:
            try:
                num_returns = node.num_returns
            except Exception:
                num_returns = 1
            if num_returns in (None, "streaming", "dynamic") or not isinstance(num_returns, int):
                raise CompileError(
                    f"{describe(node)}: num_returns={num_returns!r} is not "
                    f"supported; use a fixed number of returns."
                )
        op_id = self.new_id()
        transport = transport_of(node, self.side)
        device = device_of(node)
        group = None
        method_name = node.get_method_name()
        if is_coll:
            cop = node.collective_op
            gid = self.groups.get(id(cop))
            if gid is None:
                gid = f"g{len(self.groups)}"
                self.groups[id(cop)] = gid
                self.keep_alive.append(cop)
            group = gid
            transport = collective_transport(cop, self.side)
            kind = _COLLECTIVES.get(type(cop._op).__name__)
            if kind is None:
                raise CompileError(
                    f"{describe(node)}: collective {type(cop._op).__name__} is "
                    f"not supported; dagc compiles allreduce, allgather and "
                    f"reducescatter."
                )
            if kind == "allgather":
                method_name = kind
            else:
                reduce = getattr(getattr(cop._op, "reduceOp", None), "name", "SUM").lower()
                method_name = f"{kind}.{reduce}"
            # allreduce.bind([xs, ys]): one op per actor over several tensors, one result each
            num_returns = len(args)
        raw_bind = getattr(node, "_get_bind_index", lambda: None)()
        op = Op(
            id=op_id,
            kind=COLLECTIVE if is_coll else CALL,
            actor=aid,
            method=method_name,
            args=args,
            kwargs=kwargs,
            num_returns=num_returns,
            transport=transport,
            device=device,
            group=group,
            bind_index=raw_bind if isinstance(raw_bind, int) else None,
        )
        self.graph.add_node(op_id, op=op)
        for a in op.refs():
            if isinstance(a, Ref):
                self.graph.add_edge(a.op, op_id)
        return Ref(op_id)

    def function(self, node) -> Ref:
        """A function node: a call on an actor of its own (``functions.py``), created when
        the DAG is loaded; until then its side-table handle is a FunctionActor."""
        spec = function_actor(node, describe)
        args = tuple(self.arg(a, node, i) for i, a in enumerate(node.get_args()))
        kwargs = tuple((k, self.arg(v, node, k)) for k, v in node.get_kwargs().items())
        aid = f"a{len(self.actor_ids)}"  # after the arguments, as for methods
        self.actor_ids[("function", id(node))] = aid
        self.actor_specs.append(ActorSpec(id=aid, cls=spec.method, name=aid))
        self.side.handles[aid] = spec
        op = Op(
            id=self.new_id(),
            kind=CALL,
            actor=aid,
            method=spec.method,
            args=args,
            kwargs=kwargs,
            transport=transport_of(node, self.side),
            device=device_of(node),
        )
        self.graph.add_node(op.id, op=op)
        for a in op.refs():
            if isinstance(a, Ref):
                self.graph.add_edge(a.op, op.id)
        return Ref(op.id)

    # -- leaf nodes ----------------------------------------------------------------------
    def check_leaves(self) -> None:
        """Refuse method calls none of whose results reach an output (Ray's "leaf nodes"):
        the walk from the output never meets them, so they would silently never run and a
        failure of theirs would never be seen. An unused return of a call whose other return
        is used is not one (the call runs; its failure reaches get() through the used one);
        Ray refuses that too, and so does ``dagc.patch_ray()`` (:func:`check_ray_leaves`)."""
        leaves = find_leaves(self.keep_alive, self.rd, per_return=False)
        if leaves:
            raise_leaves(leaves, describe)

    # -- finish --------------------------------------------------------------------------
    def finish(self, out_refs: list[Arg], multi: bool) -> tuple[IR, SideTable]:
        if self.direct and (self.pos_keys or self.kw_keys):
            raise CompileError(
                "All tasks must either use InputNode() directly, or they must index to "
                "specific args or kwargs. This DAG uses the InputNode both directly (inp) "
                "and indexed (inp[0], inp['key']); use one form: either every method takes "
                "inp, or every method takes inp[i] / inp['key']."
            )
        pos = sorted(self.pos_keys | ({0} if self.direct else set()))
        kws = sorted(self.kw_keys)
        fields = tuple(pos) + tuple(kws)
        index: dict[tuple[str, Any], int] = {("pos", k): i for i, k in enumerate(pos)}
        index.update({("kw", k): len(pos) + i for i, k in enumerate(kws)})
        index[("direct", None)] = index.get(("pos", 0), 0)

        def renumber(a: Arg) -> Arg:
            return Field(index[(a.kind, a.key)]) if isinstance(a, _InputUse) else a

        bind_rank = _bind_ranks(data["op"] for _, data in self.graph.nodes(data=True))
        for _, data in self.graph.nodes(data=True):
            op = data["op"]
            data["op"] = Op(
                **{
                    **op.__dict__,
                    "args": tuple(renumber(a) for a in op.args),
                    "kwargs": tuple((k, renumber(v)) for k, v in op.kwargs),
                    "bind_index": bind_rank.get(op.id),
                }
            )
        out = tuple(renumber(a) for a in out_refs)
        num_positional = (max(pos) + 1) if pos else 0
        inputs = InputSpec(
            fields=fields, num_positional=num_positional, kwargs=tuple(kws), direct=self.direct
        )
        ir = IR(
            graph=self.graph,
            actors=tuple(self.actor_specs),
            inputs=inputs,
            output=OutputSpec(refs=out, multi=multi),
        )
        return ir, self.side


@dataclass(frozen=True)
class _InputUse(Arg):
    """An input use while tracing (``inp``, ``inp[i]``, ``inp["k"]``); a Field once the
    whole DAG is seen and the fields are numbered."""

    kind: str  # "direct" | "pos" | "kw"
    key: Any  # None | int | str


def _bind_ranks(ops) -> dict[str, int]:
    """op id -> its position among its actor's ops in bind order (0 first, ties equal).

    Ray numbers binds per actor handle over the handle's whole life (earlier DAGs count),
    so dagc keeps only the order: the same DAG gives the same IR however it was built.
    """
    by_actor: dict[str, list] = {}
    for op in ops:
        if op.bind_index is not None:
            by_actor.setdefault(op.actor, []).append(op)
    ranks = {}
    for actor_ops in by_actor.values():
        order = sorted({op.bind_index for op in actor_ops})
        pos = {b: i for i, b in enumerate(order)}
        ranks.update({op.id: pos[op.bind_index] for op in actor_ops})
    return ranks


def walk(dag) -> tuple[IR, SideTable]:
    """Walk a Ray DAG into dagc IR. Raises CompileError naming the unsupported node."""
    try:
        rd, _, _ = ray_dag()
    except ImportError as e:  # pragma: no cover
        raise CompileError(f"ray is not importable ({e}); install ray to compile Ray DAGs.") from e
    t = _Walker()
    if isinstance(dag, (list, tuple)):
        raise CompileError(
            "compile() takes one DAG node; wrap several outputs in MultiOutputNode([...])."
        )
    if isinstance(dag, rd.MultiOutputNode):
        refs = [t.node(n) if isinstance(n, rd.DAGNode) else _not_node(n) for n in dag.get_args()]
        multi = True
    elif isinstance(dag, rd.DAGNode):
        refs = [t.node(dag)]
        multi = False
    else:
        raise CompileError(
            f"compile() needs a Ray DAG node (from .bind()), got {type(dag).__name__}."
        )
    if not t.actor_specs:
        raise CompileError(
            "the DAG has no actor method or function calls; bind at least one "
            "(actor.method.bind(inp), f.bind(inp))."
        )
    check_input_attributes(t.keep_alive)  # before the leaves, as Ray checks
    t.check_leaves()
    return t.finish(refs, multi)


def _not_node(n):
    raise CompileError(
        f"MultiOutputNode holds {type(n).__name__}, not a DAG node; list the nodes to return."
    )


def check_ray_leaves(dag) -> None:
    """Ray Compiled Graph's leaf rule, for ``experimental_compile`` under the patch: every
    method call result, each return of a ``num_returns`` call included, must reach an
    output. Raises CompileError (a ValueError) with Ray's wording."""
    rd, _, _ = ray_dag()
    leaves = find_leaves(reached_nodes(dag), rd, per_return=True)
    if leaves:
        raise_leaves(leaves, describe)
