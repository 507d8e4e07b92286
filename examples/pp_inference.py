"""Pipeline-parallel inference: a small GPT split into stage actors, batches in flight.

    python examples/pp_inference.py                      # check against one process, then time
    python examples/pp_inference.py --stages 4 --inflight 8
    dagc compile examples/pp_inference.py --run 200

A stack of hand-written GPT blocks (causal self-attention + MLP, pre-norm) is cut into
stages, one actor each; stage 0 also holds the token and position embeddings, the last
stage the final norm and the LM head. One execution is one batch of token ids; it returns
the next-token logits of every sequence. Hidden states go from stage to stage as tensors
over the communicator (``with_tensor_transport("nccl")``: NCCL between GPU actors, gloo
between CPU actors). Several executions in flight keep every stage busy: while the last
stage works on batch k, the first already works on batch k+1.

The stage actors take a GPU each when the cluster has enough of them, else run on CPU; the
same file runs on both. ``main()`` checks the logits against the whole model run in this
process, then prints latency and batches/s at 1, 4 and 8 batches in flight.
"""

import argparse
import math
import time
from collections import deque

import ray
import torch
import torch.nn.functional as F

import dagc
from dagc import InputNode

VOCAB, DIM, HEADS, LAYERS, SEQ, BATCH = 512, 128, 4, 8, 32, 8
STAGES, SEED = 2, 0


# -- the model ---------------------------------------------------------------------------------
class Block(torch.nn.Module):
    """A GPT block: x + attn(ln1(x)), then x + mlp(ln2(x)); causal multi-head attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(VOCAB, DIM), torch.nn.Embedding(SEQ, DIM)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))


class Head(torch.nn.Module):
    """Final norm and LM head, on the last position only: the next-token logits."""

    def __init__(self):
        super().__init__()
        self.ln, self.out = torch.nn.LayerNorm(DIM), torch.nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x[:, -1]))


def make_layer(i: int) -> torch.nn.Module:
    """Layer i of the whole model (0: embeddings, 1..LAYERS: blocks, LAYERS+1: head)."""
    torch.manual_seed(SEED + i)
    if i == 0:
        return Embed()
    if i == LAYERS + 1:
        return Head()
    return Block(DIM, HEADS)


def stage_layers(stage: int, num_stages: int) -> list[int]:
    """Stage s holds blocks [s*L/P, (s+1)*L/P) (+ the embeddings on 0, the head on the last)."""
    lo, hi = stage * LAYERS // num_stages, (stage + 1) * LAYERS // num_stages
    return (
        ([0] if stage == 0 else [])
        + list(range(lo + 1, hi + 1))
        + ([LAYERS + 1] if stage == num_stages - 1 else [])
    )


def actor_device() -> torch.device:
    """Inside an actor: its GPU if Ray gave it one, else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


@ray.remote
class GPTStage:
    def __init__(self, stage: int, num_stages: int):
        self.device = actor_device()
        self.last = stage == num_stages - 1
        layers = [make_layer(i) for i in stage_layers(stage, num_stages)]
        self.model = torch.nn.Sequential(*layers).to(self.device).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x.to(self.device))
        return y.cpu() if self.last else y  # logits go back to the driver

    def ping(self) -> bool:
        return True


def actor_options(n: int) -> dict:
    """A GPU per actor when the cluster has n of them, else Ray's defaults (CPU actors).

    (Not ``num_gpus=0``: naming any resource makes Ray reserve a CPU per actor.)
    """
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= n else {}


def make_stages(num_stages: int = STAGES) -> list:
    cls = GPTStage.options(**actor_options(num_stages))
    stages = [cls.remote(s, num_stages) for s in range(num_stages)]
    ray.get([s.ping.remote() for s in stages])
    return stages


def build_dag(stages: list, transport="nccl"):
    """token ids -> stage 0 -> ... -> last stage -> logits; tensor edges between stages."""
    with InputNode() as ids:
        x = ids
        for s in stages[:-1]:
            x = s.forward.bind(x).with_tensor_transport(transport)
        return stages[-1].forward.bind(x)


def build():
    return build_dag(make_stages())


def batch(i: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(i))


def example_input():
    return (batch(0),)


def reference(ids: torch.Tensor, num_stages: int = STAGES) -> torch.Tensor:
    """The whole model in this process (same layers, same seeds)."""
    layers = [make_layer(i) for s in range(num_stages) for i in stage_layers(s, num_stages)]
    with torch.no_grad():
        return torch.nn.Sequential(*layers).eval()(ids)


def measure(cg, inflight: int, n: int, get=lambda ref: ref.get(timeout=120)) -> dict:
    """Keep ``inflight`` batches in flight for ``n`` batches: per-batch latency, batches/s."""
    xs = [batch(i) for i in range(8)]
    lat, q = [], deque()
    t_start = time.perf_counter()
    for i in range(n):
        if len(q) == inflight:
            t0, ref = q.popleft()
            get(ref)
            lat.append(time.perf_counter() - t0)
        q.append((time.perf_counter(), cg.execute(xs[i % len(xs)])))
    while q:
        t0, ref = q.popleft()
        get(ref)
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    lat.sort()
    return {
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
        "batches_per_s": n / wall,
        "inflight": inflight,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=STAGES)
    ap.add_argument("--n", type=int, default=100, help="batches per measurement")
    ap.add_argument(
        "--inflight",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4, 8],
        help="comma-separated, e.g. 1,4,8",
    )
    a = ap.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        stages = make_stages(a.stages)
        with dagc.compile(build_dag(stages), max_inflight=max(8, *a.inflight)) as cg:
            for i in range(3):
                got, want = cg.execute(batch(i)).get(timeout=120), reference(batch(i), a.stages)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            print(f"logits match the single-process model ({a.stages} stages, {LAYERS} blocks)")
            for k in a.inflight:
                m = measure(cg, k, a.n)
                print(
                    f"{k} in flight: p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, "
                    f"{m['batches_per_s']:.1f} batches/s"
                )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
