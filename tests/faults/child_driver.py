"""A driver in its own process, for the driver-death tests (see helpers.ChildDriver).

    python -m tests.faults.child_driver GCS_ADDRESS NAMESPACE MODE [ACTOR_NAME ...]

It joins the test's Ray cluster, compiles ``a.step -> b.step -> c.step`` over the named
actors (or over actors it creates itself when none are named), prints
``DAGC-CHILD {json}`` once executions run, then, by MODE:

    spin   keep executing until killed (killed in the middle of execute/get)
    idle   sleep until killed (the loops wait for input)
    exit   return from main without teardown (interpreter exit, atexit teardown)
    hard   os._exit(0): no atexit, no teardown
    await  an asyncio task awaits an execution that node 2 holds for 120 s; the program
           returns meanwhile (asyncio.run cancels the task): exit must not wait for it
    shutdown  ray.shutdown(), print ``DAGC-SHUTDOWN``, wait for a line on stdin, then
           teardown() and exit; prints ``DAGC-AFTER {json}`` and, from the last exit hook,
           ``DAGC-EXIT {json}``: how often anything called ray.init after the shutdown
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    address, namespace, mode, *names = argv
    import atexit

    inits: list = []
    if mode == "shutdown":  # registered first, so it runs after every other exit hook
        atexit.register(lambda: print("DAGC-EXIT " + json.dumps({"inits": len(inits)}), flush=True))
    import ray

    import dagc
    from dagc import InputNode
    from tests.faults.actors import Node

    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
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
    elif mode == "await":
        return _await_and_exit(cg)
    elif mode == "shutdown":
        return _shutdown_then_teardown(ray, cg, inits)
    return 3


def _await_and_exit(cg) -> int:
    import asyncio

    async def wait_for(ref):
        return await ref

    async def main():
        task = asyncio.ensure_future(wait_for(cg.execute(("sleep", 2, 120))))
        await asyncio.sleep(0.5)
        assert not task.done()
        print("DAGC-AWAITING", flush=True)

    asyncio.run(main())
    return 0


def _shutdown_then_teardown(ray, cg, inits: list) -> int:
    def no_init(*args, **kwargs):  # never start or join a cluster from here
        inits.append(1)
        raise RuntimeError("ray.init called after ray.shutdown()")

    ray.shutdown()
    ray.init = no_init
    print("DAGC-SHUTDOWN " + json.dumps({"closed": cg.closed}), flush=True)
    sys.stdin.readline()
    error = None
    try:
        cg.teardown()
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = repr(e)
    print(
        "DAGC-AFTER "
        + json.dumps(
            {
                "closed": cg.closed,
                "inits": len(inits),
                "initialized": ray.is_initialized(),
                "error": error,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
