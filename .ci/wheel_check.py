"""The installed wheel works on its own (issue 19): build it, install it into a fresh
virtual environment (not editable), and from a folder outside the checkout import every
dagc module and run ``dagc compile pipeline.py --run 100``.

    python .ci/wheel_check.py          # exit status 0 only if all of that worked

The venv reuses the interpreter's installed packages (--system-site-packages) so that ray
and torch are not downloaded again; the check then insists that every dagc module it
imports comes from the venv, never from the checkout's editable install.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run inside the venv: import each module named on stdin, and say where each came from.
IMPORT_ALL = r"""
import importlib, json, sys, importlib.resources as res
names = json.load(sys.stdin)
where = {n: importlib.import_module(n).__file__ for n in names}
pkg = importlib.import_module("dagc")
extra = {"py.typed": res.files("dagc").joinpath("py.typed").is_file(),
         "templates": sorted(p.name for p in res.files("dagc._templates").iterdir()
                             if p.name.endswith(".j2"))}
print(json.dumps({"where": where, "extra": extra, "prefix": sys.prefix}))
"""


def run(cmd, **kw):
    print("+", " ".join(str(c) if len(str(c)) < 80 else "<script>" for c in cmd), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def source_files() -> list[str]:
    """The files a fresh clone has (tracked, plus new ones git does not ignore)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def source_modules() -> list[str]:
    mods = ["dagc._templates"]
    for f in sorted((ROOT / "dagc").rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def clean_env(venv: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "DAGC_PATCH_RAY", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["RAY_ADDRESS"] = "local"  # a Ray of its own, never someone else's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="dagc-wheel-"))
    try:
        src, dist, venv, work = tmp / "src", tmp / "dist", tmp / "venv", tmp / "work"
        for f in source_files():  # build from a copy: no build/ in the checkout
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                dist,
                src,
            ]
        )
        (wheel,) = dist.glob("dagc-*.whl")
        run([sys.executable, "-m", "venv", "--system-site-packages", venv])
        py = venv / "bin" / "python"
        env = clean_env(venv)
        work.mkdir()
        # the wheel and its core dependencies (found among the reused packages, or fetched)
        run([py, "-m", "pip", "install", "-q", wheel], env=env, cwd=work)

        names = source_modules()
        out = run(
            [py, "-c", IMPORT_ALL],
            env=env,
            cwd=work,
            input=json.dumps(names),
            capture_output=True,
            text=True,
        ).stdout
        got = json.loads(out.strip().splitlines()[-1])
        site = Path(got["prefix"]).resolve()
        outside = {
            n: f for n, f in got["where"].items() if not Path(f).resolve().is_relative_to(site)
        }
        if outside:
            print(
                f"wheel check: modules imported from outside the venv {site}: {outside}",
                file=sys.stderr,
            )
            return 1
        if not got["extra"]["py.typed"] or not got["extra"]["templates"]:
            print(f"wheel check: the wheel lacks package data: {got['extra']}", file=sys.stderr)
            return 1
        print(f"wheel check: imported {len(names)} modules from {wheel.name} in {site}")

        shutil.copy2(ROOT / "examples" / "pipeline.py", work / "pipeline.py")
        with _ray_address_file_kept():
            run(
                [
                    venv / "bin" / "dagc",
                    "compile",
                    "pipeline.py",
                    "-o",
                    work / "out",
                    "--run",
                    "100",
                ],
                env=env,
                cwd=work,
                timeout=600,
            )
        print("wheel check: passed")
        return 0
    except subprocess.CalledProcessError as e:
        print(f"wheel check: failed: {e}", file=sys.stderr)
        for stream in (e.stdout, e.stderr):
            if stream:
                print(stream[-5000:], file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _ray_address_file_kept:
    """A Ray started here points /tmp/ray/ray_current_cluster at itself; on a shared
    machine someone else's ``ray.init(address="auto")`` reads it, so it is put back."""

    path = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"

    def __enter__(self):
        self.before = self.path.read_text() if self.path.exists() else None

    def __exit__(self, *exc):
        try:
            if self.before is None:
                self.path.unlink(missing_ok=True)
            else:
                self.path.write_text(self.before)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
