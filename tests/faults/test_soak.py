"""Soak: many executions of benchmarks/soak.py's 3-actor DAG with mixed payload sizes grow
no process's private memory, fds or threads, nor the segments, beyond a small constant.

Two sizes: ``test_soak_no_growth`` (3,000 executions, well under a minute) runs in every
test run, CI included; ``test_soak_long`` (200,000 executions, the figures of
docs/faults.md) carries the ``soak`` marker and runs only when asked for:
``python -m pytest -m soak`` (tests/conftest.py deselects it otherwise; a ``-m soak`` run
that finds no such test exits with "no tests ran", status 5). ``python benchmarks/soak.py``
prints the full table. No time is asserted here: a slow, shared CI box must not fail a
leak check (the pytest timeout still bounds a hang).
"""

import pytest

from benchmarks.soak import Stage, soak

MiB = 1 << 20


def _run(ray, executions: int, warmup: int, reports: int) -> dict:
    actors = [Stage.remote() for _ in range(3)]
    try:
        res = soak(executions, actors=actors, window=4, warmup=warmup, reports=reports)
    finally:
        for h in actors:
            ray.kill(h)
    g = res["growth"]
    ring = res["samples"][-1]["segment_bytes"]
    print(
        f"\n[fault] soak {res['executions']:,} executions in {res['seconds']:.1f} s; growth: "
        + ", ".join(
            f"{n} rss {g[n]['rss'] / MiB:+.1f} MiB (private "
            f"{g[n]['private'] / MiB:+.1f}) fds {g[n]['fds']:+d} "
            f"threads {g[n]['threads']:+d}"
            for n in ("driver", "a", "b", "c")
        )
        + f", segments {g['segments']:+d} ({res['samples'][-1]['segments']} mapped, "
        f"{ring / MiB:.1f} MiB)"
    )
    for name in ("driver", "a", "b", "c"):
        # a leak grows private memory; RSS may also grow by channel slots touched for the
        # first time, but never past the (unchanged) size of the segments
        assert g[name]["private"] < 16 * MiB, (name, g[name])
        assert g[name]["rss"] < ring + 16 * MiB, (name, g[name], ring)
        assert g[name]["fds"] <= 2, (name, g[name])
        assert g[name]["threads"] <= 2, (name, g[name])
    assert g["segments"] == 0 and g["segment_bytes"] == 0
    assert res["segments_after_teardown"] == 0
    return res


@pytest.mark.timeout(300)
def test_soak_no_growth(ray):
    res = _run(ray, 3000, warmup=500, reports=3)
    assert res["executions"] == 3000


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_long(ray):
    res = _run(ray, 200_000, warmup=1000, reports=10)
    assert res["executions"] == 200_000
