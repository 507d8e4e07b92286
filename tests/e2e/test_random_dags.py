"""Random DAGs (tests/random_dags.py) run by dagc and by plain Ray: equal results.

Each example builds the DAG on a pool of :class:`Stateful` actors, compiles it with
``dagc.compile`` (overlap or not, rings of 1, 2 or 8 slots, slots of 64 bytes or 1 MiB) and
runs a few executions (one by one, or as many submitted as may be before the first
``get``); then resets the actors and makes the same calls with ``.remote()`` in bind order
(all-reduces computed on the driver). The actors count their calls, so equal results also
mean each actor ran its calls in bind order. Tensor edges and all-reduces go over gloo.

A few examples by default (derandomized); ``pytest -m fuzz`` runs many more
(``DAGC_FUZZ_EXAMPLES``). A failure prints the DAG as code to paste.
"""

import pytest

torch = pytest.importorskip("torch")
import ray  # noqa: E402
from hypothesis import HealthCheck, given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dagc  # noqa: E402
from tests.random_dags import FAILURE, Stateful, dag_specs, fuzz_settings  # noqa: E402

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(3600)]

N_ACTORS = 3
EXECUTIONS = 5  # more than some rings have slots: they wrap
TIMEOUT = 60


@pytest.fixture(scope="module")
def pool(ray_session):
    actors = [ray.remote(Stateful).remote(k) for k in range(N_ACTORS)]
    ray.get([a.reset.remote() for a in actors], timeout=TIMEOUT)
    yield actors
    for a in actors:
        ray.kill(a)


def plain(x):
    """A result as comparable plain data (tensors as their dtype and values)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype), x.tolist())
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def reset(actors):
    ray.get([a.reset.remote() for a in actors], timeout=TIMEOUT)


def run_dagc(spec, actors, options: dict, window: int) -> list:
    """``EXECUTIONS`` executions, ``window`` submitted before the first of them is fetched."""
    build, _ = spec.functions()
    reset(actors)
    outs = []
    with dagc.compile(build(*actors), **options) as cg:
        for first in range(0, EXECUTIONS, window):
            runs = [
                spec.execution_args(e)[:2] for e in range(first, min(first + window, EXECUTIONS))
            ]
            refs = [cg.execute(*args, **kwargs) for args, kwargs in runs]
            outs += [outcome(lambda r=r: r.get(timeout=TIMEOUT), spec.multi) for r in refs]
    return outs


def run_ray(spec, actors) -> list:
    _, with_ray = spec.functions()
    reset(actors)
    refs = [with_ray(*actors, spec.execution_args(e)[2]) for e in range(EXECUTIONS)]
    return [outcome(lambda r=r: ray.get(r, timeout=TIMEOUT), True) for r in refs]


def outcome(get, multi: bool):
    """An execution's results as plain data, or FAILURE where an output raised an injected
    failure (``fail_at``; dagc raises the first failed output on get, as Ray does)."""
    try:
        out = get()
    except Exception as e:  # Ray's RayTaskError, dagc's error: both name the user's
        if FAILURE not in str(e):
            raise
        return FAILURE
    return plain(out if multi else [out])


def test_random_dags_match_plain_ray(pool, request):
    @fuzz_settings(request.config, 20, 500, HealthCheck.function_scoped_fixture)
    @given(
        spec=dag_specs(max_actors=N_ACTORS, failures=True),
        overlap=st.booleans(),
        max_inflight=st.sampled_from([8, 1, 2]),
        pipelined=st.booleans(),
        small_slots=st.booleans(),
    )
    def check(spec, overlap, max_inflight, pipelined, small_slots):
        actors = pool[: spec.n_actors]
        expected = run_ray(spec, actors)
        note(f"plain Ray gives {expected}")
        # small slots: most values go through the big-value path
        options = dict(
            overlap_communication=overlap,
            max_inflight=max_inflight,
            buffer_size=64 if small_slots else 1 << 20,
        )
        assert run_dagc(spec, actors, options, max_inflight if pipelined else 1) == expected

    check()
