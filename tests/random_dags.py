"""Random Ray DAGs for property-based tests (hypothesis), as plain data that prints as code.

A :class:`DagSpec` lists statements in bind order: actor method calls whose arguments come
from the input (``inp``, ``inp[i]``, ``inp["k"]``), constants or earlier results, positional
or keyword, optionally with a tensor transport; and all-reduces over tensors of distinct
actors. Every result no later statement reads is an output, so the DAG has no leaf nodes.

The spec prints as Python (``spec.as_code()``, also its ``repr``, so hypothesis shows it for
a failing example): ``build(a0, a1, ...)`` makes the Ray DAG with ``.bind``, ``with_ray(a0,
a1, ..., inp)`` makes the same calls one by one with ``.remote`` (the reference), and
``ARGS``/``KWARGS`` are what one execution takes. There all-reduces become a Ray task
(:func:`reduce`), so a failed input fails them as it does in a compiled DAG. The tests run
that very text (:meth:`DagSpec.functions`), so what a failure prints is what was tested.

The actors are :class:`Stateful`: each call counts, and the count is in every result, so
results depend on each actor's call order (bind order) as well as on the data.
:class:`FakeActor` stands in for an actor handle where no Ray runs (unit tests): dagc's
frontend reads only a handle's id, class name and bind counter.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import ray
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from ray.dag import ClassMethodNode, InputNode, MultiOutputNode
from ray.dag.constants import BIND_INDEX_KEY, PARENT_CLASS_NODE_KEY, PREV_CLASS_METHOD_CALL_KEY
from ray.experimental.collective import allreduce
from ray.experimental.util.types import ReduceOp

KEYS = ("k", "m")  # the keyword input fields a DAG may read
REDUCE = {"sum": "sum", "max": "amax"}  # all-reduce op -> the torch reduction
FAILURE = "injected failure"
HEADER = """\
import ray, torch
from ray.dag import InputNode, MultiOutputNode
from ray.experimental.collective import allreduce
from ray.experimental.util.types import ReduceOp
from tests.random_dags import Stateful, reduce  # actors: ray.remote(Stateful).remote(k)
"""


class Stateful:
    """The actor class of every random DAG (``ray.remote(Stateful)``). ``n`` counts calls;
    values are ints or float64 tensors of shape (2,), small enough to stay exact."""

    def __init__(self, k=0):
        self.k = k
        self.n = 0

    def reset(self):
        self.n = 0
        return self.k

    def step(self, x):
        self.n += 1
        return x + 10 * self.n + self.k

    def mix(self, x, y=0, w=1):
        self.n += 1
        return x + w * y + self.n

    def vec(self, x):
        self.n += 1
        return (
            torch.zeros(2, dtype=torch.float64)
            + x
            + torch.tensor([self.n, self.k], dtype=torch.float64)
        )

    def fail_at(self, x, n=1):
        """Raises at this actor's ``n``-th call: once, in one execution."""
        self.n += 1
        if self.n == n:
            raise ValueError(f"{FAILURE}: actor {self.k}, call {n}")
        return x + self.n


@ray.remote
def reduce(op: str, *xs):
    """An all-reduce's result for plain Ray: a task, so a failed input fails it too."""
    return getattr(torch.stack(xs), REDUCE[op])(0)


# -- the spec ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """``v = a{actor}.{method}(*args, **kwargs)``; each argument is a source (below)."""

    actor: int
    method: str
    args: tuple
    kwargs: tuple = ()  # ((name, src), ...)
    transport: str | None = None  # with_tensor_transport(...) on the result


@dataclass(frozen=True)
class AllReduce:
    """``allreduce.bind([...])`` over earlier tensor values of distinct actors: one result
    per input, on that input's actor."""

    inputs: tuple  # value ids
    op: str = "sum"


# A source: ("inp",) the input itself, ("inp", 0) / ("inp", "k") an input field,
# ("v", 3) value 3, ("c", 5) the constant 5.


