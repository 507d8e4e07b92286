"""benchmarks/bigvalues.py must not rot: its table and floor without Ray (the figures are in
benchmarks/README.md)."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bigvalues_report_and_floor():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from benchmarks import bigvalues as bv

    assert bv.memcpy_s(1 << 20) > 0
    assert bv._reps(64) == bv.REPS[64] and bv._reps(7) >= 3
    mem = {"shm_bytes": 1 << 20, "big_bytes": 0}
    res = {
        "sizes": [64],
        "load_start": (1.0,),
        "load_end": (2.0,),
        "cases": [
            {
                "case": "64 MiB chain (3 hops)",
                "mib": 64,
                "chain": True,
                "floor_s": 0.03,
                "median_s": {"ray": 0.3, "dagc": 0.04},
                "n": {},
                "errors": {},
            }
        ],
        "memory": {
            "peak_rss_growth": {"driver": 1, "a": 2, "b": 3},
            "memory_start": mem,
            "memory_burst": mem,
            "memory_after": mem,
            "shm_used_burst": 0,
            "shm_used_after": 0,
        },
    }
    out = bv.report(res)
    assert "dagc/ray  0.133" in out and "peak RSS growth" in out
