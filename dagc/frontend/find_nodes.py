"""Find a DAG node hidden inside a bound argument, the way pickling would reach it.

Ray finds the nodes of a DAG by pickling each argument and noting every DAG node the
pickler meets. dagc walks the same objects without pickling: lists, tuples, dicts, sets
directly; any other object through the state its ``__reduce_ex__(5)`` returns (the
``__dict__`` and ``__slots__`` of a plain object or dataclass, the items of a container
subclass), or, when that fails, its ``__dict__`` and ``__slots__``. Scalars, strings,
bytes, classes, functions, numpy arrays, tensors and actor handles are leaves: they hold no
DAG node, and a big array costs nothing to skip. Each object is visited once (cycles end).

``find_node(value, is_node)`` returns the first node found and its path inside ``value``
(``.cfg.layers[2]`` style), or None; ``find_nodes`` every distinct node, with its first path.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

_ATOMS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    memoryview,
    range,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    type(Ellipsis),
    type(NotImplemented),
)
_ATOM_SET = frozenset(_ATOMS)  # exact types, for the per-item test of big containers
_CONTAINERS = frozenset((list, tuple, dict, set, frozenset))
_LEAF_CLASSES = (
    ("numpy", "ndarray"),
    ("numpy", "generic"),
    ("torch", "Tensor"),
    ("ray.actor", "ActorHandle"),
    ("ray", "ObjectRef"),
)


def _leaf_types() -> tuple:
    """Array, tensor and handle classes of the modules already imported (none imported here)."""
    out = []
    for module, name in _LEAF_CLASSES:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


def _state_children(state, path: str) -> list[tuple[Any, str]]:
    """Children of a reduce state: a dict of attributes, or (dict, slots dict), or other."""
    if (
        isinstance(state, tuple)
        and len(state) == 2
        and all(s is None or isinstance(s, dict) for s in state)
    ):
        return [c for s in state if s for c in _attrs(s, path)]
    if isinstance(state, dict):
        return _attrs(state, path)
    return [(state, f"{path}<state>")]


def _attrs(d: dict, path: str) -> list[tuple[Any, str]]:
    return [(v, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k!r}]") for k, v in d.items()]


def _object_children(obj, path: str) -> list[tuple[Any, str]]:
    """What pickling ``obj`` would reach, by ``__reduce_ex__(5)``, else __dict__/__slots__."""
    try:
        rv = obj.__reduce_ex__(5)
    except Exception:
        rv = None
    if isinstance(rv, tuple) and len(rv) >= 2:
        out: list[tuple[Any, str]] = []
        args = rv[1] if isinstance(rv[1], tuple) else ()
        out += [(a, f"{path}<arg {i}>") for i, a in enumerate(args) if not isinstance(a, type)]
        if len(rv) > 2 and rv[2] is not None:
            out += _state_children(rv[2], path)
        if len(rv) > 3 and rv[3] is not None:
            out += [(v, f"{path}[{i}]") for i, v in enumerate(rv[3])]
        if len(rv) > 4 and rv[4] is not None:
            for i, (k, v) in enumerate(rv[4]):
                out += [(k, f"{path}<key {i}>"), (v, f"{path}[{k!r}]")]
        return out
    if isinstance(rv, str):
        return []  # pickled by name: a global
    out = _attrs(getattr(obj, "__dict__", None) or {}, path)
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if hasattr(obj, name) and name not in ("__dict__", "__weakref__"):
                out.append((getattr(obj, name), f"{path}.{name}"))
    return out


def find_node(value, is_node: Callable[[Any], bool], path: str = "") -> tuple[Any, str] | None:
    """(node, its path) for the first DAG node inside ``value`` (``path`` prefixes it)."""
    for found in _walk(value, is_node, path):
        return found
    return None


def find_nodes(value, is_node: Callable[[Any], bool], path: str = "") -> list[tuple[Any, str]]:
    """(node, its first path) for every distinct DAG node inside ``value``, in walk order."""
    out, ids = [], set()
    for node, p in _walk(value, is_node, path):
        if id(node) not in ids:
            ids.add(id(node))
            out.append((node, p))
    return out


def _walk(value, is_node: Callable[[Any], bool], path: str):
    """Yield (node, path) for each DAG node met inside ``value`` (a node is not entered)."""
    leaves = _leaf_types()
    seen: set[int] = set()
    keep: list = []  # objects made by __reduce_ex__ stay alive: ids stay unique
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        v, p = stack.pop()
        t = type(v)
        if t in _CONTAINERS:
            if _ATOM_SET.issuperset(map(type, v)) and (
                t is not dict or _ATOM_SET.issuperset(map(type, v.values()))
            ):
                continue  # only scalars and strings inside: checked at C speed
        elif isinstance(v, _ATOMS):
            continue
        elif is_node(v):
            yield v, p
            continue
        if id(v) in seen or isinstance(v, leaves):
            continue
        seen.add(id(v))
        keep.append(v)
        if t is list or t is tuple:
            children = [(x, f"{p}[{i}]") for i, x in enumerate(v) if type(x) not in _ATOM_SET]
        elif t is dict:
            children = []
            for i, (k, x) in enumerate(v.items()):
                if type(k) not in _ATOM_SET:
                    children.append((k, f"{p}<key {i}>"))
                if type(x) not in _ATOM_SET:
                    children.append((x, f"{p}[{k!r}]"))
        elif t is set or t is frozenset:
            children = [(x, f"{p}<member>") for x in v]
        else:
            children = _object_children(v, p)
        stack.extend(reversed(children))