@dataclass(frozen=True)
class DagSpec:
    """A random DAG: ``n_actors`` actors (some maybe unused), statements, outputs."""

    n_actors: int
    statements: tuple  # Call | AllReduce, in bind order
    outputs: tuple  # value ids, in output order
    multi: bool  # MultiOutputNode even for one output

    def inputs_used(self) -> tuple[bool, list[int], list[str]]:
        """(direct, positions, keys) the DAG reads."""
        srcs = [
            a
            for s in self.statements
            if isinstance(s, Call)
            for a in s.args + tuple(v for _, v in s.kwargs)
        ]
        direct = ("inp",) in srcs
        pos = sorted(
            {s[1] for s in srcs if s[0] == "inp" and len(s) == 2 and isinstance(s[1], int)}
        )
        keys = sorted(
            {s[1] for s in srcs if s[0] == "inp" and len(s) == 2 and isinstance(s[1], str)}
        )
        return direct, pos, keys

    def execution_args(self, e: int) -> tuple[tuple, dict, object]:
        """Execution ``e``'s (args, kwargs) for ``execute`` and the ``inp`` for
        ``with_ray``: the input value, or {position or key: value}."""
        direct, pos, keys = self.inputs_used()
        if direct:
            return (e + 1,), {}, e + 1
        args = tuple(100 * (e + 1) + i for i in range(max(pos) + 1 if pos else 0))
        kwargs = {k: 1000 * (e + 1) + j for j, k in enumerate(keys)}
        return args, kwargs, {**dict(enumerate(args)), **kwargs}

    # -- as code -------------------------------------------------------------------------
    def body(self) -> str:
        """``build``, ``with_ray``, ``ARGS`` and ``KWARGS`` (:meth:`as_code` without the
        imports)."""
        names = ", ".join(f"a{i}" for i in range(self.n_actors))
        vid = 0
        bind, remote = [], []
        for s in self.statements:
            if isinstance(s, Call):
                args = [_src(a) for a in s.args] + [f"{k}={_src(v)}" for k, v in s.kwargs]
                call = f"a{s.actor}.{s.method}.%s({', '.join(args)})"
                tt = f".with_tensor_transport({s.transport!r})" if s.transport else ""
                bind.append(f"v{vid} = {call % 'bind'}{tt}")
                remote.append(f"v{vid} = {call % 'remote'}")
                vid += 1
            else:
                outs = [f"v{vid + j}" for j in range(len(s.inputs))]
                ins = ", ".join(f"v{v}" for v in s.inputs)
                op = "" if s.op == "sum" else f", op=ReduceOp.{s.op.upper()}"
                bind.append(
                    f"{', '.join(outs)}{',' if len(outs) == 1 else ''} = "
                    f"allreduce.bind([{ins}]{op})"
                )
                remote.append(f"{' = '.join(outs)} = reduce.remote({s.op!r}, {ins})")
                vid += len(outs)
        outs = ", ".join(f"v{v}" for v in self.outputs)
        root = f"MultiOutputNode([{outs}])" if self.multi else outs
        args, kwargs, _ = self.execution_args(0)
        return (
            "\n".join(
                [
                    f"def build({names}):",
                    "    with InputNode() as inp:",
                    *(f"        {line}" for line in bind),
                    f"    return {root}",
                    "",
                    f"def with_ray({names}, inp):  # the same calls with .remote(), in bind order",
                    *(f"    {line}" for line in remote),
                    f"    return [{outs}]  # ray.get each",
                    "",
                    f"ARGS, KWARGS = {args!r}, {kwargs!r}  # execute(*ARGS, **KWARGS); more: "
                    f"tests.random_dags.DagSpec.execution_args",
                ]
            )
            + "\n"
        )

    def as_code(self) -> str:
        """The DAG as a Python file a person can paste (with Ray running)."""
        return HEADER + "\n" + self.body()

    __repr__ = as_code

    def _repr_pretty_(self, p, cycle):  # how hypothesis prints a falsifying example
        p.text(self.as_code())

    def functions(self):
        """``(build, with_ray)`` made from :meth:`as_code`'s text."""
        ns = {
            "ray": ray,
            "torch": torch,
            "InputNode": InputNode,
            "MultiOutputNode": MultiOutputNode,
            "allreduce": allreduce,
            "ReduceOp": ReduceOp,
            "reduce": reduce,
        }
        exec(compile(self.body(), "<random dag>", "exec"), ns)  # our own text
        return ns["build"], ns["with_ray"]


def _src(s) -> str:
    if s == ("inp",):
        return "inp"
    if s[0] == "inp":
        return f"inp[{s[1]!r}]"
    return f"v{s[1]}" if s[0] == "v" else repr(s[1])


# -- the strategy ------------------------------------------------------------------------


