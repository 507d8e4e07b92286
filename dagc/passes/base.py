"""What every pass and the pipeline share: :class:`Pass`, :class:`PassContext`, :func:`run_pipeline`.

A pass is a small frozen dataclass with a ``name`` and ``run(ir, ctx) -> IR``; its options
are its fields, so a pipeline prints as a string (``validate,place,channels,overlap``) that
:func:`parse_pipeline` reads back given the registry of pass classes (``dagc.passes.PASSES``).
This module imports no pass: each pass imports it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import InitVar, dataclass, field, fields
from typing import Callable, ClassVar, Mapping, Optional

from dagc import config
from dagc.errors import CompileError
from dagc.ir import IR
from dagc.placement import ActorPlace, Placement


@dataclass
class PassContext:
    """What passes may know about the world: placement facts and compile options.

    Passes read it and never reach out to Ray themselves, so every pass runs without Ray.
    ``placement`` is a :class:`~dagc.placement.Placement`; the older form, a dict
    ``{actor id: (node id, gpu ids)}`` plus ``driver_node=...``, is converted to one.
    """

    placement: Placement = field(default_factory=Placement)
    options: dict = field(default_factory=dict)     # the user's compile options
    timings: dict = field(default_factory=dict)     # pass name -> seconds
    driver_node: InitVar[str] = ""                  # only with the dict form of placement

    def __post_init__(self, driver_node: str) -> None:
        if not isinstance(self.placement, Placement):
            self.placement = Placement(driver_node=driver_node, actors={
                a: ActorPlace(node=node, gpus=tuple(gpus))
                for a, (node, gpus) in (self.placement or {}).items()})
        elif driver_node and not self.placement.driver_node:
            self.placement = dataclasses.replace(self.placement, driver_node=driver_node)


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = "pass"

    def run(self, ir: IR, ctx: PassContext) -> IR:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        opts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                if getattr(self, f.name) != f.default]     # defaults go without saying
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def pipeline_string(passes) -> str:
    return ",".join(str(p) for p in passes)


def parse_pipeline(text: str, registry: Mapping[str, type]) -> tuple[Pass, ...]:
    """Inverse of :func:`pipeline_string`; ``registry`` maps pass names to pass classes."""
    out = []
    for part in _split_top(text):
        name, _, rest = part.partition("{")
        cls = registry.get(name)
        if cls is None:
            raise ValueError(f"unknown pass {name!r}; known: {', '.join(registry)}")
        kwargs = {}
        if rest:
            for kv in rest.rstrip("}").split(","):
                if kv:
                    k, v = kv.split("=", 1)
                    kwargs[k] = _parse_value(v)
        out.append(cls(**kwargs))
    return tuple(out)


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


def _parse_value(v: str):
    if v in ("True", "False"):
        return v == "True"
    try:
        return int(v)
    except ValueError:
        return v


def run_pipeline(ir: IR, passes, ctx: PassContext,
                 callback: Optional[Callable[[Pass, IR], None]] = None) -> IR:
    """Run ``passes`` in order, timing each; ``callback(pass, ir)`` runs after each one.

    With ``DAGC_VERIFY=1`` every pass's result is also checked by ``IR.verify()``. An
    unexpected exception in a pass becomes a CompileError naming it and the passes before.
    """
    done: list[str] = []
    for p in passes:
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
        ir = ir.replace(passes=tuple(done))
        if config.VERIFY:
            ir.verify()
        if callback is not None:
            callback(p, ir)
    return ir
