"""What a schedule costs: per-action costs in, per-action times out (predicted, measured).

:class:`Costs` says what each action of a schedule takes, in one unit. An action is named
as its process's column of the schedule names it, with the process in front (bind positions
left out)::

    a1 forward t5           a call (or a collective: a0 allreduce.sum t7)
    a1 recv t2<a0           reading a shared-memory message once it is there
    a0 send t2>a1,a2        writing one
    a1 crecv t3<a0          moving t3's tensors from a0 to a1 once both ends are ready (the
                            transfer of the pair; with overlap too)
    a0 isend t3>a1          issuing a send (overlap); a1 icrecv t3<a0: issuing a receive
    a1 wait t3<a0           after the transfer: making the value (overlap)

A key it does not list costs ``methods[method]`` for a call of that method, else ``call``
(every call and collective), else ``move`` (everything else). ``Costs.uniform()`` - every
call 1, moving nothing - is what a compile assumes unless given ``costs=``: a profile
(``cg.profile(n)``, whose :meth:`costs` are the medians of its executions, in µs), a
:class:`Costs`, or a dict ``{method: cost}`` / ``{action key: cost}``.

:class:`Timing` is when each action of one execution starts and ends: predicted by the
simulator from costs (``dagc.schedule.simulate.predict``) and, after a profile, measured
(the median over the profiled executions); both relative to the execution's start (the
driver's write of the input). From them: makespan, each process's busy and idle time, the
bubble. ``str(schedule)`` shows them per step when costs were given or a profile measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from dagc.ir import DRIVER
from dagc.schedule.action import OP_KINDS, Action

UNIFORM = "uniform"
MEASURED_UNIT = "µs"  # profiles measure in it


def cost_key(proc: str, action: Action) -> str:
    """The name of ``action`` of ``proc``'s column in a :class:`Costs` (see module doc)."""
    if action.kind in OP_KINDS:
        return f"{proc} {action.method} {action.value}"
    return f"{proc} {action}"


def transfer_key(reader: str, value, writer: str) -> str:
    """The name of moving ``value``'s tensors from ``writer`` to ``reader``."""
    return f"{reader} crecv {value}<{writer}"


