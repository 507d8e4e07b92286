"""Several compiled DAGs on the same actors at the same time (issue 20, part 1).

Each DAG runs its own loop thread on each of its actors; an actor's methods never overlap
across DAGs unless its ``max_concurrency`` allows it (the method lock, ``actor/loop.py``).
Every wait here has a timeout: a deadlock fails the test, it never hangs it.
"""

import os
import threading
import time

import pytest
import ray

import dagc
from dagc import InputNode
from dagc.runtime.actor import lifecycle

pytestmark = pytest.mark.timeout(240)


@ray.remote
class Shared:
    """A stateful actor whose ``guarded`` notices two of its calls at once."""

    def __init__(self):
        self.busy = False
        self.overlaps = 0
        self.meeting = threading.Barrier(2)

    def add(self, x, k=1):
        return x + k

    def guarded(self, x, s=0.002):
        if self.busy:
            self.overlaps += 1
        self.busy = True
        try:
            time.sleep(s)
        finally:
            self.busy = False
        return x

    def meet(self, x):
        # returns only when a second call is inside this method at the same time
        self.meeting.wait(timeout=10)
        return x

    def overlaps_seen(self):
        return self.overlaps

    def fail_on(self, x, bad=3):
        if x == bad:
            raise ValueError(f"bad input {x}")
        return x

    def sleep(self, x):
        time.sleep(x)
        return x

    def die_on(self, x):
        if x < 0:
            os._exit(1)
        return x


@pytest.fixture(scope="module")
def pair(ray_session):
    ws = [Shared.remote() for _ in range(2)]
    ray.get([w.add.remote(0) for w in ws])
    return ws


def _chain(a, b, k1=1, k2=1):
    with InputNode() as inp:
        return b.add.bind(a.add.bind(inp, k=k1), k=k2)


def _busy(actor) -> tuple:
    return ray.get(actor.__ray_call__.remote(lifecycle.probe, ""), timeout=30).busy


