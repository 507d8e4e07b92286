"""Names of values and processes, and the one order of each: the notation every part shares.

An op's argument is an :class:`Arg`, one of::

    t3      Ref("t3")        the value of op t3
    t3.1    Ref("t3", 1)     element 1 of op t3's return tuple (``num_returns > 1``)
    $0      Field(0)         input field 0 (``inp``, ``inp[i]`` or ``inp["key"]``, see InputSpec)
    #2      Const(2)         constant 2 of the side table

A value that moves between processes is a :class:`Ref`; the driver's input moves as one
value, :data:`INPUT` (printed ``in``: the "in" channel). ``Arg.parse(str(a)) == a``.
Processes are :data:`DRIVER` and actor ids "a0", "a1", ...; ops are of kind :data:`CALL`
or :data:`COLLECTIVE`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # Arg is a protocol to a type checker, an ABC at run time (see Arg)
    from typing import Protocol as _ArgBase
else:
    from abc import ABC as _ArgBase

DRIVER = "driver"  # the driver's process name, beside actor ids "a0", "a1", ...

# Op kinds: a closed set.
CALL = "call"  # actor method call
COLLECTIVE = "collective"  # one participant of a collective (allreduce/allgather/reducescatter)
KINDS = (CALL, COLLECTIVE)

_REF = re.compile(r"([A-Za-z_]\w*)(?:\.(\d+))?")


class Arg(_ArgBase):  # noqa: B024 - no abstract methods: Field, Const subclass it, Ref registers
    """An op argument: a :class:`Ref`, a :class:`Field` or a :class:`Const` (see module doc).

    Field and Const subclass it; :class:`Ref`, a NamedTuple (which can have no other
    base), registers with it, which ``isinstance`` sees but a type checker does not: to
    one, Arg is a protocol that Ref meets by its shape.
    """

    __slots__ = ()

    @staticmethod
    def parse(text: str) -> Arg:
        """Inverse of ``str()``: "t3.1" -> Ref("t3", 1), "$0" -> Field(0), "#2" -> Const(2)."""
        if text[:1] == "$":
            return Field(_number(text))
        if text[:1] == "#":
            return Const(_number(text))
        return Ref.parse(text)


def _number(text: str) -> int:
    if not text[1:].isdigit():
        raise ValueError(f"bad argument {text!r}: expected {text[0]} and a number")
    return int(text[1:])


class Ref(NamedTuple):
    """A value: op ``t3``'s result, element ``t3.1`` of a tuple result, or the input ``in``.

    A named tuple (an :class:`Arg` by registration), so the passes' many dict and set
    lookups by value hash and compare it at C speed.
    """

    op: str  # the producing op id ("t3"); "in" for INPUT
    # the element of a num_returns > 1 result; as a field it hides tuple.index, unused on a Ref
    index: int | None = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return self.op if self.index is None else f"{self.op}.{self.index}"

    @staticmethod
    def parse(text: str) -> Ref:
        m = _REF.fullmatch(text)
        if m is None:
            raise ValueError(
                f"bad value {text!r}: expected an op id (t3), an element (t3.1) or {INPUT}"
            )
        return Ref(m[1], int(m[2]) if m[2] else None)


Arg.register(Ref)


@dataclass(frozen=True, slots=True)
class Field(Arg):
    """Input field ``$k``: the k-th of the fields ``execute(*args, **kwargs)`` supplies."""

    number: int

    def __str__(self) -> str:
        return f"${self.number}"


@dataclass(frozen=True, slots=True)
class Const(Arg):
    """Constant ``#k``: the k-th constant of the side table."""

    number: int

    def __str__(self) -> str:
        return f"#{self.number}"


INPUT = Ref("in")  # the value the driver writes each execution: the "in" channel


# -- sort keys: the one place that orders op ids, values and processes ---------------------


def op_sort_key(op_id: str) -> str:
    """Sort "t2" before "t10": numeric order of op ids, as a string key."""
    return f"{int(op_id[1:]):09d}" if op_id[1:].isdigit() else op_id


def value_key(value: Ref):
    """Order of values: "in" first, then by op number, a whole value before its elements."""
    if value == INPUT:
        return (-1, -1)
    return (int(value.op[1:]), -1 if value.index is None else value.index)


def proc_key(proc: str):
    """Order of processes: the driver first, then actors by number ("a2" before "a10")."""
    return (0, 0, "") if proc == DRIVER else (1, int(proc[1:]) if proc[1:].isdigit() else 0, proc)
