"""A compile that fails after the prepare round leaves every actor exactly as it found it:
threads, fds, sockets (no TCP listener, no accept thread), mappings, /dev/shm names and
dagc's own tables; the driver too. The same actors then compile and run.

The actors claim nodes of their own (helpers.fake_placement / fake_probe), so one machine
compiles them the multi-node way: a prepare round (each node's leader creates its node's
control and ring segments, TCP writers start listening), then the start round::

    driver node:  driver          driver -> a0 and a2 -> driver over TCP
    fake-node-0:  a0 (leader)     a0 -> a1 over TCP (a0 listens from the prepare round on)
    fake-node-1:  a1 (leader), a2 a1 -> a2 shared memory (or a communicator)

Each case makes the compile fail at another point after prepare, on a2 or before any
start: a2 writes to the driver only, which connects before the start round, so no other
actor's start waits for a2.
"""

import dataclasses
import gc

import pytest

import dagc
from dagc import InputNode
from dagc.runtime.actor import lifecycle, prepared
from dagc.runtime.actor.plan import PrepareSpec, TcpOut
from dagc.runtime.driver import compiled, plans
from tests.faults import helpers
from tests.faults.helpers import census, segments

BOUND = 20.0


def _chain(a0, a1, a2, tensor=False):
    with InputNode() as inp:
        x = a0.step.bind(inp)
        if tensor:  # a1 -> a2 through the compile's communicator
            x = a1.tensor.bind(x).with_tensor_transport("nccl")
        else:
            x = a1.step.bind(x)
        return a2.step.bind(x)


def _all_states(ray, hs):
    return [ray.get(h.__ray_call__.remote(census), timeout=30) for h in hs] + [census()]


def _settle(ray, hs, before, timeout=BOUND):
    """Wait until every process is back to ``before``; fail showing the difference."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        now = _all_states(ray, hs)
        if now == before:
            return
        if time.monotonic() > deadline:
            names = ["a0", "a1", "a2", "driver"]
            diff = {
                names[i]: {k: (b[k], n[k]) for k in b if b[k] != n[k]}
                for i, (b, n) in enumerate(zip(before, now))
                if b != n
            }
            raise AssertionError(
                f"the failed compile left something behind (before, after): {diff}"
            )
        time.sleep(0.2)


@pytest.fixture
def placed(ray, nodes, monkeypatch):
    a0, a1, a2 = nodes(3)
    _place(ray, a0, a1, a2, monkeypatch)
    return a0, a1, a2


def _place(ray, a0, a1, a2, monkeypatch):
    ray.get(
        [
            a0.__ray_call__.remote(helpers.fake_placement, "fake-node-0"),
            a1.__ray_call__.remote(helpers.fake_placement, "fake-node-1"),
            a2.__ray_call__.remote(helpers.fake_placement, "fake-node-1"),
        ],
        timeout=30,
    )
    monkeypatch.setattr(lifecycle, "probe", helpers.fake_probe)


def _plan_for_a2(monkeypatch, change):
    real = plans.actor_plan

    def plan(layout, ir, actor, *args):
        p = real(layout, ir, actor, *args)
        return change(p) if actor.id == "a2" else p

    monkeypatch.setattr(plans, "actor_plan", plan)


def _missing_segment(p):
    cid, ring = next(iter(p.readers.items()))
    return dataclasses.replace(
        p, readers={**p.readers, cid: dataclasses.replace(ring, segment=p.prefix + "c99")}
    )


def _missing_method(p):
    assert "rt.method('step')" in p.source
    return dataclasses.replace(
        p, source=p.source.replace("rt.method('step')", "rt.method('no_such_method')")
    )


CASES = {
    # rank 0 of the communicator fails to prepare: after the prepare round, before start
    "communicator-prepare": (True, "prepare communicators"),
    # a2 cannot open its ring: its start fails before it adopts its TCP writer
    "ring-missing": (False, "No such file"),
    # a2's module binds a method its actor does not have: start fails in bind()
    "method-missing": (False, "no_such_method"),
    # a2 cannot listen on its address: prepare fails there, while a0 listens already
    "listen-fails": (False, "prepare their nodes' channels"),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(CASES))
def test_failed_compile_leaves_actors_as_they_were(ray, placed, monkeypatch, case):
    a0, a1, a2 = hs = placed
    tensor, words = CASES[case]
    _run_once(a0, a1, a2, tensor)  # warm up: lazy imports, Ray's own threads
    gc.collect()  # what earlier tests left to the garbage collector
    _settle(ray, hs, _all_states(ray, hs), 5)  # nothing moves once it is gone
    before = _all_states(ray, hs)
    assert not any(
        s["prepared"] or s["loops"] or s["dagc_threads"] or s["shm_maps"] for s in before
    ), before

    options = {}
    if case == "communicator-prepare":
        from tests.faults.comms import BadPrepareComm

        options["communicator"] = BadPrepareComm()
    elif case == "ring-missing":
        _plan_for_a2(monkeypatch, _missing_segment)
    elif case == "method-missing":
        _plan_for_a2(monkeypatch, _missing_method)
    elif case == "listen-fails":  # TEST-NET-1: not an address of this machine
        ray.get(
            a2.__ray_call__.remote(helpers.fake_placement, "fake-node-1", "192.0.2.1"), timeout=30
        )
    with pytest.raises(dagc.DagcError) as ei:
        dagc.compile(_chain(a0, a1, a2, tensor), **options)
    assert words in str(ei.value), str(ei.value)
    token = compiled.CREATED_PREFIXES[-1][len("dagc-") : -1]

    _settle(ray, hs, before)
    assert not segments(token)

    # the actors are as good as new: the same DAG compiles and runs
    monkeypatch.undo()
    _place(ray, a0, a1, a2, monkeypatch)
    _run_once(a0, a1, a2, tensor, names_gone=True)


def _run_once(a0, a1, a2, tensor, names_gone=False):
    with dagc.compile(_chain(a0, a1, a2, tensor)) as cg:
        assert sorted(c.transport for c in cg._ir.channels).count("tcp") == 3
        if names_gone:  # three nodes' control segments and a ring: all names went once
            assert not segments(cg._session.token), segments(
                cg._session.token
            )  # their node mapped them
        assert cg.execute(1).get(timeout=60) is not None


@pytest.mark.timeout(60)
def test_prepared_writers_of_a_vanished_driver_expire():
    """A driver that dies between the prepare round and the start round never sends the
    stop request: the writers its compile left listening go at the actor's next probe,
    prepare or start once they expired (no thread waits for that)."""
    import threading
    import time

    from dagc.runtime.channels import tcp

    token = "f" * 24
    spec = PrepareSpec(
        secret=tcp.new_secret(),
        host="127.0.0.1",
        timeout=0.1,
        tcp=(TcpOut("c0", 1, 2, (2,), ("a1:Node",)),),
    )
    ((host, port),) = prepared.prepare(None, token, spec).values()
    try:
        w = prepared._PREPARED[token]["writers"]["c0"]
        assert w.address == (host, port)
        prepared.expire()  # not yet expired: kept
        assert token in prepared.tokens()
        prepared._PREPARED[token]["expires"] = time.monotonic() - 1
        prepared.expire()
        assert token not in prepared.tokens()
        deadline = time.monotonic() + 5
        while any(t.name.endswith(f"{token}:c0") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the accept thread did not end"
            time.sleep(0.05)
    finally:
        prepared.discard(token)
