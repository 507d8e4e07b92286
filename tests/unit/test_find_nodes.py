"""find_node: a DAG node hidden anywhere pickling would reach inside an argument (no Ray)."""

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest

from dagc.frontend.find_nodes import find_node


class Node:
    """Stands in for a Ray DAG node."""


def is_node(v):
    return isinstance(v, Node)


@dataclass
class Cfg:
    layers: list
    name: str = "cfg"


@dataclass
class Stage:
    cfg: Cfg


class Plain:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b


class Reduced:
    """Pickles as Reduced(x, y) through its own __reduce__."""

    def __init__(self, x, y):
        self.pair = (x, y)

    def __reduce__(self):
        return Reduced, self.pair


class Items(list):
    pass


def path_of(value, prefix="argument 0 "):
    found = find_node(value, is_node, prefix)
    return None if found is None else found[1]


def test_dataclass_nested_path():
    n = Node()
    found = find_node(Stage(Cfg([1, 2, n])), is_node, "argument 0 ")
    assert found == (n, "argument 0 .cfg.layers[2]")


@pytest.mark.parametrize(
    "value,path",
    [
        (lambda n: Plain(x={"k": [0, (1, n)]}), ".x['k'][1][1]"),
        (lambda n: Slotted(1, n), ".b"),
        (lambda n: Reduced(1, n), "<arg 1>"),
        (lambda n: Items([1, n]), "[1]"),
        (lambda n: OrderedDict(a=1, b=n), "['b']"),
        (lambda n: {"a": {"b": [[n]]}}, "['a']['b'][0][0]"),
        (lambda n: {n: 1}, "<key 0>"),
        (lambda n: {("x", n)}, "<member>[1]"),
        (lambda n: functools.partial(print, n), "<state>[1][0]"),
        (lambda n: n, ""),
    ],
)
def test_objects_and_containers(value, path):
    assert path_of(value(Node())) == "argument 0 " + path


def test_plain_constants_have_no_node():
    for v in [
        None,
        1,
        2.5,
        "s",
        b"b",
        [1, [2, "x"]],
        {"k": (1, 2)},
        {1, 2},
        Cfg([1, 2]),
        Plain(a=1, b=[2]),
        Slotted(1, 2),
        Reduced(1, 2),
        np.arange(3),
        print,
        Plain,
        threading.Lock(),
        Plain(lock=threading.Lock()),
    ]:
        assert find_node(v, is_node) is None, v


def test_cycles_end():
    a = Plain()
    a.me = a
    a.items = [a, {"back": a}]
    assert find_node(a, is_node) is None
    a.items.append(Node())
    assert path_of(a, "") == ".items[2]"


def test_arrays_and_tensors_are_leaves():
    """Never reduced, so a big array costs nothing (a reduce would copy its bytes)."""
    torch = pytest.importorskip("torch")
    reduced = []

    class SpyArray(np.ndarray):
        def __reduce_ex__(self, protocol):
            reduced.append("array")
            return super().__reduce_ex__(protocol)

    class SpyTensor(torch.Tensor):
        def __reduce_ex__(self, protocol):
            reduced.append("tensor")
            return super().__reduce_ex__(protocol)

    value = Plain(
        w=np.zeros(10).view(SpyArray),
        t=torch.zeros(10).as_subclass(SpyTensor),
        p=torch.nn.Parameter(torch.zeros(2)),
        s=np.float32(1.0),
    )
    assert find_node(value, is_node) is None
    assert reduced == []
    value.later = [Node()]
    assert path_of(value, "") == ".later[0]"
