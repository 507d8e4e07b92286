"""What ``pip install .`` ships: every package under dagc/, the templates, py.typed.

An editable install imports straight from the checkout and hides a package the build leaves
out (issue 19: dagc.ir and dagc.schedule were missing from the wheel). This reads the
build's own configuration (setup.py + pyproject.toml, as setuptools does when it builds,
without building) and compares it with the source tree; ``.ci/wheel_check.py`` builds and
installs the real wheel and imports every module from it.
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist():
    """The setuptools Distribution the build would use: setup.py's keywords with
    pyproject.toml applied, as setuptools.setup() makes it before running a command."""
    import setuptools
    from setuptools.dist import Distribution

    captured = {}
    cwd, real_setup = os.getcwd(), setuptools.setup
    os.chdir(ROOT)
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
        d = Distribution(captured)
        d.parse_config_files()
        return d
    finally:
        setuptools.setup = real_setup
        os.chdir(cwd)


def source_packages() -> set[str]:
    """Every folder under dagc/ holding Python files, as a package name."""
    found = set()
    for d, dirs, files in os.walk(ROOT / "dagc"):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            found.add(".".join(Path(d).relative_to(ROOT).parts))
    return found


def test_every_package_under_dagc_is_shipped(dist):
    shipped = set(dist.packages)
    missing = source_packages() - shipped
    assert not missing, f"the wheel would leave out {sorted(missing)}"
    assert "dagc._templates" in shipped


def test_every_shipped_package_is_a_regular_package(dist):
    """find_packages skips a folder without __init__.py, which still imports from a checkout
    (as a namespace package): every package folder must have one, so none is skipped."""
    for pkg in source_packages():
        assert (ROOT / Path(*pkg.split(".")) / "__init__.py").is_file(), (
            f"{pkg} has no __init__.py: setuptools would not ship it"
        )
    templates = ROOT / dist.package_dir["dagc._templates"]
    assert (templates / "__init__.py").is_file()
    assert sorted(p.name for p in templates.glob("*.j2")), "no templates to ship"


def test_templates_and_py_typed_are_package_data(dist):
    assert "py.typed" in dist.package_data["dagc"]
    assert (ROOT / "dagc" / "py.typed").is_file()
    assert "*.j2" in dist.package_data["dagc._templates"]
