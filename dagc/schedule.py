"""The schedule: per-actor ordered action lists plus channel specs. Plain data.

An action prints compactly, the way a person reads a schedule table::

    recv t2<a0        read value t2 from a0 through a channel
    fwd t3            call method fwd, producing t3
    send t3>a1,a2     write t3 into its channel (readers a1, a2)
    csend t3>a1       send t3's tensors through the communicator to a1
    crecv t3<a0       receive t3's tensors through the communicator from a0
    allreduce.sum t5  one participant's part of a collective (group in the JSON form)
    icrecv t3<a0      overlap: issue a receive early ...
    wait t3<a0        ... and wait for it just before first use (assigns t3)
    isend t3>a1       overlap: issue a send ...
    wait t3>a1,a2     ... and wait for the sends of t3 to a1 and a2 (end of the execution)

A call shows its bind position, ``fwd t3 (bind 1)``, in the column of an actor whose bind
order differs from the order of its op ids (so the table says why t3 runs before t2).

``str(schedule)`` is the Step x Actor table. ``to_json``/``from_json`` and
``to_csv``/``from_csv`` round-trip every field; the table is for reading only.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Optional

from dagc.ir import ChannelSpec, Ref, bind_reordered

READ, CALL, WRITE, CSEND, CRECV, COLL, ICRECV, ISEND, WAIT_RECV, WAIT_SEND = (
    "recv", "call", "send", "csend", "crecv", "coll", "icrecv", "isend", "wait_recv",
    "wait_send")
ACTION_KINDS = (READ, CALL, WRITE, CSEND, CRECV, COLL, ICRECV, ISEND, WAIT_RECV, WAIT_SEND)
COMM_KINDS = (CSEND, CRECV, COLL, ICRECV, ISEND)


@dataclass(frozen=True)
class Action:
    step: int
    actor: str
    kind: str
    value: str                                  # the value produced/moved ("t3", "t3.1", "in")
    method: str = ""                            # CALL/COLL: method name
    args: tuple[str, ...] = ()                  # CALL/COLL: argument refs
    kwargs: tuple[tuple[str, str], ...] = ()
    peers: tuple[str, ...] = ()                 # READ/CRECV/ICRECV/WAIT_RECV: the writer;
                                                # WRITE/CSEND/ISEND: readers; WAIT_SEND: the
                                                # readers whose isends of value it waits for
    channel: str = ""                           # channel id of the moved value
    group: str = ""                             # collective group id
    num_returns: int = 1
    bind: int = -1                              # CALL/COLL: position in its actor's bind order

    def __str__(self) -> str:
        if self.kind in (CALL, COLL):
            return f"{self.method} {self.value}"
        if self.kind in (READ, CRECV, ICRECV):
            return f"{self.kind} {self.value}<{','.join(self.peers)}"
        if self.kind in (WRITE, CSEND, ISEND):
            return f"{self.kind} {self.value}>{','.join(self.peers)}"
        if self.kind == WAIT_RECV:
            return f"wait {self.value}<{','.join(self.peers)}"
        if self.kind == WAIT_SEND:
            return f"wait {self.value}>{','.join(self.peers)}"
        return f"{self.kind} {self.value}"

    def detail(self) -> str:
        """The full form: what the generated code does for this action."""
        if self.kind in (CALL, COLL):
            parts = list(self.args) + [f"{k}={v}" for k, v in self.kwargs]
            ret = f" -> {self.num_returns}" if self.num_returns != 1 else ""
            grp = f" [{self.group}]" if self.group else ""
            return f"{self.value} = {self.method}({', '.join(parts)}){ret}{grp}"
        ch = f" via {self.channel}" if self.channel else ""
        return f"{self}{ch}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["args"] = list(self.args)
        d["kwargs"] = [list(kv) for kv in self.kwargs]
        d["peers"] = list(self.peers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Action":
        d = dict(d)
        if d.get("kind") not in ACTION_KINDS:
            raise ValueError(f"unknown schedule action kind {d.get('kind')!r}; known: "
                             f"{', '.join(ACTION_KINDS)}")
        d["args"] = tuple(d.get("args", ()))
        d["kwargs"] = tuple(tuple(kv) for kv in d.get("kwargs", ()))
        d["peers"] = tuple(d.get("peers", ()))
        return cls(**d)


@dataclass(frozen=True)
class Schedule:
    """Per-actor ordered actions (the driver is the column "driver") and channel specs."""

    actors: tuple[str, ...]                              # column order, driver first
    actions: dict = field(default_factory=dict)          # actor -> tuple[Action, ...]
    channels: tuple[ChannelSpec, ...] = ()
    labels: dict = field(default_factory=dict)           # actor -> "a0:Stage"
    simulated_steps: Optional[int] = None                # set by the deadlock simulator

    def __eq__(self, other) -> bool:
        return (isinstance(other, Schedule) and self.actors == other.actors
                and {k: tuple(v) for k, v in self.actions.items()}
                == {k: tuple(v) for k, v in other.actions.items()}
                and tuple(self.channels) == tuple(other.channels)
                and self.labels == other.labels)

    def __hash__(self):  # pragma: no cover - schedules are not dict keys
        return hash(self.actors)

    def of(self, actor: str) -> tuple[Action, ...]:
        return tuple(self.actions.get(actor, ()))

    @property
    def num_steps(self) -> int:
        return 1 + max((a.step for acts in self.actions.values() for a in acts), default=-1)

    def channel(self, cid: str) -> ChannelSpec:
        for c in self.channels:
            if c.id == cid:
                return c
        raise KeyError(cid)

    # -- text ----------------------------------------------------------------------------
    def table(self, mark: dict | None = None) -> str:
        """The Step x Actor table. ``mark`` maps (actor, step) -> note, shown as '<-- note'."""
        mark = mark or {}
        cols = list(self.actors)
        heads = ["step"] + [self.labels.get(a, a) for a in cols]
        grid = self.cells()
        rows = []
        for s in range(self.num_steps):
            row = [str(s)]
            for a in cols:
                cell = "; ".join(text for _, text in grid.get((s, a), []))
                if (a, s) in mark:
                    cell = (cell + "  " if cell else "") + "<-- " + mark[(a, s)]
                row.append(cell)
            rows.append(row)
        widths = [max(len(r[i]) for r in [heads] + rows) for i in range(len(heads))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out = [fmt(heads), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        return "\n".join(out)

    def cells(self) -> dict[tuple[int, str], list[tuple[Action, str]]]:
        """(step, actor) -> [(action, its text as the table shows it)] at that cell."""
        grid: dict[tuple[int, str], list[tuple[Action, str]]] = {}
        shown = _bind_shown(self)
        for a in self.actors:
            for act in self.of(a):
                text = str(act)
                if a in shown and act.kind in (CALL, COLL) and act.bind >= 0:
                    text += f" (bind {act.bind})"
                grid.setdefault((act.step, a), []).append((act, text))
        return grid

    def channels_table(self) -> str:
        return "\n".join(str(c) for c in self.channels)

    def __str__(self) -> str:
        s = self.table()
        if self.channels:
            s += "\n\nchannels:\n" + "\n".join("  " + str(c) for c in self.channels)
        return s

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "dagc.schedule/1",
            "actors": list(self.actors),
            "labels": {a: self.labels.get(a, a) for a in self.actors},
            "actions": {a: [x.to_dict() for x in self.of(a)] for a in self.actors},
            "channels": [dataclasses.asdict(c) | {"value": str(c.value),
                                                  "readers": list(c.readers)}
                         for c in self.channels],
            "simulated_steps": self.simulated_steps,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        chans = tuple(ChannelSpec(**(c | {"value": Ref.parse(c["value"]),
                                          "readers": tuple(c["readers"])}))
                      for c in d["channels"])
        return cls(actors=tuple(d["actors"]),
                   actions={a: tuple(Action.from_dict(x) for x in xs)
                            for a, xs in d["actions"].items()},
                   channels=chans, labels=dict(d.get("labels", {})),
                   simulated_steps=d.get("simulated_steps"))

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        return cls.from_dict(json.loads(text))

    # -- CSV -----------------------------------------------------------------------------
    _CSV_FIELDS = ("record", "actor", "label", "step", "kind", "value", "method", "args",
                   "kwargs", "peers", "channel", "group", "num_returns", "bind", "writer",
                   "readers", "transport", "buffer_size", "slots", "communicator", "carrier")

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self._CSV_FIELDS, lineterminator="\n")
        w.writeheader()
        for a in self.actors:
            w.writerow({"record": "actor", "actor": a, "label": self.labels.get(a, a)})
        for a in self.actors:
            for x in self.of(a):
                w.writerow({"record": "action", "actor": a, "step": x.step, "kind": x.kind,
                            "value": x.value, "method": x.method, "args": " ".join(x.args),
                            "kwargs": " ".join(f"{k}={v}" for k, v in x.kwargs),
                            "peers": " ".join(x.peers), "channel": x.channel,
                            "group": x.group, "num_returns": x.num_returns,
                            "bind": x.bind})
        for c in self.channels:
            w.writerow({"record": "channel", "channel": c.id, "value": c.value,
                        "writer": c.writer, "readers": " ".join(c.readers),
                        "transport": c.transport, "buffer_size": c.buffer_size,
                        "slots": c.slots, "communicator": c.communicator,
                        "carrier": c.carrier})
        return buf.getvalue()

    @classmethod
    def from_csv(cls, text: str) -> "Schedule":
        actors, labels, actions, chans = [], {}, {}, []
        split = lambda s: tuple(s.split(" ")) if s else ()
        for r in csv.DictReader(io.StringIO(text)):
            if r["record"] == "actor":
                actors.append(r["actor"])
                labels[r["actor"]] = r["label"]
            elif r["record"] == "action":
                actions.setdefault(r["actor"], []).append(Action.from_dict(dict(
                    step=int(r["step"]), actor=r["actor"], kind=r["kind"], value=r["value"],
                    method=r["method"], args=split(r["args"]),
                    kwargs=tuple(tuple(kv.split("=", 1)) for kv in split(r["kwargs"])),
                    peers=split(r["peers"]), channel=r["channel"], group=r["group"],
                    num_returns=int(r["num_returns"]), bind=int(r.get("bind") or -1))))
            elif r["record"] == "channel":
                chans.append(ChannelSpec(id=r["channel"], value=Ref.parse(r["value"]),
                                         writer=r["writer"],
                                         readers=split(r["readers"]),
                                         transport=r["transport"],
                                         buffer_size=int(r["buffer_size"]),
                                         slots=int(r["slots"]),
                                         communicator=r.get("communicator") or "",
                                         carrier=r.get("carrier") or "shm"))
        return cls(actors=tuple(actors), actions={a: tuple(v) for a, v in actions.items()},
                   channels=tuple(chans), labels=labels)

    def _repr_html_(self) -> str:
        from dagc.inspect.html import schedule_html
        return schedule_html(self)


def _bind_shown(sched: Schedule) -> set[str]:
    """Actors whose bind order is not their op-id order: their calls show ``(bind k)``."""
    return bind_reordered((p, x.value, x.bind) for p in sched.actors for x in sched.of(p)
                          if x.kind in (CALL, COLL))
