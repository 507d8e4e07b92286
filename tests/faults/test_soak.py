"""A short soak (CI): thousands of executions of benchmarks/soak.py's 3-actor DAG with
mixed payload sizes grow no process's RSS, fds or threads, nor the segments, beyond a
small constant. ``python benchmarks/soak.py`` runs the full 200,000."""
import pytest

from benchmarks.soak import Stage, soak

MiB = 1 << 20


@pytest.mark.timeout(120)
def test_soak_no_growth(ray):
    actors = [Stage.remote() for _ in range(3)]
    try:
        res = soak(3000, actors=actors, window=4, warmup=500, reports=3)
    finally:
        for h in actors:
            ray.kill(h)
    g = res["growth"]
    print(f"\n[fault] soak {res['executions']} executions in {res['seconds']:.1f} s; growth: "
          + ", ".join(f"{n} rss {g[n]['rss'] / MiB:+.1f} MiB (private "
                      f"{g[n]['private'] / MiB:+.1f}) fds {g[n]['fds']:+d} "
                      f"threads {g[n]['threads']:+d}" for n in ("driver", "a", "b", "c"))
          + f", segments {g['segments']:+d}")
    assert res["seconds"] < 30
    ring = res["samples"][-1]["segment_bytes"]
    for name in ("driver", "a", "b", "c"):
        # a leak grows private memory; RSS may also grow by channel slots touched for the
        # first time, but never past the (unchanged) size of the segments
        assert g[name]["private"] < 16 * MiB, (name, g[name])
        assert g[name]["rss"] < ring + 16 * MiB, (name, g[name], ring)
        assert g[name]["fds"] <= 2, (name, g[name])
        assert g[name]["threads"] <= 2, (name, g[name])
    assert g["segments"] == 0 and g["segment_bytes"] == 0
    assert res["segments_after_teardown"] == 0
