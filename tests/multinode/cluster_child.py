"""Runs in its own Python process (started by test_cluster.py): a local multi-node Ray
cluster, the requested checks against it, then a full shutdown.

    python tests/multinode/cluster_child.py REPORT.json CHECK [CHECK ...]

The pytest process never touches this cluster: a ``ray.init`` there (the ``ray_session``
fixture of other tests) and this cluster cannot share one Python process. The report is
JSON, rewritten after every phase so the parent can clean up even after a timeout:
``pids`` (every process this one started, with start times), ``timings`` (seconds), and
``checks`` (name -> {"ok": bool, "error": traceback or None, ...measurements}).

Nodes: head {"head": 1}, node1 {"node1": 1}, node2 {"node2": 1}, 1 CPU each (the CI box has
2 cores); actors take num_cpus=0 and a node's custom resource, which pins them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

REPORT: dict = {"pids": [], "timings": {}, "checks": {}, "nodes": {}}
_REPORT_PATH = ""


def save() -> None:
    tmp = _REPORT_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(REPORT, f, indent=1, default=str)
    os.replace(tmp, _REPORT_PATH)


def note_processes() -> None:
    """Remember every descendant (pid, start time), so the parent can prove they are gone."""
    seen = {(p, t) for p, t in REPORT["pids"]}
    for p in psutil.Process().children(recursive=True):
        try:
            seen.add((p.pid, p.create_time()))
        except psutil.Error:
            pass
    REPORT["pids"] = sorted(seen)
    save()


# -- the cluster -----------------------------------------------------------------------------
NODES: dict = {}  # name -> the cluster_utils node handle (node3 is removed by a check)


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False},
    )
    t1 = time.monotonic()
    note_processes()
    for name in ("node1", "node2", "node3"):
        NODES[name] = cluster.add_node(num_cpus=1, resources={name: 1})
    cluster.wait_for_nodes()
    t2 = time.monotonic()
    note_processes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    t3 = time.monotonic()
    REPORT["timings"].update(head=t1 - t0, workers=t2 - t1, connect=t3 - t2)
    save()
    return cluster


def stop_cluster(cluster) -> None:
    import ray

    t0 = time.monotonic()
    note_processes()
    try:
        ray.shutdown()
    finally:
        cluster.shutdown()
    REPORT["timings"]["shutdown"] = time.monotonic() - t0
    save()


def actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class Hop:
        """An actor that can hold one TCP writer and one TCP reader and relay between them."""

        def __init__(self, name):
            self.name = name
            self.w = self.r = None
            self.relayed = 0
            self.stopped_by = None

        def where(self):
            ctx = ray.get_runtime_context()
            return {
                "node": ctx.get_node_id(),
                "pid": os.getpid(),
                "ip": ray.util.get_node_ip_address(),
            }

        def fwd(self, x):
            return x + 1

        def add(self, x, y):
            return x + y

        def maybe_bad(self, x):
            """x, or for "bad" a value that pickles but fails to unpickle on its reader."""
            if x == "bad":
                from tests.faults.actors import BadUnpickle

                return BadUnpickle()
            return x

        def open_writer(self, channel, nreaders, slots, secret):
            from dagc.runtime.channels.tcp import TcpWriter

            self.w = TcpWriter(channel, nreaders, slots, secret, connect_timeout=60)
            return self.w.listen(ray.util.get_node_ip_address())

        def open_reader(self, channel, host, port, secret, index, writer_name):
            from dagc.runtime.channels.tcp import TcpReader

            self.r = TcpReader(
                host,
                port,
                secret,
                index,
                channel=channel,
                writer_name=writer_name,
                connect_timeout=60,
            )
            return True

        def relay(self):
            from dagc.runtime.channels import ChannelClosed, PeerDied

            def run():
                try:
                    while True:
                        self.w.write(self.r.read())
                        self.relayed += 1
                except (ChannelClosed, PeerDied) as e:
                    self.stopped_by = f"{type(e).__name__}({e})"

            threading.Thread(target=run, daemon=True).start()
            return True

        def status(self):
            return {"relayed": self.relayed, "stopped_by": self.stopped_by}

        def close(self):
            for end in (self.r, self.w):
                if end is not None:
                    end.close()
            return True

    return Hop


def pinned(Hop, node: str, name: str):
    return Hop.options(resources={node: 0.01}, name=None).remote(name)


# -- checks ----------------------------------------------------------------------------------
def check_cluster(ctx) -> dict:
    import ray

    Hop = ctx["Hop"]
    t0 = time.monotonic()
    a, b = pinned(Hop, "node1", "a"), pinned(Hop, "node2", "b")
    wa, wb = ray.get([a.where.remote(), b.where.remote()], timeout=120)
    out = {
        "actors_ready_s": time.monotonic() - t0,
        "a": wa,
        "b": wb,
        "driver_node": ray.get_runtime_context().get_node_id(),
        "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
    }
    note_processes()
    ctx["a"], ctx["b"] = a, b
    return out


def check_tcp(ctx) -> dict:
    """driver -> a (node1) -> b (node2) -> driver, each hop an authenticated TCP channel."""
    import numpy as np
    import ray

    from dagc.runtime.channels.tcp import TcpReader, TcpWriter, new_secret

    a, b = ctx["a"], ctx["b"]
    secret = new_secret()
    ip = ray.util.get_node_ip_address()
    t0 = time.monotonic()
    # round 1: every writer listens and reports its address
    w_in = TcpWriter("in", 1, 4, secret, reader_names=["a"], connect_timeout=60)
    addr_in = w_in.listen(ip)
    addr_ab, addr_bd = ray.get(
        [a.open_writer.remote("ab", 1, 4, secret), b.open_writer.remote("bd", 1, 4, secret)],
        timeout=60,
    )
    # round 2: every reader connects (the writers' accept threads are already running)
    refs = [
        a.open_reader.remote("in", *addr_in, secret, 0, "driver"),
        b.open_reader.remote("ab", *addr_ab, secret, 0, "a"),
    ]
    r_out = TcpReader(*addr_bd, secret, 0, channel="bd", writer_name="b", connect_timeout=60)
    ray.get(refs, timeout=60)
    ray.get([a.relay.remote(), b.relay.remote()], timeout=60)
    setup = time.monotonic() - t0
    ctx.update(w_in=w_in, r_out=r_out)
    deadline = lambda: time.monotonic() + 30
    values = [1, "two", {"three": [3]}, np.arange(1000, dtype=np.float32)]
    got = []
    for v in values:
        w_in.write(v, deadline())
        got.append(r_out.read(deadline()))
    same = got[:3] == values[:3] and np.array_equal(got[3], values[3])
    big = np.random.default_rng(0).random(10 << 17)  # 10 MiB
    t1 = time.perf_counter()
    w_in.write(big, deadline())
    big_ok = np.array_equal(r_out.read(deadline()), big)
    big_s = time.perf_counter() - t1
    for i in range(200):
        w_in.write(i, deadline())
        r_out.read(deadline())
    ts = []
    for i in range(2000):
        t = time.perf_counter()
        w_in.write(i, deadline())
        r_out.read(deadline())
        ts.append(time.perf_counter() - t)
    ts.sort()
    return {
        "setup_s": setup,
        "values_ok": bool(same),
        "big_ok": bool(big_ok),
        "big_10mib_s": big_s,
        "hops": 3,
        "rtt_us": {
            q: ts[int(len(ts) * f)] * 1e6 for q, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        },
    }


def check_peer_death(ctx) -> dict:
    """Kill b (node2): the driver's read of b's channel must end in PeerDied("b")."""
    import ray

    from dagc.runtime.channels import PeerDied

    w_in, r_out = ctx["w_in"], ctx["r_out"]
    box = {}

    def read():
        try:
            r_out.read(time.monotonic() + 30)
            box["error"] = "read returned a value"
        except PeerDied as e:
            box["who"] = e.who
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            box["error"] = repr(e)

    th = threading.Thread(target=read, daemon=True)
    th.start()
    time.sleep(0.2)
    ray.kill(ctx["b"], no_restart=True)
    t0 = time.monotonic()
    th.join(30)
    detect = time.monotonic() - t0
    # a (node1) learns too: its next write to b fails
    w_in.write("after", time.monotonic() + 10)
    a_status = None
    for _ in range(50):
        a_status = ray.get(ctx["a"].status.remote(), timeout=30)
        if a_status["stopped_by"]:
            break
        time.sleep(0.1)
    return {
        "who": box.get("who"),
        "error": box.get("error"),
        "detect_s": detect,
        "a_status": a_status,
    }


def check_dagc_pipeline(ctx) -> dict:
    """dagc.compile over actors on two other nodes: tcp channels, one result per execute."""
    import dagc

    Hop = ctx["Hop"]
    a, b = pinned(Hop, "node1", "pa"), pinned(Hop, "node2", "pb")
    with dagc.InputNode() as inp:
        dag = b.fwd.bind(a.fwd.bind(inp))
    with dagc.compile(dag) as cg:
        transports = sorted({c.transport for c in cg._ir.channels})
        results = [cg.execute(i).get(timeout=60) for i in range(20)]
    return {"transports": transports, "results_ok": results == [i + 2 for i in range(20)]}


def check_dagc_actor_death(ctx) -> dict:
    """Killing an actor on another node ends every pending get() with ActorDiedError."""
    import ray

    import dagc

    Hop = ctx["Hop"]
    a, b = pinned(Hop, "node1", "da"), pinned(Hop, "node2", "db")
    with dagc.InputNode() as inp:
        dag = b.fwd.bind(a.fwd.bind(inp))
    cg = dagc.compile(dag)
    try:
        assert cg.execute(1).get(timeout=60) == 3
        ray.kill(b, no_restart=True)  # asynchronous: b may still answer a few times
        t0 = time.monotonic()
        raised = None
        while raised is None and time.monotonic() - t0 < 30:
            try:
                cg.execute(2).get(timeout=60)
            except dagc.ActorDiedError as e:
                raised = str(e)
        return {"raised": raised, "detect_s": time.monotonic() - t0}
    finally:
        cg.teardown()


def check_dagc_restart(ctx) -> dict:
    """An actor on node2 with max_restarts=1 killed mid-stream: Ray restarts it (on node2,
    where its resource pins it), the DAG re-prepares its TCP channels by itself and every
    later execution is right (tests/faults/test_restart.py across nodes)."""
    import ray

    import dagc

    Hop = ctx["Hop"]
    a = pinned(Hop, "node1", "ra")
    b = Hop.options(resources={"node2": 0.01}, max_restarts=1).remote("rb")
    with dagc.InputNode() as inp:
        dag = b.fwd.bind(a.fwd.bind(inp))
    cg = dagc.compile(dag)
    events = []
    cg.on_restart(events.append)
    try:
        token0 = cg._session.token
        transports = sorted({c.transport for c in cg._ir.channels})
        pid0 = ray.get(b.where.remote(), timeout=60)["pid"]
        out, noticed, first_good, t_kill = [], None, None, None
        i = 0
        while noticed is None or i < noticed + 20:
            if i == 5:
                t_kill = time.monotonic()
                ray.kill(b, no_restart=False)
            try:
                out.append(cg.execute(i).get(timeout=60) == i + 2)
            except dagc.ActorDiedError:
                out.append(None)
                noticed = i if noticed is None else noticed
            if noticed is not None and first_good is None and out[-1]:
                first_good = time.monotonic() - t_kill
            i += 1
            assert t_kill is None or time.monotonic() - t_kill < 60, "death not noticed"
        where = ray.get(b.where.remote(), timeout=60)
        return {
            "transports": transports,
            "lost": out.count(None),
            "before_ok": all(out[:5]),
            "after_ok": all(out[noticed + 1 :]) if noticed is not None else False,
            "wrong": out.count(False),
            "restarts": cg.restarts,
            "event_s": events[0].seconds if events else None,
            "first_good_s": first_good,
            "new_pid": where["pid"] != pid0,
            "new_token": cg._session.token != token0,
        }
    finally:
        cg.teardown()
        ray.kill(b)


def check_dagc_idle_remote_death(ctx) -> dict:
    """An idle DAG: the middle of a chain, on node2, read only by an actor on node1 that
    waits on the driver's input first, is killed (Ray restarts it). No socket of the
    driver's node ends and no loop there waits on it: the watcher reads Ray's actor table
    and the DAG re-prepares by itself, before any execution."""
    import ray

    import dagc

    Hop = ctx["Hop"]
    a, c = pinned(Hop, "node1", "ia"), pinned(Hop, "node1", "ic")
    b = Hop.options(resources={"node2": 0.01}, max_restarts=1).remote("ib")
    with dagc.InputNode() as inp:
        dag = c.add.bind(inp, b.fwd.bind(a.fwd.bind(inp)))
    cg = dagc.compile(dag)
    try:
        before = [cg.execute(i).get(timeout=60) == 2 * i + 2 for i in range(5)]
        t_kill = time.monotonic()
        ray.kill(b, no_restart=False)
        while cg.restarts == 0 and time.monotonic() - t_kill < 30:
            time.sleep(0.05)
        noticed_s = time.monotonic() - t_kill if cg.restarts else None
        after = [cg.execute(i).get(timeout=60) == 2 * i + 2 for i in range(5)]
        return {
            "before_ok": all(before),
            "noticed_s": noticed_s,
            "restarts": cg.restarts,
            "after_ok": all(after),
        }
    finally:
        cg.teardown()
        for h in (a, b, c):
            ray.kill(h)


def check_dagc_teardown(ctx) -> dict:
    """teardown() is prompt across nodes and the same actors compile again."""
    import dagc

    Hop = ctx["Hop"]
    a, b = pinned(Hop, "node1", "ta"), pinned(Hop, "node2", "tb")
    with dagc.InputNode() as inp:
        dag = b.fwd.bind(a.fwd.bind(inp))
    times = []
    for _ in range(2):
        cg = dagc.compile(dag)
        assert cg.execute(5).get(timeout=60) == 7
        t0 = time.monotonic()
        cg.teardown()
        times.append(time.monotonic() - t0)
    return {"teardown_s": times}


def check_dagc_fanout(ctx) -> dict:
    """A value read on two nodes and by the driver; a revisit of node1; shm on node1."""
    import dagc

    Hop = ctx["Hop"]
    a, c = pinned(Hop, "node1", "fa"), pinned(Hop, "node1", "fc")
    b = pinned(Hop, "node2", "fb")
    with dagc.InputNode() as inp:
        x = a.fwd.bind(inp)
        y = b.fwd.bind(x)
        z = c.fwd.bind(x)  # same node as a: shared memory on node1
        back = a.fwd.bind(y)  # node2 -> node1 again
        direct = b.fwd.bind(inp)  # the input goes to both nodes: two channels
        dag = dagc.MultiOutputNode([y, z, x, back, direct])
    with dagc.compile(dag) as cg:
        chans = {(c_.value, c_.transport, c_.readers) for c_ in cg._ir.channels}
        results = [cg.execute(i).get(timeout=60) for i in range(20)]
        big = cg.execute(10**6).get(timeout=60)
    want = [[i + 2, i + 2, i + 1, i + 3, i + 1] for i in range(20)]
    return {
        "transports": sorted({t for _, t, _ in chans}),
        "results_ok": results == want,
        "big_ok": big == [10**6 + 2, 10**6 + 2, 10**6 + 1, 10**6 + 3, 10**6 + 1],
        "channels": sorted(map(str, chans)),
    }


def check_dagc_node_killed(ctx) -> dict:
    """A whole node (raylet and its workers) removed mid-run: ActorDiedError, no hang."""
    import dagc

    Hop = ctx["Hop"]
    a, d = pinned(Hop, "node1", "ka"), pinned(Hop, "node3", "kd")
    with dagc.InputNode() as inp:
        dag = a.fwd.bind(d.fwd.bind(a.fwd.bind(inp)))
    cg = dagc.compile(dag)
    try:
        assert cg.execute(1).get(timeout=60) == 4
        refs = [cg.execute(i) for i in range(3)]
        t0 = time.monotonic()
        CLUSTER[0].remove_node(NODES["node3"], allow_graceful=False)
        raised = None
        while raised is None and time.monotonic() - t0 < 60:
            try:
                for r in refs:
                    r.get(timeout=60)
                refs = [cg.execute(2)]
            except dagc.ActorDiedError as e:
                raised = str(e)
        return {"raised": raised, "detect_s": time.monotonic() - t0}
    finally:
        t1 = time.monotonic()
        cg.teardown()
        REPORT.setdefault("timings", {})["teardown_after_node_loss"] = time.monotonic() - t1


def _tcp_ends(ends: dict) -> list:
    """[(channel, "reader"|"writer", tls files set?, every socket a TLS socket?)]."""
    import ssl

    from dagc.runtime.channels.tcp import TcpReader, TcpWriter

    out = []
    for cid, e in sorted(ends.items()):
        if isinstance(e, TcpReader):
            out.append((cid, "reader", e.tls is not None, isinstance(e.sock, ssl.SSLSocket)))
        elif isinstance(e, TcpWriter):
            e.connected()
            out.append(
                (
                    cid,
                    "writer",
                    e.tls is not None,
                    bool(e._conns) and all(isinstance(c.sock, ssl.SSLSocket) for c in e._conns),
                )
            )
    return out


def _actor_tcp_ends(instance, token: str) -> list:
    """Runs in an actor (``__ray_call__``): its loop's TCP ends."""
    from dagc.runtime.actor.loop import LOOPS

    loop = LOOPS[token]
    return _tcp_ends(loop._readers) + _tcp_ends(loop._writers)