def _run(fn, n_threads=2):
    """Run ``fn(i)`` on ``n_threads`` threads; re-raise the first error; never hang."""
    errors = []

    def body(i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "a thread is still waiting: deadlock?"
    if errors:
        raise errors[0]


def test_two_dags_on_the_same_actors_run_interleaved(pair):
    a, b = pair
    with dagc.compile(_chain(a, b, 1, 10)) as cg1, dagc.compile(_chain(b, a, 100, 1000)) as cg2:
        assert len(_busy(a)) == 2 and len(_busy(b)) == 2  # the probe still says which
        for i in range(30):
            r1, r2 = cg1.execute(i), cg2.execute(i)
            assert r2.get(timeout=10) == i + 1100
            assert r1.get(timeout=10) == i + 11
        refs = [(cg1.execute(i), cg2.execute(-i)) for i in range(6)]  # both pipelined
        for i, (r1, r2) in enumerate(refs):
            assert (r1.get(timeout=10), r2.get(timeout=10)) == (i + 11, -i + 1100)
        # per-DAG state on the shared actors: each one's channels, each one's profile
        m1, m2 = cg1.memory(), cg2.memory()
        assert len(m1["channels"]) == len(m2["channels"]) == 3
        ref = cg2.execute(5)  # in flight while cg1's loops switch
        assert cg1.profile(3, 0).executions == 3
        assert (ref.get(timeout=10), cg1.execute(1).get(timeout=10)) == (1105, 12)


def test_opposite_orders_under_concurrent_load_do_not_deadlock(pair):
    """a -> b in one DAG, b -> a in the other, both kept full from two threads."""
    a, b = pair
    with dagc.compile(_chain(a, b, 1, 2)) as cg1, dagc.compile(_chain(b, a, 3, 4)) as cg2:
        cgs, adds = (cg1, cg2), (3, 7)

        def drive(i):
            cg, k = cgs[i], adds[i]
            for n in range(0, 400, 4):
                refs = [cg.execute(n + j) for j in range(4)]
                assert [r.get(timeout=10) for r in refs] == [n + j + k for j in range(4)]

        _run(drive)


def test_teardown_of_one_leaves_the_other_running(pair):
    a, b = pair
    with dagc.compile(_chain(a, b)) as cg1, dagc.compile(_chain(a, b, 5, 5)) as cg2:
        assert cg1.execute(1).get(timeout=10) == 3
        ref = cg2.execute(1)  # in flight while cg1 goes
        cg1.teardown()
        assert ref.get(timeout=10) == 11
        assert [cg2.execute(i).get(timeout=10) for i in range(20)] == [i + 10 for i in range(20)]
        assert len(_busy(a)) == 1
        with dagc.compile(_chain(b, a, 2, 2)) as cg3:  # a new one beside the survivor
            assert (cg2.execute(0).get(timeout=10), cg3.execute(0).get(timeout=10)) == (10, 4)
        assert cg2.execute(7).get(timeout=10) == 17


def test_a_task_error_in_one_leaves_the_other_fine(pair):
    a, b = pair
    with InputNode() as inp:
        failing = b.add.bind(a.fail_on.bind(inp))
    with dagc.compile(failing) as cg1, dagc.compile(_chain(a, b)) as cg2:
        for i in range(6):
            r1, r2 = cg1.execute(i), cg2.execute(i)
            if i == 3:
                with pytest.raises(dagc.TaskError, match="bad input 3"):
                    r1.get(timeout=10)
            else:
                assert r1.get(timeout=10) == i + 1
            assert r2.get(timeout=10) == i + 2


def test_an_actor_death_ends_every_dag_on_it(ray_session):
    a, b = Shared.remote(), Shared.remote()
    ray.get([a.add.remote(0), b.add.remote(0)])
    with InputNode() as inp:
        dying = b.add.bind(a.die_on.bind(inp))
    try:
        with dagc.compile(dying) as cg1, dagc.compile(_chain(b, a)) as cg2:
            assert (cg1.execute(1).get(timeout=10), cg2.execute(1).get(timeout=10)) == (2, 3)
            r1 = cg1.execute(-1)  # a dies in cg1's call
            t0 = time.monotonic()
            with pytest.raises(dagc.ActorDiedError):
                r1.get(timeout=30)
            with pytest.raises(dagc.ActorDiedError):  # cg2 runs on a too
                while time.monotonic() - t0 < 30:
                    cg2.execute(1).get(timeout=10)
            assert time.monotonic() - t0 < 30
    finally:
        ray.kill(a)
        ray.kill(b)


def test_methods_never_overlap_across_dags_with_max_concurrency_1(pair):
    a, b = pair
    with InputNode() as inp:
        g1 = a.guarded.bind(inp)
    with InputNode() as inp:
        g2 = b.add.bind(a.guarded.bind(inp))
    before = ray.get(a.overlaps_seen.remote(), timeout=10)
    with dagc.compile(g1) as cg1, dagc.compile(g2) as cg2:

        def drive(i):
            cg = (cg1, cg2)[i]
            for n in range(60):
                assert cg.execute(n).get(timeout=10) == n + i

        _run(drive)
    assert ray.get(a.overlaps_seen.remote(), timeout=10) == before


def test_methods_may_overlap_across_dags_with_max_concurrency_2(ray_session):
    """max_concurrency=2: two DAGs' calls run at once (each ``meet`` waits for the other)."""
    a = Shared.options(max_concurrency=2).remote()
    ray.get(a.add.remote(0))
    try:
        probe = ray.get(a.__ray_call__.remote(lifecycle.probe, ""), timeout=30)
        assert probe.max_concurrency == 2
        with InputNode() as inp:
            m1 = a.meet.bind(inp)
        with InputNode() as inp:
            m2 = a.meet.bind(inp)
        with dagc.compile(m1) as cg1, dagc.compile(m2) as cg2:
            for i in range(3):
                r1, r2 = cg1.execute(i), cg2.execute(-i)
                assert (r1.get(timeout=20), r2.get(timeout=20)) == (i, -i)
    finally:
        ray.kill(a)


def test_a_caller_blocked_on_one_dag_while_another_is_busy(pair):
    a, b = pair
    with InputNode() as inp:
        slow = b.add.bind(a.sleep.bind(inp), k=0)
    with dagc.compile(slow) as cg_slow, dagc.compile(_chain(a, b)) as cg_fast:
        done = []

        def fast(_):
            for i in range(200):
                assert cg_fast.execute(i).get(timeout=10) == i + 2
            done.append(time.monotonic())

        t = threading.Thread(target=fast, args=(0,), daemon=True)
        t.start()
        # this thread blocks on the slow DAG while the other hammers the fast one
        assert [cg_slow.execute(0.2).get(timeout=20) for _ in range(3)] == [0.2] * 3
        t.join(60)
        assert done, "the fast DAG stalled while a caller waited on the slow one"
        # the other way round: the fast DAG's results come while the slow one is busy
        refs = [cg_slow.execute(0.3) for _ in range(3)]
        t0 = time.monotonic()
        assert cg_fast.execute(5).get(timeout=10) == 7
        assert time.monotonic() - t0 < 0.9  # waited for at most the one call under way
        assert [r.get(timeout=20) for r in refs] == [0.3] * 3


def test_five_dags_on_one_actor(pair):
    a = pair[0]
    cgs = []
    try:
        for k in range(5):
            with InputNode() as inp:
                cgs.append(dagc.compile(a.add.bind(inp, k=k)))
        assert len(_busy(a)) == 5
        for i in range(10):
            refs = [cg.execute(i) for cg in cgs]
            assert [r.get(timeout=10) for r in refs] == [i + k for k in range(5)]
        left = list(range(5))
        for gone in (3, 0):  # teardown in any order; the rest go on
            cgs[gone].teardown()
            left.remove(gone)
            assert [cgs[k].execute(1).get(timeout=10) for k in left] == [1 + k for k in left]
        assert len(_busy(a)) == 3
    finally:
        for cg in cgs:
            cg.teardown()


def _cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def test_idle_dags_cost_no_cpu(pair):
    a, b = pair
    pid = ray.get(a.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
    cgs = [dagc.compile(_chain(a, b, k, k)) for k in range(3)]
    try:
        for cg in cgs:
            for i in range(20):
                cg.execute(i).get(timeout=10)
        time.sleep(0.5)  # past every loop's polling budget
        c0, t0 = _cpu_seconds(pid), time.monotonic()
        time.sleep(1.0)
        used, wall = _cpu_seconds(pid) - c0, time.monotonic() - t0
        print(f"\n[multi-dag] actor CPU with 3 idle DAGs: {used * 1e3:.1f} ms in {wall:.2f} s")
        assert used < 0.1 * wall  # ~0 (futex sleeps); a spinning loop is ~1.0
    finally:
        for cg in cgs:
            cg.teardown()


def test_two_dags_with_communicators_on_the_same_actors(pair):
    """Tensor edges in both DAGs: each forms its own gloo group (own store, own port)."""
    torch = pytest.importorskip("torch")
    a, b = pair

    def dag(x, y):
        with InputNode() as inp:
            t = x.add.bind(inp).with_tensor_transport("auto")
            return y.add.bind(t)

    with dagc.compile(dag(a, b)) as cg1, dagc.compile(dag(b, a)) as cg2:
        assert any(c.transport == "comm" for c in cg1.schedule.channels)
        for n in range(5):
            r1, r2 = cg1.execute(torch.full((3,), float(n))), cg2.execute(torch.zeros(2))
            assert torch.equal(r1.get(timeout=30), torch.full((3,), n + 2.0))
            assert torch.equal(r2.get(timeout=30), torch.full((2,), 2.0))


def test_ray_code_compiling_twice_over_the_same_actors_under_the_patch(pair):
    """Ray refuses a second experimental_compile() on the same actors; dagc runs both."""
    a, b = pair
    with dagc.patched_ray(workers=False):
        with ray.dag.InputNode() as inp:
            d1 = b.add.bind(a.add.bind(inp), k=10)
        with ray.dag.InputNode() as inp:
            d2 = a.add.bind(b.add.bind(inp), k=100)
        c1 = d1.experimental_compile()
        c2 = None
        try:
            c2 = d2.experimental_compile()
            for i in range(10):
                refs = [c1.execute(i), c2.execute(i)]
                assert ray.get(refs, timeout=10) == [i + 11, i + 101]
            c1.teardown()
            assert ray.get(c2.execute(1), timeout=10) == 102
        finally:
            c1.teardown()
            if c2 is not None:
                c2.teardown()
