"""Pipeline-parallel training with a generated 1F1B (or GPipe) schedule.

    python examples/pipeline_training.py                 # train, check against one process
    python examples/pipeline_training.py --schedule gpipe --stages 4 --microbatches 8
    dagc compile examples/pipeline_training.py --run 20  # the schedule table, then 20 steps

A residual MLP classifier is cut into stages, one actor each. ``dagc.pipeline``
builds one training step (every microbatch's forward and backward, then each stage's
optimizer step) with each stage's calls bound in the schedule's order, so nobody writes the
1F1B order by hand. Activations go forward and gradients back as tensors over the
communicator (``with_tensor_transport("nccl")``: NCCL between GPU actors, gloo on CPU).
The stage actors take a GPU each when the cluster has enough, else run on CPU: the file is
the same for both.

``main()`` trains a few steps and checks every loss and every stage's gradient norm
against the same model trained in this process; then it measures the pipeline bubble with
``cg.profile`` and compares it to (P-1)/(M+P-1).
"""

import argparse
import time
from collections import deque

import ray
import torch
import torch.nn.functional as F

import dagc
from dagc.pipelining import measured_bubble, microbatch_args, theoretical_bubble

IN, DIM, CLASSES = 64, 128, 10  # input features, hidden width, classes
BLOCKS = 4  # residual MLP blocks, spread over the stages
BATCH = 32  # per training step, split into MICROBATCHES
STAGES, MICROBATCHES, SCHEDULE = 2, 4, "1f1b"
LR, SEED = 0.05, 0


# -- the model, the same layers (same seeds) in the stages and in the reference ----------------
class Block(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, 2 * dim)
        self.fc2 = torch.nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def make_layer(i: int) -> torch.nn.Module:
    """Layer i of the whole model: input projection, BLOCKS blocks, classifier head."""
    torch.manual_seed(SEED + i)
    if i == 0:
        return torch.nn.Linear(IN, DIM)
    if i == BLOCKS + 1:
        return torch.nn.Linear(DIM, CLASSES)
    return Block(DIM)


def stage_layers(stage: int, num_stages: int) -> list[int]:
    """The layer indices stage ``stage`` holds (contiguous, as even as possible)."""
    n = BLOCKS + 2
    return list(range(stage * n // num_stages, (stage + 1) * n // num_stages))


def actor_device() -> torch.device:
    """Inside an actor: its GPU if Ray gave it one, else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


@ray.remote
class Stage:
    """One pipeline stage: what ``dagc.pipeline`` needs (forward, backward, step).

    ``emulate_ms`` > 0 adds that much sleep to every forward (twice that to every backward):
    a stand-in for accelerator time, which does not occupy the CPU, so that the schedule's
    bubble can be seen on a small CPU machine where the real layers take ~1 ms.
    """

    def __init__(self, stage: int, num_stages: int, microbatches: int, emulate_ms: float = 0):
        self.stage, self.num_stages, self.microbatches = stage, num_stages, microbatches
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.device = actor_device()
        self.emulate_s = emulate_ms / 1e3
        self.executions = 0
        # bookkeeping, read by timings() and call_order() (the last 10,000 calls)
        self.spans = deque(maxlen=10_000)  # (execution, stage, start_ns, end_ns)
        self.calls = deque(maxlen=10_000)  # "F0", "F1", "B0", ...: the order they ran in
        self.reset()

    def reset(self) -> None:
        """(Re)build the stage's layers and optimizer from their seeds: a fresh model."""
        layers = [make_layer(i) for i in stage_layers(self.stage, self.num_stages)]
        self.model = torch.nn.Sequential(*layers).to(self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.saved = {}  # microbatch -> (input, output) kept for backward

    def forward(self, mb: int, x: torch.Tensor, target: torch.Tensor = None):
        t0 = time.monotonic_ns()
        self.calls.append(f"F{mb}")
        try:
            return self._forward(mb, x, target)
        finally:
            self.spans.append((self.executions, self.stage, t0, time.monotonic_ns()))

    def backward(self, mb: int, grad):
        t0 = time.monotonic_ns()
        self.calls.append(f"B{mb}")
        try:
            return self._backward(mb, grad)
        finally:
            self.spans.append((self.executions, self.stage, t0, time.monotonic_ns()))

    def _forward(self, mb, x, target):
        if self.emulate_s:
            time.sleep(self.emulate_s)
        x = x.to(self.device)
        if not self.first:  # we need d loss / d x for the stage before
            x = x.detach().requires_grad_()
        out = self.model(x)
        if self.last:
            loss = F.cross_entropy(out, target.to(self.device))
            self.saved[mb] = (x, loss / self.microbatches)  # mean over the microbatches
            return loss.item()
        self.saved[mb] = (x, out)
        return out.detach()

    def _backward(self, mb, grad):
        if self.emulate_s:
            time.sleep(2 * self.emulate_s)
        x, out = self.saved.pop(mb)
        if self.last:
            out.backward()  # out is this microbatch's (scaled) loss
        else:
            out.backward(grad.to(self.device))
        return None if self.first else x.grad

    def step(self, *_done) -> float:
        """Apply the accumulated gradients; returns their norm (before the step)."""
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.model.parameters())))
        self.opt.step()
        self.opt.zero_grad()
        self.executions += 1
        return norm

    def timings(self) -> list:
        """The forward/backward spans recorded since the last call (then forgotten)."""
        out = list(self.spans)
        self.spans.clear()
        return out

    def call_order(self) -> list:
        """The forward/backward calls run since the last call, in order (then forgotten)."""
        out = list(self.calls)
        self.calls.clear()
        return out

    def ping(self) -> bool:
        return True