def check_dagc_tls(ctx) -> dict:
    """Which TCP ends of a cross-node DAG run TLS (driver and both actors), and that the DAG
    runs: every one when the cluster runs with RAY_USE_TLS, none otherwise."""
    import numpy as np
    import ray

    import dagc
    from dagc import config

    Hop = ctx["Hop"]
    a, b = pinned(Hop, "node1", "la"), pinned(Hop, "node2", "lb")
    with dagc.InputNode() as inp:
        dag = b.fwd.bind(a.fwd.bind(inp))
    with dagc.compile(dag) as cg:
        results = [cg.execute(i).get(timeout=60) for i in range(20)]
        big = cg.execute(np.arange(1 << 20)).get(timeout=60)
        ends = {"driver": _tcp_ends(cg._session.readers) + _tcp_ends(cg._session.writers)}
        for name, h in (("a", a), ("b", b)):
            ends[name] = ray.get(
                h.__ray_call__.remote(_actor_tcp_ends, cg._session.token), timeout=60
            )
    flags = [x for es in ends.values() for _, _, files, sock in es for x in (files, sock)]
    return {
        "env_tls": config.ray_tls() is not None,
        "ends": ends,
        "all_tls": bool(flags) and all(flags),
        "none_tls": not any(flags),
        "results_ok": results == [i + 2 for i in range(20)],
        "big_ok": bool(np.array_equal(big, np.arange(1 << 20) + 2)),
    }


