"""Compiler passes: each a small frozen dataclass with a ``name`` and a ``run(ir, ctx) -> IR``.

A pipeline prints as a string (``validate,place,channels,lower-comm,schedule,overlap``) that
:func:`parse_pipeline` reads back. :func:`run_pipeline` runs the passes in order, times each
one, calls an optional callback between passes (verify, print, dump), and turns an internal
failure into a CompileError that names the failing pass and the ones before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Optional

from dagc.errors import CompileError
from dagc.ir import IR


@dataclass
class PassContext:
    """What passes may know about the world: placement facts and compile options.

    Passes read it and never reach out to Ray themselves, so every pass runs without Ray.
    """

    placement: dict = field(default_factory=dict)   # actor id -> (node id, gpu ids tuple)
    driver_node: str = ""
    options: dict = field(default_factory=dict)     # the user's compile options
    timings: dict = field(default_factory=dict)     # pass name -> seconds


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = "pass"

    def run(self, ir: IR, ctx: PassContext) -> IR:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        opts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def default_pipeline(overlap: bool = False) -> tuple[Pass, ...]:
    from dagc.passes.assign_channels import AssignChannels
    from dagc.passes.lower_comm import LowerComm
    from dagc.passes.overlap_comm import OverlapComm
    from dagc.passes.place_actors import PlaceActors
    from dagc.passes.schedule_ops import ScheduleOps
    from dagc.passes.validate_graph import ValidateGraph
    passes = [ValidateGraph(), PlaceActors(), AssignChannels(), LowerComm(), ScheduleOps()]
    if overlap:
        passes.append(OverlapComm())
    return tuple(passes)


def pipeline_string(passes) -> str:
    return ",".join(str(p) for p in passes)


def parse_pipeline(text: str) -> tuple[Pass, ...]:
    """Inverse of :func:`pipeline_string`."""
    registry = {p.name: type(p) for p in default_pipeline(overlap=True)}
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
        if callback is not None:
            callback(p, ir)
    return ir
