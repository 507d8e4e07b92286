"""What every pass and the pass runner share: :class:`Pass`, :class:`PassContext`,
:func:`run_passes`.

A pass is a small frozen dataclass with a ``name`` and ``run(ir, ctx) -> IR``. Its options
are its typed fields: a compile option a pass uses has no default here (the defaults live
once, in :class:`dagc.options.Options`, which builds the pass list), so a pass list always
prints every option it was built with, and its text (``validate-graph,...,schedule-ops{
reorder=bind}``) reproduces the compile when :func:`parse_passes` reads it back: each value
is parsed by its field's type.

Each pass states what it ``requires`` of the IR and what it ``ensures`` (facts such as
"channels" or "schedule"); :func:`run_passes` checks, before running a pass, that some pass
before it (or one recorded in ``IR.passes``) ensured each fact it requires, and names the
pass, the missing fact and the pass that provides it otherwise.
This module imports no pass: each pass imports it.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import InitVar, dataclass, field, fields
from typing import Any, ClassVar

from dagc import config
from dagc.errors import CompileError
from dagc.ir import IR
from dagc.placement import ActorPlace, Placement
from dagc.schedule.costs import Costs

# What a pass may require of the IR, and how an error names it.
FACTS: dict[str, str] = {
    "validated": "a validated graph (acyclic, every op used)",
    "placed": "actors placed on nodes (ActorSpec.node, gpu_ids)",
    "channels": "channels (IR.channels)",
    "comm-groups": "communicator groups (IR.comm_groups)",
    "schedule": "a schedule (IR.schedule)",
    "overlapped": "an overlapped schedule (receives issued early)",
}


@dataclass
class PassContext:
    """What passes may know about the world: placement facts and the costs to schedule by.

    Passes read it and never reach out to Ray themselves, so every pass runs without Ray.
    ``placement`` is a :class:`~dagc.placement.Placement`; the older form, a dict
    ``{actor id: (node id, gpu ids)}`` plus ``driver_node=...``, is converted to one.
    ``costs`` is anything :meth:`Costs.of <dagc.schedule.costs.Costs.of>` takes (None:
    uniform). Compile options are not here: they are the passes' own fields.
    """

    placement: Placement = field(default_factory=Placement)
    costs: Costs = field(default_factory=Costs.uniform)
    timings: dict[str, float] = field(default_factory=dict)  # pass name -> seconds
    driver_node: InitVar[str] = ""  # only with the dict form of placement

    def __post_init__(self, driver_node: str) -> None:
        if not isinstance(self.placement, Placement):
            self.placement = Placement(
                driver_node=driver_node,
                actors={
                    a: ActorPlace(node=node, gpus=tuple(gpus))
                    for a, (node, gpus) in (self.placement or {}).items()
                },
            )
        elif driver_node and not self.placement.driver_node:
            self.placement = dataclasses.replace(self.placement, driver_node=driver_node)
        self.costs = Costs.of(self.costs)


@dataclass(frozen=True)
class Pass:
    """A compiler pass: ``run(ir, ctx)`` returns a new IR. Subclasses set ``name`` (the
    same as their module, with dashes) and the facts they ``require`` and ``ensure``."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()

    def run(self, ir: IR, ctx: PassContext) -> IR:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        opts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            # an option without a default (a compile option) always prints; one with a
            # default only when it differs
            if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default
        ]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def format_passes(passes: Iterable[Pass]) -> str:
    """The text of a pass list, as a generated module's header shows it."""
    return ",".join(str(p) for p in passes)