@st.composite
def dag_specs(
    draw,
    max_actors: int = 3,
    max_statements: int = 8,
    tensors: bool = True,
    collectives: bool = True,
    failures: bool = False,
) -> DagSpec:
    """Random valid DAGs; hypothesis shrinks them towards one actor, one call on ``inp``.
    ``failures``: calls of ``fail_at`` too, each raising in one execution."""
    n_actors = draw(st.integers(1, max_actors))
    direct = draw(st.booleans())
    inputs = (
        [("inp",)]
        if direct
        else [("inp", i) for i in range(draw(st.integers(1, 3)))]
        + [("inp", k) for k in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=2))]
    )
    vals: list[tuple[int, bool]] = []  # (actor, is a tensor) by value id
    statements = []
    for i in range(draw(st.integers(1, max_statements))):
        tensor_vals = [v for v, (_, t) in enumerate(vals) if t]
        by_actor: dict[int, list[int]] = {}  # actor -> its tensors, latest first
        for v in reversed(tensor_vals):
            by_actor.setdefault(vals[v][0], []).append(v)
        if collectives and len(by_actor) >= 2 and draw(st.booleans()):
            picked = draw(st.lists(st.sampled_from(sorted(by_actor)), min_size=2, unique=True))
            ins = tuple(draw(st.sampled_from(by_actor[a])) for a in picked)
            statements.append(AllReduce(ins, draw(st.sampled_from(sorted(REDUCE)))))
            vals.extend((vals[v][0], True) for v in ins)
            continue
        method = draw(st.sampled_from(["step", "mix"] + ["vec"] * tensors + ["fail_at"] * failures))
        latest_first = list(range(len(vals)))[::-1]

        def source(latest_first=latest_first):
            # mostly earlier values (fan-in, fan-out); shrinks towards the input
            kind = draw(st.sampled_from(["inp", "v", "v", "c"] if vals else ["inp", "c"]))
            if kind == "v":
                return ("v", draw(st.sampled_from(latest_first)))
            if kind == "c":
                return ("c", draw(st.integers(0, 9)))
            return draw(st.sampled_from(inputs))

        x = draw(st.sampled_from(inputs)) if i == 0 else source()  # every DAG reads inp
        args, kwargs = [x], []
        if method == "mix":
            how = draw(st.sampled_from(["", "pos", "kw"]))
            if how:
                y = source()
                (args.append(y) if how == "pos" else kwargs.append(("y", y)))
            if draw(st.booleans()):  # a weight: a small constant (values stay exact)
                kwargs.append(("w", ("c", draw(st.integers(0, 3)))))
        if method == "fail_at":
            kwargs.append(("n", ("c", draw(st.integers(1, 12)))))
        is_tensor = method == "vec" or any(
            s[0] == "v" and vals[s[1]][1] for s in args + [v for _, v in kwargs]
        )
        transport = draw(st.sampled_from([None, "nccl", "auto"])) if tensors and is_tensor else None
        actor = draw(st.integers(0, n_actors - 1))
        statements.append(Call(actor, method, tuple(args), tuple(kwargs), transport))
        vals.append((actor, is_tensor))
    read = {
        a[1]
        for s in statements
        if isinstance(s, Call)
        for a in s.args + tuple(v for _, v in s.kwargs)
        if a[0] == "v"
    }
    read |= {v for s in statements if isinstance(s, AllReduce) for v in s.inputs}
    sinks = [v for v in range(len(vals)) if v not in read]
    extra = draw(st.lists(st.sampled_from(range(len(vals))), max_size=2))
    outputs = tuple(draw(st.permutations(sinks + extra)))
    multi = len(outputs) > 1 or draw(st.booleans())
    return DagSpec(n_actors, tuple(statements), outputs, multi)


# -- actor handles without Ray -----------------------------------------------------------


class FakeActor(ray.actor.ActorHandle):
    """What dagc's frontend and Ray's DAG nodes read of an actor handle, without a Ray
    cluster: an id, a class name, a bind counter; ``a.method.bind(...)`` as Ray makes it."""

    def __init__(self, i: int, cls: str = "Stateful"):  # not ActorHandle.__init__: no Ray
        self.__dict__.update(
            _ray_weak_ref=True,
            _ray_actor_id=f"fake-actor-{i}",
            _fake_index=i,
            _ray_actor_creation_function_descriptor=types.SimpleNamespace(class_name=cls),
            _ray_dag_bind_index=0,
        )

    def __reduce__(self):  # Ray's DAG nodes pickle their arguments to find nodes
        return FakeActor, (self._fake_index,)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _FakeMethod(self, name)


class _FakeMethod:
    def __init__(self, actor: FakeActor, name: str):
        self.actor, self.name = actor, name

    def bind(self, *args, **kwargs):
        node = ClassMethodNode(
            self.name,
            args,
            kwargs,
            {"num_returns": 1},
            {
                PARENT_CLASS_NODE_KEY: self.actor,
                PREV_CLASS_METHOD_CALL_KEY: None,
                BIND_INDEX_KEY: self.actor._ray_dag_bind_index,
            },
        )
        self.actor._ray_dag_bind_index += 1
        return node


# -- how many examples -------------------------------------------------------------------


def fuzz_settings(config, default: int, fuzz: int, *health_checks) -> settings:
    """``default`` derandomized examples (the same ones every run, as CI wants), or under
    ``pytest -m fuzz`` ``fuzz`` random ones (``DAGC_FUZZ_EXAMPLES`` overrides the number);
    never a hypothesis database in the repository. ``health_checks``: ones to suppress."""
    fuzzing = "fuzz" in (config.getoption("markexpr") or "")
    n = int(os.environ.get("DAGC_FUZZ_EXAMPLES", fuzz)) if fuzzing else default
    return settings(
        max_examples=n,
        derandomize=not fuzzing,
        database=None,
        deadline=None,
        print_blob=fuzzing,
        suppress_health_check=[HealthCheck.too_slow, *health_checks],
    )
