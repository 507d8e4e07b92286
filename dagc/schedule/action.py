"""Schedule actions: what one process does at one step, printed compactly and parsed back.

An action prints the way a person reads a schedule table, and :meth:`Action.parse` is the
exact inverse (``Action.parse(str(a)) == a``)::

    recv t2<a0          RECV      read value t2 written by a0 (through a channel)
    fwd t3              CALL      call method fwd, producing t3
    fwd t3 (bind 1)     CALL      ... at bind position 1 (shown where bind order matters)
    allreduce.sum t5 [g0]  COLL   one participant's part of collective g0
    send t3>a1,a2       SEND      write t3 into its channel, read by a1 and a2
    csend t3>a1         CSEND     send t3's tensors through the communicator to a1
    crecv t3<a0         CRECV     receive t3's tensors through the communicator from a0
    icrecv t3<a0        ICRECV    overlap: issue a receive early ...
    wait t3<a0          WAIT_RECV ... and wait for it just before first use (assigns t3)
    isend t3>a1         ISEND     overlap: issue a send ...
    wait t3>a1,a2       WAIT_SEND ... and wait for the sends of t3 to a1 and a2

Neither the step nor the process is part of an action: the table's row and column give
them (a :class:`Schedule` holds per-process tuples of :class:`Entry` ``(step, action)``).
Nor are a call's arguments or the channel a value moves through: the schedule's calls
section (:class:`Call`) and channels section say those, once per op and per channel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from dagc.ir import Arg, Ref


class Kind(str, Enum):
    """What an action does. A str: ``a.kind == "recv"`` holds, JSON writes ``"recv"``."""

    RECV = "recv"
    CALL = "call"
    SEND = "send"
    CSEND = "csend"
    CRECV = "crecv"
    COLL = "coll"
    ICRECV = "icrecv"
    ISEND = "isend"
    WAIT_RECV = "wait_recv"
    WAIT_SEND = "wait_send"

    __str__ = str.__str__
    __format__ = str.__format__  # type: ignore[assignment]  # a Kind is a str: its format

    @classmethod
    def parse(cls, text: str) -> Kind:
        try:
            return cls(text)
        except ValueError:
            raise ValueError(
                f"unknown schedule action kind {text!r}; known: {', '.join(k.value for k in cls)}"
            ) from None


OP_KINDS = frozenset({Kind.CALL, Kind.COLL})  # run a method of the actor
RECV_KINDS = frozenset({Kind.RECV, Kind.CRECV, Kind.ICRECV, Kind.WAIT_RECV})  # v<writer
SEND_KINDS = frozenset({Kind.SEND, Kind.CSEND, Kind.ISEND, Kind.WAIT_SEND})  # v>readers
COMM_KINDS = frozenset({Kind.CSEND, Kind.CRECV, Kind.COLL, Kind.ICRECV, Kind.ISEND})
_WORD = {
    k: ("wait" if k in (Kind.WAIT_RECV, Kind.WAIT_SEND) else k.value)
    for k in RECV_KINDS | SEND_KINDS
}
_MOVE = re.compile(r"(recv|send|csend|crecv|icrecv|isend|wait) (\S+?)([<>])([^\s<>]*)")
_OP = re.compile(r"(\S+) (\S+?)(?: \[(\w+)\])?(?: \(bind (\d+)\))?")


@dataclass(frozen=True)
class Action:
    """One cell of the schedule: a method call or a move of a value (``"fwd t1 (bind 0)"``,
    ``"send t1>a2,a3"``). ``str()`` prints it as the table does; ``Action.parse`` reads it back."""

    kind: Kind
    value: Ref  # the value produced (CALL/COLL) or moved
    method: str = ""  # CALL/COLL: the method ("fwd", "allreduce.sum")
    group: str = ""  # COLL: the collective group ("g0")
    peers: tuple[str, ...] = ()  # RECV_KINDS: the writer; SEND_KINDS: the readers
    # (WAIT_SEND: those whose isends of value it awaits)
    bind: int = -1  # CALL/COLL: bind position, where the table shows it

    def __post_init__(self):
        if type(self.kind) is not Kind:
            object.__setattr__(self, "kind", Kind.parse(self.kind))

    def __str__(self) -> str:
        k = self.kind
        if k in OP_KINDS:
            s = f"{self.method} {self.value}"
            if k is Kind.COLL:
                s += f" [{self.group}]"
            return s + (f" (bind {self.bind})" if self.bind >= 0 else "")
        arrow = "<" if k in RECV_KINDS else ">"
        return f"{_WORD[k]} {self.value}{arrow}{','.join(self.peers)}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Inverse of ``str()``; ValueError naming the text if it is no action."""
        m = _MOVE.fullmatch(text)
        if m is not None:
            word, value, arrow, peers = m.groups()
            if word == "wait":
                kind = Kind.WAIT_RECV if arrow == "<" else Kind.WAIT_SEND
            else:
                kind = Kind(word)
                if (kind in RECV_KINDS) != (arrow == "<"):
                    raise ValueError(
                        f"bad schedule action {text!r}: {word} takes "
                        f"{'<' if kind in RECV_KINDS else '>'}"
                    )
            return cls(kind, Ref.parse(value), peers=tuple(peers.split(",")) if peers else ())
        m = _OP.fullmatch(text)
        if m is None:
            raise ValueError(
                f"bad schedule action {text!r}: expected 'method value' or "
                f"'recv|send|... value<peer' / 'value>peers'"
            )
        method, value, group, bind = m.groups()
        return cls(
            Kind.COLL if group else Kind.CALL,
            Ref.parse(value),
            method=method,
            group=group or "",
            bind=int(bind) if bind else -1,
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind.value,
            "value": str(self.value),
            "method": self.method,
            "group": self.group,
            "peers": list(self.peers),
            "bind": self.bind,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Action:
        return cls(
            Kind.parse(d["kind"]),
            Ref.parse(d["value"]),
            method=d.get("method", ""),
            group=d.get("group", ""),
            peers=tuple(d.get("peers", ())),
            bind=int(d.get("bind", -1)),
        )


class Entry(NamedTuple):
    """One action of a process's column and the step (table row) it sits at."""

    step: int
    action: Action

    def __str__(self) -> str:
        return str(self.action)


_CALL = re.compile(r"(\S+) = (\S+)\((.*)\)(?: -> (\d+))?")


@dataclass(frozen=True)
class Call:
    """What a CALL or COLL action computes, listed once in the schedule's calls section::

    t3 = fwd(t2, #0, k=$1)
    t5 = pair(t4) -> 2
    """

    value: Ref
    method: str
    args: tuple[Arg, ...] = ()
    kwargs: tuple[tuple[str, Arg], ...] = ()
    num_returns: int = 1

    def refs(self) -> tuple[Arg, ...]:
        return (*self.args, *(v for _, v in self.kwargs))

    def __str__(self) -> str:
        parts = [str(a) for a in self.args] + [f"{k}={v}" for k, v in self.kwargs]
        ret = f" -> {self.num_returns}" if self.num_returns != 1 else ""
        return f"{self.value} = {self.method}({', '.join(parts)}){ret}"

    @classmethod
    def parse(cls, text: str) -> Call:
        m = _CALL.fullmatch(text)
        if m is None:
            raise ValueError(f"bad call {text!r}: expected 'value = method(args)'")
        value, method, inner, nret = m.groups()
        args, kwargs = [], []
        for part in inner.split(", ") if inner else ():
            key, eq, arg = part.partition("=")
            if eq:
                kwargs.append((key, Arg.parse(arg)))
            else:
                args.append(Arg.parse(part))
        return cls(Ref.parse(value), method, tuple(args), tuple(kwargs), int(nret) if nret else 1)

    def to_dict(self) -> dict:
        return {
            "value": str(self.value),
            "method": self.method,
            "args": [str(a) for a in self.args],
            "kwargs": [[k, str(v)] for k, v in self.kwargs],
            "num_returns": self.num_returns,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Call:
        return cls(
            Ref.parse(d["value"]),
            d["method"],
            tuple(Arg.parse(a) for a in d.get("args", ())),
            tuple((k, Arg.parse(v)) for k, v in d.get("kwargs", ())),
            int(d.get("num_returns", 1)),
        )
