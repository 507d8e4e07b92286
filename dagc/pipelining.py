"""Pipeline-parallel training DAGs from a schedule: GPipe or 1F1B, generated, not hand-written.

    import dagc
    from dagc.pipelining import microbatch_args

    stages = [Stage.remote(s, num_stages=4) for s in range(4)]      # your actors
    dag = dagc.pipeline(stages, microbatches=8, schedule="1f1b")     # a plain Ray DAG
    with dagc.compile(dag) as cg:
        print(cg.schedule)                                          # the 1F1B pattern
        out = cg.execute(*microbatch_args(x, y, 8)).get()
        losses, step_results = out[:8], out[8:]

:func:`pipeline` binds every stage's ``forward`` and ``backward`` calls of one training
step (all microbatches) in the order the schedule gives that stage, and one ``step`` per
stage after its last backward. Actors run bound methods in bind order (dagc guarantees it,
as Ray Compiled Graph does), so the compiled DAG runs exactly that schedule; dagc's
deadlock simulator checks it at compile time. The result is an ordinary Ray DAG: compile it
with ``dagc.compile(dag)`` (or Ray's ``dag.experimental_compile()``).

Stage actors
------------
``stages[s]`` is an actor handle; stage 0 is first. Each stage must expose:

``forward(mb, x)``
    Microbatch ``mb`` (an int, 0 .. M-1) forward: ``x`` is the microbatch's input (stage
    0) or the previous stage's ``forward`` result. Keep what backward needs (e.g. the input
    with ``requires_grad`` and the output), keyed by ``mb``. Return the activation for the
    next stage (a tensor: it travels over the communicator).
    The **last** stage is called ``forward(mb, x, target)`` and returns the microbatch's
    loss as a Python float (it keeps the loss tensor for backward).
``backward(mb, grad)``
    Microbatch ``mb`` backward. ``grad`` is the gradient of the loss with respect to this
    stage's output (the next stage's ``backward`` result); for the last stage it is what
    its own ``forward(mb, ...)`` returned (the loss), so it starts from its stored loss.
    **Accumulate** parameter gradients (``loss.backward()`` / ``out.backward(grad)`` do),
    drop the stored activations of ``mb``, and return the gradient with respect to this
    stage's input ``x`` (a tensor; stage 0 may return None).
``step(*done)``
    Called once per execution, after the stage's last ``backward``. Apply the accumulated
    gradients and zero them (``optimizer.step(); optimizer.zero_grad()``); whatever it
    returns (e.g. the gradient norm, or None) is part of ``execute()``'s result. ``done``
    are backward results, passed only so that the DAG reaches every call (a Ray DAG is
    what its output depends on): stage 0 gets all M of its backward results (nothing else
    reads them), the other stages their last one. Ignore them: ``def step(self, *_)``.
    To accumulate over several executions, make ``step`` skip the update until you want it.

Scale losses by 1/M inside the last stage if the gradient should be the mean over
microbatches (as a single-process loop over microbatches would do).

Executing
---------
``cg.execute(x_0, ..., x_{M-1}, y_0, ..., y_{M-1})``: the M microbatch inputs (read by stage
0), then the M targets (read by the last stage). :func:`microbatch_args` makes that tuple
from a batch: ``cg.execute(*microbatch_args(x, y, M))``.

It returns a list of ``M + P`` values: the M losses (microbatch order), then what each
stage's ``step`` returned (stage order).

Schedules (P stages, M microbatches; Fm / Bm = forward / backward of microbatch m)
--------------------------------------------------------------------------------------
``"gpipe"``  every stage: F0 .. F(M-1), then B0 .. B(M-1). Keeps M microbatches'
             activations alive per stage.
``"1f1b"``   stage s: P-1-s warm-up forwards, then one forward and one backward in turn,
             then the remaining backwards (PipeDream-Flush / Megatron's non-interleaved
             1F1B). Keeps at most P-s microbatches' activations alive on stage s.

Both have the same ideal bubble fraction, (P-1)/(M+P-1) (:func:`theoretical_bubble`);
:func:`measured_bubble` reads it off a ``cg.profile(n)``, :func:`bubble_fraction` off your
own timings, and :func:`stage_orders` gives the per-stage order as text (``["F0", "F1",
"B0", ...]``). Each stage's backwards run in microbatch order in both schedules, so
gradients accumulate in the same order as a single-process loop over the microbatches.

1F1B and blocking receives: in 1F1B a stage's next forward input arrives while it still
has a backward to run. dagc's schedule pass places each blocking receive where the stage
needs the value (before its first use or the stage's next communicator op), not where the
value was made, when its simulator predicts that finishes sooner - so a stage runs
microbatch m's backward before it blocks for m+1's activation. (It used to receive first
and idle: a measured 1F1B bubble of 0.39 at 2 stages x 4 microbatches against a theory of
0.20.) The simulator predicts the theory's bubble for both schedules, with or without
``overlap_communication``; compile with ``costs=cg.profile(n)`` for it to place receives by
measured costs. Measured figures: benchmarks/README.md, "Pipeline bubble".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

SCHEDULES = ("gpipe", "1f1b")

__all__ = [
    "pipeline",
    "microbatch_args",
    "stage_orders",
    "theoretical_bubble",
    "measured_bubble",
    "bubble_fraction",
    "SCHEDULES",
]


def stage_orders(num_stages: int, microbatches: int, schedule: str = "1f1b") -> list[list[str]]:
    """Per stage, the order of its calls: ``[["F0", "F1", "B0", ...], ...]``."""
    p, m = int(num_stages), int(microbatches)
    if p < 1 or m < 1:
        raise ValueError(
            f"need at least one stage and one microbatch (got {p} stages, {m} microbatches)"
        )
    if schedule not in SCHEDULES:
        raise ValueError(
            f"unknown pipeline schedule {schedule!r}; use one of "
            f"{', '.join(repr(s) for s in SCHEDULES)}"
        )
    orders = []
    for s in range(p):
        if schedule == "gpipe":
            order = [f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)]
        else:
            warm = min(p - 1 - s, m)
            order = [f"F{i}" for i in range(warm)]
            for i in range(m - warm):
                order += [f"F{warm + i}", f"B{i}"]
            order += [f"B{i}" for i in range(m - warm, m)]
        orders.append(order)
    return orders


def theoretical_bubble(num_stages: int, microbatches: int) -> float:
    """The ideal bubble fraction of GPipe and 1F1B: (P-1) / (M+P-1)."""
    return (num_stages - 1) / (microbatches + num_stages - 1)


def pipeline(
    stages: Sequence[Any], microbatches: int, schedule: str = "1f1b", *, transport: Any = "nccl"
):
    """The forward/backward DAG of one training step over ``microbatches`` microbatches.

    Args:
        stages: the stage actor handles, first stage first (see the module docstring for
            the methods they must expose: ``forward``, ``backward``, ``step``).
        microbatches: M, the number of microbatches per execution.
        schedule: ``"1f1b"`` (default) or ``"gpipe"``: the order of each stage's calls.
        transport: how activations and gradients move between stages, passed to
            ``with_tensor_transport``: ``"nccl"`` (dagc: NCCL between GPU actors, gloo
            between CPU actors), ``"auto"``, or a communicator instance (e.g. Ray's
            ``CPUCommunicator`` when compiling with Ray Compiled Graph on CPU actors);
            None sends them through ordinary channels.

    Returns:
        A Ray DAG (a ``MultiOutputNode``). ``execute(x_0..x_{M-1}, y_0..y_{M-1})`` returns
        ``[loss_0, ..., loss_{M-1}, stage_0_step, ..., stage_{P-1}_step]``.
    """
    from ray.dag import InputNode, MultiOutputNode

    stages = list(stages)
    p, m = len(stages), int(microbatches)
    if len({getattr(s, "_actor_id", id(s)) for s in stages}) != p:
        raise ValueError("pipeline(): each stage must be a different actor")
    orders = stage_orders(p, m, schedule)

    def edge(node):
        return node if transport is None else node.with_tensor_transport(transport)

    fwd: dict[tuple[int, int], Any] = {}  # (stage, mb) -> forward node
    bwd: dict[tuple[int, int], Any] = {}  # (stage, mb) -> backward node
    queues = [deque(o) for o in orders]
    with InputNode() as inp:
        # Bind in a global order that keeps each stage's own order and binds every call
        # after the calls it reads (round robin over the stages; a valid schedule always
        # has a stage whose next call is ready).
        while any(queues):
            progressed = False
            for s, q in enumerate(queues):
                while q:
                    kind, mb = q[0][0], int(q[0][1:])
                    last = s == p - 1
                    if kind == "F":
                        if s > 0 and (s - 1, mb) not in fwd:
                            break
                        x = inp[mb] if s == 0 else fwd[(s - 1, mb)]
                        if last:
                            node = stages[s].forward.bind(mb, x, inp[m + mb])
                        else:
                            node = edge(stages[s].forward.bind(mb, x))
                        fwd[(s, mb)] = node
                    else:
                        if (s, mb) not in fwd or (not last and (s + 1, mb) not in bwd):
                            break
                        grad = fwd[(s, mb)] if last else bwd[(s + 1, mb)]
                        node = stages[s].backward.bind(mb, grad)
                        bwd[(s, mb)] = node if s == 0 else edge(node)
                    q.popleft()
                    progressed = True
            if not progressed:  # cannot happen for the schedules above
                raise RuntimeError(
                    f"pipeline(): schedule {schedule!r} is not executable: "
                    f"next calls {[q[0] for q in queues if q]}"
                )
        finals = []
        for s in range(p):
            done = [bwd[(0, i)] for i in range(m)] if s == 0 else [bwd[(s, int(orders[s][-1][1:]))]]
            finals.append(stages[s].step.bind(*done))
        losses = [fwd[(p - 1, i)] for i in range(m)]
        return MultiOutputNode(losses + finals)


def microbatch_args(x, y, microbatches: int) -> tuple:
    """``(x_0, ..., x_{M-1}, y_0, ..., y_{M-1})``: a batch split along dim 0 into M.

    ``x`` and ``y`` are tensors (``torch.chunk``) or sequences already split into M
    microbatches.
    """
    m = int(microbatches)

    def split(v):
        if hasattr(v, "chunk"):
            parts = tuple(v.chunk(m))
        else:
            parts = tuple(v)
        if len(parts) != m:
            raise ValueError(
                f"cannot split a batch of {len(parts)} into {m} microbatches "
                f"(need a batch size that is a multiple of {m})"
            )
        return parts

    return split(x) + split(y)


def bubble_fraction(spans, num_stages: int) -> dict:
    """The bubble fraction of timed forward/backward calls.

    ``spans``: ``(execution, stage, start, end)`` per forward or backward call (any time
    unit; one clock for all stages). Per execution: ``span`` = first start to last end over
    all stages, ``busy`` = the summed call durations, ``bubble = 1 - busy / (P * span)``:
    the share of the P stages' time inside the pipeline spent not computing (waiting for a
    neighbour, communication, dagc overhead). Returns ``{"bubble": median over executions,
    "per_execution": [...], "stages": P, "span": median span, "busy": median busy per
    stage}`` (span and busy in the spans' unit).
    """
    import statistics

    by_exec: dict = {}
    for n, _stage, t0, t1 in spans:
        by_exec.setdefault(n, []).append((t0, t1))
    p = int(num_stages)
    fractions, span_l, busy_l = [], [], []
    for n in sorted(by_exec):
        es = by_exec[n]
        span = max(t1 for _, t1 in es) - min(t0 for t0, _ in es)
        if span <= 0:
            continue
        busy = sum(t1 - t0 for t0, t1 in es)
        fractions.append(1.0 - busy / (p * span))
        span_l.append(span)
        busy_l.append(busy / p)
    if not fractions:
        raise ValueError("no forward/backward spans to measure a bubble from")
    return {
        "bubble": statistics.median(fractions),
        "per_execution": fractions,
        "stages": p,
        "span": statistics.median(span_l),
        "busy": statistics.median(busy_l),
    }


def measured_bubble(
    profile, num_stages: int | None = None, methods: tuple[str, ...] = ("forward", "backward")
) -> dict:
    """The bubble fraction of the executions profiled by ``cg.profile(n)``.

    The ``methods`` calls of each actor track of the profile's Chrome trace are the
    stages' work (``step`` and everything outside the first-to-last call of an execution
    do not count, as in the (P-1)/(M+P-1) model); see :func:`bubble_fraction`. Times are
    in microseconds (``span``, ``busy``). ``num_stages`` defaults to the number of actors
    that ran ``methods``.
    """
    events = profile.trace()["traceEvents"]
    spans = [
        (e["args"]["execution"], e["tid"], e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("ph") == "X" and e.get("cat") == "call" and e.get("name") in methods
    ]
    if not spans:
        raise ValueError("the profile has no forward/backward calls")
    return bubble_fraction(spans, num_stages or len({s[1] for s in spans}))