def check_dagc_unpickle(ctx) -> dict:
    """A value that fails to unpickle on its TCP reader (the driver; an actor), more times
    than the window holds, pipelined: each such execution gets its TaskError naming the
    value and why, every other execution its own result (nothing shifts, nothing hangs)."""
    import dagc

    Hop = ctx["Hop"]
    a, b = pinned(Hop, "node1", "ua"), pinned(Hop, "node2", "ub")
    inputs = [1, "bad", 2, "bad", "bad", 3, "bad", "bad", 4, 5]
    out = {}
    for where in ("driver", "actor"):
        with dagc.InputNode() as inp:
            x = a.maybe_bad.bind(inp)
            dag = x if where == "driver" else b.maybe_bad.bind(x)
        with dagc.compile(dag, max_inflight=2) as cg:
            transports = sorted({c.transport for c in cg._ir.channels if c.value != "in"})
            got = []
            for lo in range(0, len(inputs), 2):  # two in flight at a time
                refs = [cg.execute(v) for v in inputs[lo : lo + 2]]
                for ref in refs:
                    try:
                        got.append(ref.get(timeout=60))
                    except dagc.TaskError as e:
                        got.append(str(e))
        bad = [g for v, g in zip(inputs, got) if v == "bad"]
        out[where] = {
            "transports": transports,
            "results_ok": [g for v, g in zip(inputs, got) if v != "bad"] == [1, 2, 3, 4, 5],
            "errors_ok": all(
                isinstance(g, str)
                and "BadUnpickle cannot be loaded" in g
                and "a value sent by a0:Hop on channel c" in g
                and "could not be unpickled" in g
                for g in bad
            ),
            "first_error": bad[0] if bad else None,
        }
    return out


