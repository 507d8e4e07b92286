"""The import layering of dagc, checked over every module's imports (function-level ones too).

Each package may import only the layers listed for it (and itself); the top of the package
(``dagc/__init__``, ``api``, ``options``, ``stages``, ``cli`` and other top-level modules)
may import anything. ``inspect`` reads plain data (schedules, sources): the runtime's
``CompiledDag`` uses it for ``visualize``/``dump`` and ``Profile`` for its summaries.

    errors, config, version, placement   (nothing of dagc)
    ir          errors, config
    schedule    ir, errors, config
    frontend    ir, errors, config
    passes      ir, schedule, placement, errors, config
    codegen     ir, schedule, errors, config          (and templates/, not Python)
    inspect     schedule, ir, errors, config
    runtime     schedule, ir, placement, errors, config, inspect   (never frontend, passes,
                codegen, nor the top)
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dagc"
BASE = {"errors", "config", "version"}
ALLOWED = {
    "errors": set(),
    "config": set(),
    "version": set(),
    "placement": set(),
    "ir": BASE,
    "schedule": {"ir"} | BASE,
    "frontend": {"ir"} | BASE,
    "passes": {"ir", "schedule", "placement"} | BASE,
    "codegen": {"ir", "schedule", "templates"} | BASE,
    "inspect": {"schedule", "ir"} | BASE,
    "runtime": {"schedule", "ir", "placement", "inspect"} | BASE,
}
TOP = "top"  # dagc itself, api, options, stages, cli, ...: anything goes from there


def layer(module: str) -> str:
    """The layer of a dagc module name ("dagc.runtime.channels.ring" -> "runtime")."""
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    name = parts[1]
    if name == "_templates":
        return "templates"
    return name if name in ALLOWED else TOP


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dagc module) for every import in ``path``, at any depth."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dagc"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "dagc":
                continue
            for a in node.names:  # "from dagc import config": the module dagc.config
                sub = f"{mod}.{a.name}"
                is_module = (
                    PKG.parent.joinpath(*sub.split(".")).with_suffix(".py").exists()
                    or PKG.parent.joinpath(*sub.split(".")).is_dir()
                )
                out.append((node.lineno, sub if is_module else mod))
    return out


# imports that break the layering today, each with who moves it; remove an entry with its fix
KNOWN: set = set()  # (file, imported package) pairs allowed against the rule


def violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = module_name(path)
        mine = layer(me)
        if mine == TOP:
            continue
        for line, target in imports(path):
            theirs = layer(target)
            if (
                theirs != mine
                and theirs not in ALLOWED[mine]
                and (str(path.relative_to(PKG.parent)), target) not in KNOWN
            ):
                bad.append(
                    f"{path.relative_to(PKG.parent)}:{line}: {mine} imports {target} ({theirs})"
                )
    return bad


def test_every_import_keeps_the_layering():
    bad = violations()
    assert not bad, "imports across the layering (see this file's docstring):\n" + "\n".join(bad)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    src = "def f():\n    from dagc.codegen import render_all\n    from . import shm\n"
    path = PKG / "runtime" / "channels" / "__layering_probe__.py"
    assert not path.exists()
    path.write_text(src)
    try:
        got = imports(path)
    finally:
        path.unlink()
    assert (2, "dagc.codegen") in got and (3, "dagc.runtime.channels.shm") in got
    assert layer("dagc.runtime.channels.shm") == "runtime" and layer("dagc") == TOP


@pytest.mark.parametrize("pkg", ["runtime"])
def test_runtime_modules_stay_small(pkg):
    """~400 lines a module keeps each one readable on its own."""
    big = [
        f"{p.relative_to(PKG.parent)} ({n} lines)"
        for p in sorted((PKG / pkg).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 440
    ]
    assert not big, big


@pytest.mark.parametrize("pkg", ["ir", "schedule", "passes", "inspect", "codegen", "frontend"])
def test_compiler_modules_stay_small(pkg):
    """The compiler's packages too: no module over 450 lines (inspect/trace.py was 490
    before it became timeline.py and profile_stats.py)."""
    big = [
        f"{p.relative_to(PKG.parent)} ({n} lines)"
        for p in sorted((PKG / pkg).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 450
    ]
    assert not big, big


def test_top_level_modules_stay_small():
    """dagc's own modules (api, stages, ray_compat, ...) too: ray_compat.py was 576 lines
    before Ray's options moved to ray_options.py."""
    big = [
        f"{p.relative_to(PKG.parent)} ({n} lines)"
        for p in sorted(PKG.glob("*.py"))
        if (n := len(p.read_text().splitlines())) > 450
    ]
    assert not big, big
