"""The schedule: per-process columns of (step, action), the calls they make, the channels.

``str(schedule)`` is the Step x Actor table, then the calls and channels sections::

    step  driver      a0:Stage        a1:Stage
    ----  ----------  --------------  --------------
    0     send in>a0
    1                 recv in<driver
    2                 fwd t0
    3                 send t0>a1
    4                                 recv t0<a0
    ...

    calls:
      t0 = fwd($0)
      t1 = fwd(t0)

    channels:
      c0: in driver -> a0 [shm, 8 x 1048576 B]
      ...

and :meth:`Schedule.from_table` reads it back: ``Schedule.from_table(str(s)) == s``.
``to_json``/``from_json`` and ``to_csv``/``from_csv`` round-trip it too. The column
headers are the actors' labels ("a0:Stage"; the id is the part before the colon). The
channel an action uses is the one its channels section names for the value and the
process (one channel per value and reader): :meth:`channel_of`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from dagc.ir import ChannelSpec, Ref
from dagc.schedule.action import OP_KINDS, RECV_KINDS, Action, Call, Entry
from dagc.schedule.check import problems as _problems
from dagc.schedule.costs import Timing, timing_table

FORMAT = "dagc.schedule/2"


@dataclass(frozen=True, eq=False)
class Schedule:
    """Per-process columns (the driver is the column "driver"), calls and channel specs."""

    actors: tuple[str, ...]  # column order, driver first
    actions: Mapping[str, tuple[Entry, ...]] = field(default_factory=dict)
    calls: tuple[Call, ...] = ()  # one per CALL/COLL value
    channels: tuple[ChannelSpec, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)  # actor -> "a0:Stage"
    simulated_steps: int | None = None  # set by the deadlock simulator
    # when each action runs: predicted by the simulator from the compile's costs, and
    # measured once the compiled DAG was profiled (not part of equality)
    timing: Timing | None = None

    def __post_init__(self):
        # columns may be given as lists of Entries
        if any(type(v) is not tuple for v in self.actions.values()):
            object.__setattr__(self, "actions", {a: tuple(v) for a, v in self.actions.items()})

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Schedule)
            and self.actors == other.actors
            and {a: self.of(a) for a in self.actors} == {a: other.of(a) for a in other.actors}
            and tuple(self.calls) == tuple(other.calls)
            and tuple(self.channels) == tuple(other.channels)
            and [self.label(a) for a in self.actors] == [other.label(a) for a in other.actors]
        )

    def __hash__(self):  # pragma: no cover - schedules are not dict keys
        return hash(self.actors)

    # -- lookups -------------------------------------------------------------------------
    def of(self, actor: str) -> tuple[Entry, ...]:
        return self.actions.get(actor, ())

    def label(self, actor: str) -> str:
        return self.labels.get(actor, actor)

    @property
    def num_steps(self) -> int:
        return 1 + max((e.step for col in self.actions.values() for e in col), default=-1)

    def call(self, value: Ref) -> Call:
        """The call that produces ``value`` (a CALL or COLL action's value)."""
        return self._calls[value]

    def channel_of(self, actor: str, action: Action) -> ChannelSpec:
        """The channel ``action`` of ``actor``'s column moves its value through."""
        key: tuple[Ref, str] | tuple[Ref, str, str]
        if action.kind in RECV_KINDS:
            key = (action.value, actor)
        else:
            key = (action.value, actor, action.peers[0] if action.peers else "")
        try:
            return self._channel_index[key]
        except KeyError:
            raise KeyError(f"no channel carries {action.value} for {actor}'s '{action}'") from None

    def problems(self) -> list[tuple[str, int, str]]:
        """(actor, step, problem) for each way the schedule is not well-formed (see
        :mod:`dagc.schedule.check`); empty when it is."""
        return _problems(self)

    def detail(self, actor: str, action: Action) -> str:
        """The full form of an action: ``t3 = fwd(t2, #0)`` or ``recv t2<a0 via c1``."""
        if action.kind in OP_KINDS:
            grp = f" [{action.group}]" if action.group else ""
            return f"{self.call(action.value)}{grp}"
        return f"{action} via {self.channel_of(actor, action).id}"

    @functools.cached_property
    def _calls(self) -> dict[Ref, Call]:
        return {c.value: c for c in self.calls}

    @functools.cached_property
    def _channel_index(self) -> dict[tuple, ChannelSpec]:
        out: dict[tuple, ChannelSpec] = {}
        for c in self.channels:
            for r in c.readers:
                out[(c.value, r)] = c
                out[(c.value, c.writer, r)] = c
        return out

    # -- text ----------------------------------------------------------------------------
    def table(self, mark: dict | None = None) -> str:
        """The Step x Actor table. ``mark`` maps (actor, step) -> note, shown as '<-- note'."""
        mark = mark or {}
        cols = list(self.actors)
        heads = ["step"] + [self.label(a) for a in cols]
        grid = self.cells()
        rows = []
        for s in range(self.num_steps):
            row = [str(s)]
            for a in cols:
                cell = "; ".join(str(x) for x in grid.get((s, a), []))
                if (a, s) in mark:
                    cell = (cell + "  " if cell else "") + "<-- " + mark[(a, s)]
                row.append(cell)
            rows.append(row)
        widths = [max(len(r[i]) for r in [heads] + rows) for i in range(len(heads))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out = [fmt(heads), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        return "\n".join(out)

    def cells(self) -> dict[tuple[int, str], list[Action]]:
        """(step, actor) -> the actions at that cell, in column order."""
        grid: dict[tuple[int, str], list[Action]] = {}
        for a in self.actors:
            for step, act in self.of(a):
                grid.setdefault((step, a), []).append(act)
        return grid

    def __str__(self) -> str:
        s = self.table()
        if self.calls:
            s += "\n\ncalls:\n" + "\n".join("  " + str(c) for c in self.calls)
        if self.channels:
            s += "\n\nchannels:\n" + "\n".join("  " + str(c) for c in self.channels)
        if self.timing is not None and self.timing.shown:
            s += "\n\n" + self.timing_table()
        return s

    def timing_table(self) -> str:
        """Per step: each action's predicted start and duration (and measured ones after a
        profile), then makespan, idle shares and bubble (see dagc.schedule.costs)."""
        if self.timing is None:
            return "timing: none (this schedule was not simulated with costs)"
        return timing_table(self, self.timing)

    @classmethod
    def from_table(cls, text: str) -> Schedule:
        """Inverse of ``str()``: the table, then the calls and channels sections."""
        lines = text.strip("\n").split("\n")
        if len(lines) < 2 or not lines[1].startswith("----"):
            raise ValueError(
                "not a schedule table: expected a header line and a line of dashes under it"
            )
        starts = [
            i for i, ch in enumerate(lines[1]) if ch == "-" and (i == 0 or lines[1][i - 1] == " ")
        ]
        spans = list(zip(starts, starts[1:] + [None]))
        labels = [lines[0][a:b].strip() for a, b in spans[1:]]
        actors = tuple(lb.partition(":")[0] for lb in labels)
        columns: dict[str, list] = {a: [] for a in actors}
        i = 2
        while i < len(lines) and lines[i].strip():
            row = lines[i]
            step = int(row[: starts[1]] if len(starts) > 1 else row)
            for actor, (a, b) in zip(actors, spans[1:]):
                cell = row[a:b].strip()
                for part in cell.split("; ") if cell else ():
                    columns[actor].append(Entry(step, Action.parse(part)))
            i += 1
        sections: dict[str, list[str]] = {"calls:": [], "channels:": []}
        current = None
        for line in lines[i:]:
            if line.startswith("timing"):  # the timing section: for reading only
                break
            if line in sections:
                current = sections[line]
            elif line.startswith("  ") and current is not None:
                current.append(line[2:])
            elif line.strip():
                raise ValueError(f"unexpected line in a schedule table: {line!r}")
        return cls(
            actors=actors,
            actions={a: tuple(v) for a, v in columns.items() if v},
            calls=tuple(Call.parse(x) for x in sections["calls:"]),
            channels=tuple(ChannelSpec.parse(x) for x in sections["channels:"]),
            labels=dict(zip(actors, labels)),
        )

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "actors": list(self.actors),
            "labels": {a: self.label(a) for a in self.actors},
            "actions": {
                a: [{"step": s, **x.to_dict()} for s, x in self.of(a)] for a in self.actors
            },
            "calls": [c.to_dict() for c in self.calls],
            "channels": [_channel_dict(c) for c in self.channels],
            "simulated_steps": self.simulated_steps,
            "timing": self.timing.to_dict() if self.timing is not None else None,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        if d.get("format") != FORMAT:
            raise ValueError(
                f"schedule format {d.get('format')!r} is not {FORMAT!r} (written "
                f"by another dagc version); write the schedule again"
            )
        return cls(
            actors=tuple(d["actors"]),
            actions={
                a: tuple(Entry(int(x["step"]), Action.from_dict(x)) for x in xs)
                for a, xs in d["actions"].items()
            },
            calls=tuple(Call.from_dict(c) for c in d.get("calls", ())),
            channels=tuple(_channel_from(c) for c in d["channels"]),
            labels=dict(d.get("labels", {})),
            simulated_steps=d.get("simulated_steps"),
            timing=Timing.from_dict(d["timing"]) if d.get("timing") else None,
        )

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls.from_dict(json.loads(text))

    # -- CSV -----------------------------------------------------------------------------
    _CSV_FIELDS = (
        "record",
        "actor",
        "label",
        "step",
        "kind",
        "value",
        "method",
        "group",
        "peers",
        "bind",
        "args",
        "kwargs",
        "num_returns",
        "channel",
        "writer",
        "readers",
        "transport",
        "buffer_size",
        "slots",
        "communicator",
        "carrier",
    )

    def to_csv(self) -> str:
        """One row per actor, action, call and channel ("record" says which)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self._CSV_FIELDS, lineterminator="\n")
        w.writeheader()
        for a in self.actors:
            w.writerow({"record": "actor", "actor": a, "label": self.label(a)})
        for a in self.actors:
            for step, x in self.of(a):
                w.writerow(
                    {"record": "action", "actor": a, "step": step}
                    | x.to_dict()
                    | {"peers": " ".join(x.peers)}
                )
        for c in self.calls:
            w.writerow(
                {"record": "call"}
                | c.to_dict()
                | {
                    "args": " ".join(map(str, c.args)),
                    "kwargs": " ".join(f"{k}={v}" for k, v in c.kwargs),
                }
            )
        for ch in self.channels:
            row = {k: v for k, v in _channel_dict(ch).items() if k != "id"}
            w.writerow(
                {"record": "channel", "channel": ch.id} | row | {"readers": " ".join(ch.readers)}
            )
        return buf.getvalue()

    @classmethod
    def from_csv(cls, text: str) -> Schedule:
        actors: list[str] = []
        labels: dict[str, str] = {}
        actions: dict[str, list[Entry]] = {}
        calls: list[Call] = []
        chans: list[ChannelSpec] = []
        split = lambda s: s.split(" ") if s else []
        for r in csv.DictReader(io.StringIO(text)):
            if r["record"] == "actor":
                actors.append(r["actor"])
                labels[r["actor"]] = r["label"]
            elif r["record"] == "action":
                actions.setdefault(r["actor"], []).append(
                    Entry(
                        int(r["step"]),
                        Action.from_dict(
                            r | {"peers": split(r["peers"]), "bind": int(r["bind"] or -1)}
                        ),
                    )
                )
            elif r["record"] == "call":
                calls.append(
                    Call.from_dict(
                        r
                        | {
                            "args": split(r["args"]),
                            "num_returns": int(r["num_returns"]),
                            "kwargs": [kv.split("=", 1) for kv in split(r["kwargs"])],
                        }
                    )
                )
            elif r["record"] == "channel":
                chans.append(
                    _channel_from(r | {"id": r["channel"], "readers": split(r["readers"])})
                )
        return cls(
            actors=tuple(actors),
            actions={a: tuple(col) for a, col in actions.items()},
            calls=tuple(calls),
            channels=tuple(chans),
            labels=labels,
        )

    def _repr_html_(self) -> str:
        from dagc.schedule.html import schedule_html

        return schedule_html(self)


def _channel_dict(c: ChannelSpec) -> dict:
    return {
        "id": c.id,
        "value": str(c.value),
        "writer": c.writer,
        "readers": list(c.readers),
        "transport": c.transport,
        "buffer_size": c.buffer_size,
        "slots": c.slots,
        "communicator": c.communicator,
        "carrier": c.carrier,
    }


def _channel_from(d: dict) -> ChannelSpec:
    return ChannelSpec(
        id=d["id"],
        value=Ref.parse(d["value"]),
        writer=d["writer"],
        readers=tuple(d["readers"]),
        transport=d["transport"],
        buffer_size=int(d["buffer_size"]),
        slots=int(d["slots"]),
        communicator=d.get("communicator") or "",
        carrier=d.get("carrier") or "shm",
    )