def parse_passes(text: str, registry: Mapping[str, type[Pass]]) -> tuple[Pass, ...]:
    """Inverse of :func:`format_passes`; ``registry`` maps pass names to pass classes.
    A ValueError names an unknown pass, an unknown or missing option, or a bad value."""
    out = []
    for part in _split_top(text):
        name, _, rest = part.partition("{")
        cls = registry.get(name)
        if cls is None:
            raise ValueError(f"unknown pass {name!r}; known: {', '.join(registry)}")
        types = typing.get_type_hints(cls)
        known = {f.name: types[f.name] for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for kv in rest.rstrip("}").split(",") if rest else ():
            k, eq, v = kv.partition("=")
            if k not in known or not eq:
                raise ValueError(
                    f"pass {name!r}: unknown option {kv!r}; its options: "
                    f"{', '.join(known) or 'none'}"
                )
            kwargs[k] = _parse_value(name, k, v, known[k])
        missing = [f.name for f in fields(cls) if f.name not in kwargs and _required(f)]
        if missing:
            raise ValueError(f"pass {name!r} needs option(s) {', '.join(missing)}")
        out.append(cls(**kwargs))
    return tuple(out)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur:
        parts.append(cur)
    return parts


def _parse_value(name: str, key: str, v: str, tp: Any) -> Any:
    """``v`` as the field type ``tp``: bool, int, float, str, or an Optional of one."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):  # Optional[X]: "None" is None
        if v == "None":
            return None
        tp = args[0]
    try:
        if tp is bool:
            if v not in ("True", "False"):
                raise ValueError(v)
            return v == "True"
        if tp in (int, float, str):
            return tp(v)
    except ValueError:
        raise ValueError(f"pass {name!r}: option {key}={v!r} is not a {tp.__name__}") from None
    raise TypeError(f"pass {name!r}: option {key} has a type the parser does not read: {tp}")


def _providers(fact: str) -> list[str]:
    """The names of the pass classes (loaded so far) that ensure ``fact``."""
    out, todo = [], list(Pass.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if fact in cls.ensures and cls.name not in out:
            out.append(cls.name)
    return sorted(out)


def _facts_of(ir: IR) -> set[str]:
    """What the passes recorded in ``ir.passes`` ensured (a resumed pass list)."""
    done = {p.partition("{")[0] for p in ir.passes}
    out: set[str] = set()
    todo = list(Pass.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.name in done:
            out |= cls.ensures
    return out


def check_requires(p: Pass, have: set[str], done: list[str]) -> None:
    """A CompileError naming ``p``, the first fact it requires that no pass before it
    ensured, and the pass(es) that would."""
    for fact in sorted(p.requires - have):
        by = _providers(fact)
        raise CompileError(
            f"pass {p.name!r} requires {FACTS.get(fact, fact)}, which no pass before it "
            f"provides (passes before it: {','.join(done) or 'none'}); run "
            f"{' or '.join(by) or 'a pass that ensures ' + repr(fact)} before {p.name!r}."
        )


def run_passes(
    ir: IR,
    passes: Iterable[Pass],
    ctx: PassContext,
    callback: Callable[[Pass, IR], None] | None = None,
) -> IR:
    """Run ``passes`` in order, timing each; ``callback(pass, ir)`` runs after each one.

    Before each pass its ``requires`` are checked against what the passes before it
    ensured. With ``DAGC_VERIFY=1`` (set for the test suite) every pass's result is also
    checked by ``IR.verify()``. An unexpected exception in a pass becomes a CompileError
    naming it and the passes before.
    """
    done: list[str] = list(ir.passes)
    have = _facts_of(ir)
    for p in passes:
        check_requires(p, have, done)
        t0 = time.perf_counter()
        try:
            ir = p.run(ir, ctx)
        except CompileError:
            raise
        except Exception as e:
            raise CompileError(
                f"internal error in pass {p.name!r} (after {','.join(done) or 'nothing'}): "
                f"{type(e).__name__}: {e}. This is a dagc bug; please report it with the DAG."
            ) from e
        ctx.timings[p.name] = time.perf_counter() - t0
        done.append(str(p))
        have |= p.ensures
        ir = ir.replace(passes=tuple(done))
        if config.VERIFY:
            ir.verify()
        if callback is not None:
            callback(p, ir)
    return ir
