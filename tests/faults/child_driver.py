"""A driver in its own process, for the driver-death tests (see helpers.ChildDriver).

    python -m tests.faults.child_driver GCS_ADDRESS NAMESPACE MODE [ACTOR_NAME ...]

It joins the test's Ray cluster, compiles ``a.step -> b.step -> c.step`` over the named
actors (or over actors it creates itself when none are named), prints
``DAGC-CHILD {json}`` once executions run, then, by MODE:

    spin   keep executing until killed (killed in the middle of execute/get)
    idle   sleep until killed (the loops wait for input)
    exit   return from main without teardown (interpreter exit, atexit teardown)
    hard   os._exit(0): no atexit, no teardown
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    address, namespace, mode, *names = argv
    import ray

    import dagc
    from dagc import InputNode
    from tests.faults.actors import Node

    ray.init(address=address, namespace=namespace, log_to_driver=False,
             logging_level="ERROR")
    if names:
        actors = [ray.get_actor(n, namespace=namespace) for n in names]
    else:
        actors = [Node.remote(k) for k in range(3)]
    pids = ray.get([a.pid.remote() for a in actors], timeout=60)
    with InputNode() as inp:
        x = inp
        for a in actors:
            x = a.step.bind(x)
        dag = x
    cg = dagc.compile(dag)
    for i in range(20):
        assert cg.execute(i).get(timeout=30) == i
    info = {"token": cg._session.token, "pid": os.getpid(), "actor_pids": pids}
    print("DAGC-CHILD " + json.dumps(info), flush=True)
    if mode == "spin":
        deadline = time.monotonic() + 300
        i = 0
        while time.monotonic() < deadline:
            cg.execute(i).get(timeout=30)
            i += 1
    elif mode == "idle":
        time.sleep(300)
    elif mode == "hard":
        os._exit(0)
    elif mode == "exit":
        return 0
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
