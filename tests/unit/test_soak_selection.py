"""Which soak runs: the default test command runs the short soak and not the long one;
``-m soak`` runs the long one (and only it); a selection that finds nothing fails ("no tests
ran" is exit status 5, never a pass). Collection only: no Ray, a few seconds."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOAK = "tests/faults/test_soak.py"


def collect(*args):
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ids = [line.split("::")[-1] for line in p.stdout.splitlines() if "::" in line]
    return p.returncode, ids, p.stdout + p.stderr


def test_default_command_runs_the_short_soak_only():
    rc, ids, out = collect(SOAK)
    assert rc == 0, out
    assert ids == ["test_soak_no_growth"], out
    assert "1 deselected" in out, out


def test_marker_selects_the_long_soak_only():
    rc, ids, out = collect("-m", "soak", SOAK)
    assert rc == 0, out
    assert ids == ["test_soak_long"], out
    rc, ids, out = collect("-m", "not soak", SOAK)
    assert rc == 0 and ids == ["test_soak_no_growth"], out


def test_a_selection_that_finds_nothing_fails():
    rc, ids, out = collect("-m", "soak", "tests/unit/test_soak_selection.py")
    assert rc == 5 and ids == [], out  # pytest: "no tests collected/ran"
