"""Every name a generated function reads is bound before it is read (an AST data-flow check).

Run over every golden module and over modules generated from a table of IRs, with overlap
off and on. Bound are: the function's parameters, names its enclosing function bound
before defining it, builtins, and earlier assignments on every path: a name assigned in
only one branch of an ``if`` (or only in a ``try`` body, not its handler) does not count
after it. A miss is a NameError on the first execution of the loop.
"""

import ast
import builtins
from pathlib import Path

import pytest

from dagc.codegen import render_all
from tests.helpers import compile_ir, make_ir

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
BUILTINS = frozenset(dir(builtins))


def _reads(node: ast.AST) -> list[tuple[str, int]]:
    """Names an expression reads, minus names bound inside it (comprehensions, lambdas)."""
    inner = {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    for n in ast.walk(node):
        if isinstance(n, ast.Lambda):
            inner.update(a.arg for a in n.args.args + n.args.kwonlyargs)
    return [
        (n.id, n.lineno)
        for n in ast.walk(node)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in inner
    ]


def _targets(node: ast.AST) -> set[str]:
    return {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }


def _params(fn: ast.FunctionDef) -> set[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return set(names)


def unbound_reads(source: str) -> list[str]:
    """``["line 40: h_t0 in loop", ...]`` for every read of a possibly unbound name."""
    problems: list[str] = []

    def check(names, bound, where):
        for name, line in names:
            if name not in bound and name not in BUILTINS:
                problems.append(f"line {line}: {name} in {where}")

    def block(stmts, bound: set, where: str) -> set:
        for s in stmts:
            bound = stmt(s, bound, where)
        return bound

    def stmt(s, bound: set, where: str) -> set:
        if isinstance(s, ast.FunctionDef):
            for d in s.args.defaults + s.args.kw_defaults:
                if d is not None:
                    check(_reads(d), bound, where)
            block(s.body, set(bound) | _params(s), s.name)
            return bound | {s.name}
        if isinstance(s, (ast.Assign, ast.AnnAssign)):
            if s.value is not None:
                check(_reads(s.value), bound, where)
            targets = s.targets if isinstance(s, ast.Assign) else [s.target]
            for t in targets:  # subscript/attribute targets read their base
                check([r for r in _reads(t)], bound, where)
            return bound | set().union(*(_targets(t) for t in targets))
        if isinstance(s, ast.AugAssign):
            check(_reads(s.value) + [(n, s.lineno) for n in _targets(s.target)], bound, where)
            return bound | _targets(s.target)
        if isinstance(s, ast.If):
            check(_reads(s.test), bound, where)
            return block(s.body, set(bound), where) & block(s.orelse, set(bound), where)
        if isinstance(s, ast.While):
            check(_reads(s.test), bound, where)
            block(s.body, set(bound), where)
            return bound
        if isinstance(s, ast.For):
            check(_reads(s.iter), bound, where)
            block(s.body, set(bound) | _targets(s.target), where)
            return bound
        if isinstance(s, ast.Try):
            after = block(s.body, set(bound), where)
            after = block(s.orelse, after, where)
            for h in s.handlers:
                if h.type is not None:
                    check(_reads(h.type), bound, where)
                after &= block(h.body, set(bound) | ({h.name} if h.name else set()), where)
            return block(s.finalbody, after, where)
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            return bound | {(a.asname or a.name).split(".")[0] for a in s.names}
        if isinstance(s, ast.Global):
            return bound | set(s.names)
        check(_reads(s), bound, where)  # Expr, Return, Raise, Pass, ...
        return bound

    block(ast.parse(source).body, set(), "<module>")
    return problems


# -- the check itself must catch what it is for -----------------------------------------


def test_check_catches_unbound_and_one_branch_names():
    assert unbound_reads("def f(a):\n    return a + b\n") == ["line 2: b in f"]
    one_branch = "def f(a):\n    if a:\n        x = 1\n    return x\n"
    assert unbound_reads(one_branch) == ["line 4: x in f"]
    both = "def f(a):\n    if a:\n        x = 1\n    else:\n        x = 2\n    return x\n"
    assert unbound_reads(both) == []
    try_only = (
        "def f(a):\n    try:\n        x = a()\n    except Exception as e:\n"
        "        pass\n    return x, e\n"
    )
    assert unbound_reads(try_only) == ["line 6: x in f", "line 6: e in f"]
    later = "def f():\n    while True:\n        y = h.wait()\n        h = 1\n"
    assert unbound_reads(later) == ["line 3: h in f"]
    assert unbound_reads("def f(a=b):\n    pass\n") == ["line 1: b in <module>"]


# -- golden modules ----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.py")), ids=lambda p: p.name)
def test_golden_modules_bind_every_name_they_read(path):
    assert unbound_reads(path.read_text()) == []


# -- modules generated from IRs ----------------------------------------------------------

IRS = {
    "chain": lambda: make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"]),
    "tensor_two_readers": lambda: make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a2", "g", ["t0"])],
        ["t1", "t2"],
        transports={"t0": "nccl"},
    ),
    "tensor_two_readers_and_driver": lambda: make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a2", "g", ["t0"])],
        ["t1", "t2", "t0"],
        transports={"t0": "nccl"},
    ),
    "tensor_read_twice_by_one_reader": lambda: make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a1", "h", ["t0", "t1"])],
        ["t2"],
        transports={"t0": "nccl"},
    ),
    "tensor_multi_return": lambda: make_ir(
        [
            ("t0", "a0", "pair", ["$0"], {}, 2),
            ("t1", "a1", "g", ["t0.0"]),
            ("t2", "a2", "g", ["t0.1"]),
            ("t3", "a2", "h", ["t0.0", "t2"]),
        ],
        ["t1", "t3"],
        transports={"t0": "nccl"},
    ),
    "bidirectional": lambda: make_ir(
        [
            ("t0", "a0", "f", ["$0"]),
            ("t1", "a1", "f", ["$0"]),
            ("t2", "a1", "g", ["t0"]),
            ("t3", "a0", "g", ["t1"]),
        ],
        ["t2", "t3"],
        transports={"t0": "nccl", "t1": "nccl"},
    ),
    "collective_and_p2p": lambda: make_ir(
        [
            ("t0", "a0", "f", ["$0"]),
            ("t1", "a1", "f", ["$0"]),
            ("t2", "a2", "f", ["$0"]),
            ("t3", "a0", "allreduce", ["t0"], {}, 1, "g0"),
            ("t4", "a1", "allreduce", ["t1"], {}, 1, "g0"),
            ("t5", "a2", "allreduce", ["t2"], {}, 1, "g0"),
            ("t6", "a0", "f", ["$0"]),
            ("t7", "a1", "g", ["t6", "t4"]),
            ("t8", "a2", "g", ["t6", "t5"]),
        ],
        ["t3", "t7", "t8"],
        transports={"t6": "nccl"},
    ),
    "pipeline_two_microbatches": lambda: make_ir(
        [
            ("t0", "a0", "fwd", ["$0"]),
            ("t1", "a0", "fwd", ["$1"]),
            ("t2", "a1", "fwd", ["t0"]),
            ("t3", "a1", "fwd", ["t1"]),
            ("t4", "a1", "bwd", ["t2"]),
            ("t5", "a1", "bwd", ["t3"]),
            ("t6", "a0", "bwd", ["t4"]),
            ("t7", "a0", "bwd", ["t5"]),
        ],
        ["t6", "t7"],
        nfields=2,
        transports={x: "nccl" for x in ("t0", "t1", "t4", "t5")},
    ),
}


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("name", sorted(IRS))
def test_generated_modules_bind_every_name_they_read(name, overlap):
    ir = compile_ir(IRS[name](), overlap=overlap)
    for actor, mod in render_all(ir).items():
        problems = unbound_reads(mod.source)
        assert not problems, (
            f"{name} {actor}: reads unbound names {problems}\n{ir.schedule}\n{mod.source}"
        )