@dataclass(frozen=True)
class Costs:
    """Per-action costs (see the module doc). Plain data; ``str()`` lists them."""

    actions: Mapping[str, float] = field(default_factory=dict)  # cost_key -> cost
    methods: Mapping[str, float] = field(default_factory=dict)  # method -> cost of a call
    call: float = 1.0  # a call or collective listed nowhere
    move: float = 0.0  # any other action listed nowhere
    unit: str = ""  # "µs" for measured costs; "" for uniform units
    source: str = UNIFORM  # where they come from, said in the schedule

    @classmethod
    def uniform(cls) -> Costs:
        return cls()

    @property
    def is_uniform(self) -> bool:
        return self.source == UNIFORM

    @classmethod
    def of(cls, costs) -> Costs:
        """``costs`` as Costs: None (uniform), a Costs, anything with a ``costs()`` method (a
        Profile), or a dict of method names or action keys (see the module doc) to costs."""
        if costs is None:
            return cls.uniform()
        if isinstance(costs, Costs):
            return costs
        get = getattr(costs, "costs", None)
        if callable(get):
            out = get()
            if isinstance(out, Costs):
                return out
        if isinstance(costs, Mapping):
            actions: dict[str, float] = {}
            methods: dict[str, float] = {}
            for k, v in costs.items():
                if (
                    not isinstance(k, str)
                    or isinstance(v, bool)
                    or not isinstance(v, (int, float))
                    or not v >= 0
                ):
                    raise ValueError(
                        f"costs: {k!r}: {v!r} is no cost; give a number >= 0 "
                        f"per method name or action ('a1 forward t5')"
                    )
                (actions if " " in k else methods)[k] = float(v)
            return cls(
                actions=actions, methods=methods, call=0.0 if methods else 1.0, source="given"
            )
        raise ValueError(
            f"costs must be None, a dagc Profile (cg.profile(n)), a "
            f"dagc.schedule.Costs or a dict {{method: cost}}, got "
            f"{type(costs).__name__}"
        )

    def of_action(self, proc: str, action: Action) -> float:
        if self.actions:  # (uniform costs name no action: no key to build)
            v = self.actions.get(cost_key(proc, action))
            if v is not None:
                return v
        if action.kind in OP_KINDS:
            return self.methods.get(action.method, self.call) if self.methods else self.call
        return self.move

    def of_transfer(self, reader: str, value, writer: str) -> float:
        return self.actions.get(transfer_key(reader, value, writer), self.move)

    def digest(self) -> str:
        """A short stable text of everything here (what a compile's output depends on)."""
        import hashlib
        import json

        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {
            "actions": dict(sorted(self.actions.items())),
            "methods": dict(sorted(self.methods.items())),
            "call": self.call,
            "move": self.move,
            "unit": self.unit,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Costs:
        return cls(
            actions=dict(d.get("actions", {})),
            methods=dict(d.get("methods", {})),
            call=float(d.get("call", 1.0)),
            move=float(d.get("move", 0.0)),
            unit=d.get("unit", ""),
            source=d.get("source", UNIFORM),
        )

    def __str__(self) -> str:
        lines = [
            f"costs ({self.source}{', ' + self.unit if self.unit else ''}): a call "
            f"{_num(self.call)}, a move {_num(self.move)} unless listed"
        ]
        lines += [f"  {k}: {_num(v)}" for k, v in sorted(self.methods.items())]
        lines += [f"  {k}: {_num(v)}" for k, v in sorted(self.actions.items())]
        return "\n".join(lines)


def _num(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"


Span = tuple[float, float]  # (start, end) relative to the execution's start


@dataclass(frozen=True)
class Timing:
    """When each action of one execution runs: ``predicted[proc][i]`` is the (start, end)
    of the i-th action of ``proc``'s column; ``measured`` likewise once profiled (None
    where a profile has no record of it; None in a prediction too, for an action that
    did not run)."""

    predicted: Mapping[str, tuple[Span | None, ...]]
    unit: str = ""
    source: str = UNIFORM  # where the costs came from
    measured: Mapping[str, tuple[Span | None, ...]] | None = None
    measured_source: str = ""  # "median of 20 profiled executions"

    @property
    def shown(self) -> bool:
        """Whether ``str(schedule)`` shows it: costs were given, or a profile measured."""
        return self.source != UNIFORM or self.measured is not None

    def with_measured(self, measured, source: str) -> Timing:
        return replace(self, measured=measured, measured_source=source)

    def to_dict(self) -> dict:
        def cols(m):
            return (
                None
                if m is None
                else {p: [list(s) if s else None for s in v] for p, v in m.items()}
            )

        return {
            "unit": self.unit,
            "source": self.source,
            "predicted": cols(self.predicted),
            "measured": cols(self.measured),
            "measured_source": self.measured_source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Timing:
        def cols(m):
            return (
                None
                if m is None
                else {p: tuple(tuple(s) if s else None for s in v) for p, v in m.items()}
            )

        return cls(
            predicted=cols(d["predicted"]),
            unit=d.get("unit", ""),
            source=d.get("source", UNIFORM),
            measured=cols(d.get("measured")),
            measured_source=d.get("measured_source", ""),
        )


# -- what the times say ------------------------------------------------------------------------
def makespan(sched, times) -> float | None:
    """From the driver's first action's start to its last one's end (the driver's view of
    one execution: input written, every output read)."""
    col = times.get(DRIVER) or ()
    spans = [s for s in col if s]
    if not spans:
        return None
    return max(e for _, e in spans) - min(s for s, _ in spans)


def busy(sched, times, proc: str, methods=None) -> float:
    """Time ``proc`` spends in calls (of ``methods`` only, when given)."""
    out = 0.0
    for (_, a), s in zip(sched.of(proc), times.get(proc) or ()):
        if s and a.kind in OP_KINDS and (methods is None or a.method in methods):
            out += s[1] - s[0]
    return out


def bubble(sched, times, methods=None) -> float | None:
    """1 - busy / (P x span) over the P processes that make calls (of ``methods``), with
    span from the first such call's start to the last one's end: the share of the
    pipeline's time its stages spend not computing (the (P-1)/(M+P-1) of GPipe and 1F1B)."""
    procs, starts, ends, total = 0, [], [], 0.0
    for p in sched.actors:
        col = times.get(p) or ()
        spans = [
            s
            for (_, a), s in zip(sched.of(p), col)
            if s and a.kind in OP_KINDS and (methods is None or a.method in methods)
        ]
        if not spans:
            continue
        procs += 1
        starts.append(min(s for s, _ in spans))
        ends.append(max(e for _, e in spans))
        total += sum(e - s for s, e in spans)
    if not procs:
        return None
    span = max(ends) - min(starts)
    return 1.0 - total / (procs * span) if span > 0 else 0.0


def timing_table(sched, timing: Timing) -> str:
    """Per step and process: predicted start and duration, measured beside them."""
    unit = timing.unit or "units"
    meas = timing.measured
    heads = ["step", "process", "action", "pred start", "pred dur"]
    if meas is not None:
        heads += ["meas start", "meas dur"]
    rows = []
    for p in sched.actors:
        pred = timing.predicted.get(p) or ()
        got = (meas or {}).get(p) or ()
        for i, (step, a) in enumerate(sched.of(p)):
            s = pred[i] if i < len(pred) else None
            row = [str(step), sched.label(p), str(a)]
            row += [_t(s[0]), _t(s[1] - s[0])] if s else ["-", "-"]
            if meas is not None:
                m = got[i] if i < len(got) else None
                row += [_t(m[0]), _t(m[1] - m[0])] if m else ["-", "-"]
            rows.append((step, row))
    rows.sort(key=lambda r: r[0])  # stable: process order within a step
    body = [r for _, r in rows]
    widths = [max(len(r[i]) for r in [heads] + body) for i in range(len(heads))]
    right = set(range(3, len(heads))) | {0}
    fmt = lambda r: "  ".join(
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    what = (
        f"predicted from {timing.source} costs"
        if timing.source == UNIFORM
        else f"predicted from {timing.source}"
    )
    if meas is not None:
        what += f"; measured: {timing.measured_source}"
        if timing.unit != MEASURED_UNIT:
            unit = (
                f"predicted in {unit}, measured in {MEASURED_UNIT}: compile with "
                f"costs=<the profile> to predict in {MEASURED_UNIT}"
            )
    out = [
        f"timing ({unit}, from the start of one execution; {what}):",
        fmt(heads),
        fmt(["-" * w for w in widths]),
    ] + [fmt(r) for r in body]
    out.append(summary_line(sched, timing))
    return "\n".join(out)


def summary_line(sched, timing: Timing) -> str:
    """Makespan, idle share per process and bubble: predicted (and measured)."""
    unit = f" {timing.unit}" if timing.unit else ""
    pm = makespan(sched, timing.predicted)
    parts = [f"makespan: predicted {_t(pm)}{unit}"]
    mm = makespan(sched, timing.measured) if timing.measured is not None else None
    if mm is not None:
        same = timing.unit == MEASURED_UNIT
        diff = f" ({(pm - mm) / mm:+.0%})" if same and pm is not None and mm else ""
        parts[0] += f", measured {_t(mm)} {MEASURED_UNIT}{diff}"
    idle = []
    for p in sched.actors:
        if p == DRIVER or not any(a.kind in OP_KINDS for _, a in sched.of(p)):
            continue
        one = f"{p} {_share(pm, busy(sched, timing.predicted, p))}"
        if mm is not None:
            one += f"/{_share(mm, busy(sched, timing.measured, p))}"
        idle.append(one)
    if idle:
        parts.append(
            "idle " + ("(predicted/measured) " if mm is not None else "") + ", ".join(idle)
        )
    b = bubble(sched, timing.predicted)
    if b is not None:
        s = f"bubble {b:.3f}"
        if timing.measured is not None:
            mb = bubble(sched, timing.measured)
            if mb is not None:
                s += f"/{mb:.3f}"
        parts.append(s)
    return "; ".join(parts)


def _share(span, busy_time) -> str:
    if not span:
        return "-"
    return f"{max(0.0, 1 - busy_time / span):.0%}"


def _t(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.1f}" if abs(v) < 1e4 else f"{v:,.0f}"