def actor_options(n: int) -> dict:
    """A GPU per actor when the cluster has n of them, else Ray's defaults (CPU actors).

    (Not ``num_gpus=0``: naming any resource makes Ray reserve a CPU per actor, and a few
    stages would no longer fit on a small machine.)
    """
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= n else {}


def make_stages(
    num_stages: int = STAGES, microbatches: int = MICROBATCHES, emulate_ms: float = 0
) -> list:
    cls = Stage.options(**actor_options(num_stages))
    stages = [cls.remote(s, num_stages, microbatches, emulate_ms) for s in range(num_stages)]
    ray.get([s.ping.remote() for s in stages])
    return stages


def build(
    stages=None, microbatches: int = MICROBATCHES, schedule: str = SCHEDULE, transport="nccl"
):
    stages = stages or make_stages(STAGES, microbatches)
    return dagc.pipeline(stages, microbatches=microbatches, schedule=schedule, transport=transport)


def batch(i: int, batch_size: int = BATCH):
    """Training batch i: a fixed synthetic classification task (inputs, labels)."""
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(batch_size, IN, generator=g)
    w = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(7))
    return x, (x @ w).argmax(-1)


def example_input(microbatches: int = MICROBATCHES):
    return microbatch_args(*batch(0), microbatches)


# -- the single-process reference --------------------------------------------------------------
def reference(
    steps: int, num_stages: int = STAGES, microbatches: int = MICROBATCHES, first_batch: int = 0
):
    """Train the whole model in this process: per step the M losses and each stage's grad norm."""
    groups = [[make_layer(i) for i in stage_layers(s, num_stages)] for s in range(num_stages)]
    model = torch.nn.Sequential(*[m for g in groups for m in g])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for k in range(steps):
        x, y = batch(first_batch + k)
        losses = []
        for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
            loss = F.cross_entropy(model(xm), ym)
            (loss / microbatches).backward()
            losses.append(loss.item())
        norms = [
            float(torch.sqrt(sum((p.grad.double() ** 2).sum() for m in g for p in m.parameters())))
            for g in groups
        ]
        opt.step()
        opt.zero_grad()
        out.append((losses, norms))
    return out


def check(got, want, what="", rtol=1e-4) -> float:
    """The largest relative difference; raises if above ``rtol``."""
    worst = max(abs(a - b) / max(1e-12, abs(b)) for a, b in zip(got, want))
    if worst > rtol:
        raise AssertionError(f"{what}: {got} != {want} (rel. difference {worst:.2e})")
    return worst


def train(cg, steps: int, microbatches: int, num_stages: int) -> list:
    out = []
    for k in range(steps):
        res = cg.execute(*microbatch_args(*batch(k), microbatches)).get(timeout=120)
        out.append((res[:microbatches], res[microbatches:]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=STAGES)
    ap.add_argument("--microbatches", type=int, default=MICROBATCHES)
    ap.add_argument("--schedule", choices=("1f1b", "gpipe"), default=SCHEDULE)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", type=int, default=20, help="executions to profile (0: none)")
    ap.add_argument(
        "--emulate-ms",
        type=float,
        default=0,
        help="sleep this long in every forward (2x in backward) as stand-in "
        "accelerator time, to see the schedule's bubble on a CPU box",
    )
    a = ap.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        stages = make_stages(a.stages, a.microbatches, a.emulate_ms)
        dag = build(stages, a.microbatches, a.schedule)
        with dagc.compile(dag) as cg:
            print(cg.schedule.table())
            got = train(cg, a.steps, a.microbatches, a.stages)
            want = reference(a.steps, a.stages, a.microbatches)
            worst = 0.0
            for k, ((gl, gn), (wl, wn)) in enumerate(zip(got, want)):
                worst = max(
                    worst, check(gl, wl, f"step {k} losses"), check(gn, wn, f"step {k} grad norms")
                )
                print(
                    f"step {k}: losses {[round(v, 5) for v in gl]}, "
                    f"grad norms {[round(v, 5) for v in gn]}"
                )
            print(
                f"losses and gradient norms match the single-process run "
                f"(largest relative difference {worst:.1e})"
            )
            if a.profile:
                args = microbatch_args(*batch(0), a.microbatches)
                t0 = time.perf_counter()
                prof = cg.profile(a.profile, *args)
                dt = time.perf_counter() - t0
                b = measured_bubble(prof, a.stages)
                print(
                    f"bubble: measured {b['bubble']:.3f} (median of {len(b['per_execution'])}"
                    f" executions; span {b['span'] / 1e3:.1f} ms, busy per stage "
                    f"{b['busy'] / 1e3:.1f} ms), theory (P-1)/(M+P-1) = "
                    f"{theoretical_bubble(a.stages, a.microbatches):.3f}; "
                    f"{a.profile / dt:.1f} steps/s while profiling"
                )
                if not a.emulate_ms:
                    print(
                        "(the layers here take about a millisecond, so communication and "
                        "per-call overhead count as bubble; --emulate-ms 20 gives the "
                        "stages accelerator-like work and shows the schedule's own bubble)"
                    )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
