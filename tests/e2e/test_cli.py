"""The command line, run as a user would: a subprocess with its own local Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=240):
    env = dict(os.environ, RAY_ADDRESS="", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS")
    return subprocess.run(
        [sys.executable, "-m", "dagc.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(300)
def test_compile_run_profile_and_artifacts(tmp_path):
    out = tmp_path / "art"
    r = run_cli("compile", "examples/pipeline.py", "-o", str(out), "--run", "200", "--profile")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step" in r.stdout and "tokenize t0" in r.stdout
    assert "p50" in r.stdout and "executions/s" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    for want in [
        "schedule.txt",
        "schedule.json",
        "schedule.csv",
        "graph.dot",
        "trace.json",
        "driver.py",
        "a0.py",
    ]:
        assert want in names
    trace = json.loads((out / "trace.json").read_text())
    assert trace["traceEvents"]
    shown = run_cli("show", str(out))
    assert shown.returncode == 0
    assert shown.stdout.strip() == (out / "schedule.txt").read_text().strip()


@pytest.mark.timeout(300)
def test_json_format_and_byte_identical_artifacts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r1 = run_cli("compile", "examples/pipeline.py", "--format", "json", "-o", str(a))
    r2 = run_cli("compile", "examples/pipeline.py", "--format", "json", "-o", str(b))
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    data = json.loads(r1.stdout)
    assert data["schedule"]["format"] == "dagc.schedule/2"
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_missing_build_is_one_line_error(tmp_path):
    f = tmp_path / "nobuild.py"
    f.write_text("x = 1\n")
    r = run_cli("compile", str(f), timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "build()" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_file_is_one_line_error():
    r = run_cli("compile", "no/such/file.py", timeout=60)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_show_without_schedule_is_clear_error(tmp_path):
    r = run_cli("show", str(tmp_path), timeout=60)
    assert r.returncode != 0 and "schedule.json" in r.stderr