CLUSTER: list = []

CHECKS = {
    "dagc_tls": check_dagc_tls,
    "cluster": check_cluster,
    "dagc_fanout": check_dagc_fanout,
    "dagc_node_killed": check_dagc_node_killed,
    "tcp": check_tcp,
    "peer_death": check_peer_death,
    "dagc_pipeline": check_dagc_pipeline,
    "dagc_actor_death": check_dagc_actor_death,
    "dagc_restart": check_dagc_restart,
    "dagc_teardown": check_dagc_teardown,
    "dagc_idle_remote_death": check_dagc_idle_remote_death,
    "dagc_unpickle": check_dagc_unpickle,
}
NEEDS = {"tcp": "cluster", "peer_death": "tcp"}


def main(argv) -> int:
    global _REPORT_PATH
    _REPORT_PATH = argv[1]
    names = argv[2:] or list(CHECKS)
    REPORT["requested"] = names
    save()
    from tests.helpers import ray_address_file_kept

    t0 = time.monotonic()
    # the Cluster points this machine's "current cluster" file at itself: put it back after
    with ray_address_file_kept():
        _run_checks(names)
    REPORT["timings"]["total"] = time.monotonic() - t0
    save()
    return 0


def _run_checks(names) -> None:
    cluster = start_cluster()
    CLUSTER.append(cluster)
    try:
        ctx = {"Hop": actor_class()}
        for name in names:
            need = NEEDS.get(name)
            if need and not REPORT["checks"].get(need, {}).get("ok"):
                REPORT["checks"][name] = {"ok": False, "error": f"needs check {need!r} first"}
                continue
            t = time.monotonic()
            try:
                out = CHECKS[name](ctx)
                out.update(ok=True, error=None)
            except BaseException:  # noqa: BLE001 - reported to the parent
                out = {"ok": False, "error": traceback.format_exc()}
            out["seconds"] = time.monotonic() - t
            REPORT["checks"][name] = out
            save()
        note_processes()
    finally:
        stop_cluster(cluster)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
