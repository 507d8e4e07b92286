"""benchmarks/workloads.py without Ray: the five workloads are registered, each with an
example that defines what the benchmark calls (so the benchmark does not rot)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod


def test_workloads_registered_with_their_examples():
    w = _module(ROOT / "benchmarks" / "workloads.py", "dagc_bench_workloads")
    assert list(w.WORKLOADS) == [
        "pp_inference",
        "tensor_parallel",
        "hetero_training",
        "serving",
        "pipeline_training",
    ]
    for wl in w.WORKLOADS.values():
        src = (ROOT / "examples" / f"{wl.example}.py").read_text()
        for fn in ("def build(", "def example_input(", "def reference(", "def main("):
            assert fn in src, f"examples/{wl.example}.py lacks {fn}"
    assert {"predict", "order_n"} <= set(w.QUICK) and {"predict", "order_n"} <= set(w.FULL)
