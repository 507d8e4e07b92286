"""Tensor-parallel transformer blocks: every actor holds a shard of every layer's weights.

    python examples/tensor_parallel.py                   # check against one process, then time
    python examples/tensor_parallel.py --shards 4
    dagc compile examples/tensor_parallel.py --run 200

Megatron-style sharding over N actors. Attention: actor r holds the query/key/value
weights of heads r*H/N .. (r+1)*H/N - 1 and the matching input columns of the output
projection; MLP: rows r of the first linear layer, the matching columns of the second.
Each actor computes its partial sum of the sublayer's output, an all-reduce
(``ray.experimental.collective.allreduce.bind``) adds the partials on every actor, and each
adds the bias and the residual itself, so all actors carry the same hidden state into the
next sublayer. Two all-reduces per block.

The all-reduces run on the communicator: NCCL on GPU actors, gloo on CPU ones; the actors
take a GPU each when the cluster has enough, so the same file runs on both. ``main()``
checks the output against the unsharded model run in this process, then prints steps/s.
"""

import argparse
import math
import time

import ray
import torch
import torch.nn.functional as F
from ray.experimental.collective import allreduce

import dagc
from dagc import InputNode, MultiOutputNode

DIM, HEADS, HIDDEN, LAYERS = 128, 8, 512, 2  # width, heads, MLP width, blocks
BATCH, SEQ = 4, 32
SHARDS, SEED = 2, 0


def block_weights(layer: int) -> dict:
    """The full (unsharded) weights of block ``layer``, from its seed."""
    g = torch.Generator().manual_seed(SEED + layer)

    def lin(n_out, n_in):
        return torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in), torch.randn(
            n_out, generator=g
        ) * 0.02

    w = {}
    w["qkv"], w["qkv_b"] = lin(3 * DIM, DIM)
    w["proj"], w["proj_b"] = lin(DIM, DIM)
    w["fc1"], w["fc1_b"] = lin(HIDDEN, DIM)
    w["fc2"], w["fc2_b"] = lin(DIM, HIDDEN)
    return w


def shard(w: dict, rank: int, shards: int) -> dict:
    """Rank ``rank``'s part of one block: its heads' q/k/v rows and output-projection
    columns, its rows of fc1 and columns of fc2; biases that follow an all-reduce whole."""
    hd, per = DIM // HEADS, HEADS // shards
    cols = torch.arange(rank * per * hd, (rank + 1) * per * hd)  # this rank's head dims
    qkv_rows = torch.cat([cols + i * DIM for i in range(3)])
    hid = torch.arange(rank * HIDDEN // shards, (rank + 1) * HIDDEN // shards)
    return {
        "qkv": w["qkv"][qkv_rows],
        "qkv_b": w["qkv_b"][qkv_rows],
        "proj": w["proj"][:, cols],
        "proj_b": w["proj_b"],
        "fc1": w["fc1"][hid],
        "fc1_b": w["fc1_b"][hid],
        "fc2": w["fc2"][:, hid],
        "fc2_b": w["fc2_b"],
        "heads": per,
    }


def attention(x: torch.Tensor, w: dict) -> torch.Tensor:
    """Causal attention over the heads in ``w``; output projection without its bias."""
    b, t, _ = x.shape
    h = w["heads"]
    q, k, v = F.linear(x, w["qkv"], w["qkv_b"]).chunk(3, dim=-1)
    q, k, v = (z.view(b, t, h, -1).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    out = (att.masked_fill(mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)
    return F.linear(out.reshape(b, t, -1), w["proj"])


def mlp(x: torch.Tensor, w: dict) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w["fc1"], w["fc1_b"])), w["fc2"])


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def actor_device() -> torch.device:
    """Inside an actor: its GPU if Ray gave it one, else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


@ray.remote
class TPShard:
    """Rank ``rank`` of ``shards``: its shard of every block's weights."""

    def __init__(self, rank: int, shards: int):
        self.device = actor_device()
        self.w = [
            {
                k: (v.to(self.device) if torch.is_tensor(v) else v)
                for k, v in shard(block_weights(layer), rank, shards).items()
            }
            for layer in range(LAYERS)
        ]

    @torch.no_grad()
    def attn_partial(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return attention(norm(x.to(self.device)), self.w[layer])

    @torch.no_grad()
    def mlp_partial(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return mlp(norm(x), self.w[layer])

    @torch.no_grad()
    def attn_residual(self, layer: int, x: torch.Tensor, summed: torch.Tensor):
        return x.to(self.device) + summed + self.w[layer]["proj_b"]

    @torch.no_grad()
    def mlp_residual(self, layer: int, x: torch.Tensor, summed: torch.Tensor, last=False):
        y = x + summed + self.w[layer]["fc2_b"]
        return y.cpu() if last else y  # the result goes back to the driver

    def ping(self) -> bool:
        return True


def actor_options(n: int) -> dict:
    """A GPU per actor when the cluster has n of them, else Ray's defaults (CPU actors).

    (Not ``num_gpus=0``: naming any resource makes Ray reserve a CPU per actor.)
    """
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= n else {}


def make_shards(shards: int = SHARDS) -> list:
    if HEADS % shards or HIDDEN % shards:
        raise ValueError(f"{shards} shards do not divide {HEADS} heads / {HIDDEN} hidden units")
    cls = TPShard.options(**actor_options(shards))
    actors = [cls.remote(r, shards) for r in range(shards)]
    ray.get([a.ping.remote() for a in actors])
    return actors


def build_dag(actors: list, transport=None):
    """x -> LAYERS x (attention, all-reduce, residual; MLP, all-reduce, residual) on every
    rank; returns every rank's output (all equal). ``transport``: the all-reduce's
    communicator (None: the default, NCCL on GPUs / dagc's gloo on CPU)."""
    kw = {} if transport is None else {"transport": transport}
    with InputNode() as inp:
        xs = [inp] * len(actors)
        for layer in range(LAYERS):
            sums = allreduce.bind([a.attn_partial.bind(layer, x) for a, x in zip(actors, xs)], **kw)
            xs = [a.attn_residual.bind(layer, x, s) for a, x, s in zip(actors, xs, sums)]
            sums = allreduce.bind([a.mlp_partial.bind(layer, x) for a, x in zip(actors, xs)], **kw)
            xs = [
                a.mlp_residual.bind(layer, x, s, layer == LAYERS - 1)
                for a, x, s in zip(actors, xs, sums)
            ]
        return MultiOutputNode(xs)


def build():
    return build_dag(make_shards())


def batch(i: int) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, DIM, generator=torch.Generator().manual_seed(i))


def example_input():
    return (batch(0),)


def reference(x: torch.Tensor) -> torch.Tensor:
    """The unsharded blocks in this process."""
    with torch.no_grad():
        for layer in range(LAYERS):
            w = shard(block_weights(layer), 0, 1)  # one shard = the whole block
            x = x + attention(norm(x), w) + w["proj_b"]
            x = x + mlp(norm(x), w) + w["fc2_b"]
    return x


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=SHARDS)
    ap.add_argument("--n", type=int, default=200, help="steps to time")
    a = ap.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        actors = make_shards(a.shards)
        with dagc.compile(build_dag(actors)) as cg:
            for i in range(3):
                outs = cg.execute(batch(i)).get(timeout=120)
                for out in outs:
                    torch.testing.assert_close(out, reference(batch(i)), rtol=1e-4, atol=1e-4)
            print(
                f"{a.shards} shards x {LAYERS} blocks: every rank's output matches the "
                f"unsharded model"
            )
            x = batch(0)
            t0 = time.perf_counter()
            for _ in range(a.n):
                cg.execute(x).get(timeout=120)
            print(f"{a.n / (time.perf_counter() - t0):.1f} steps/s (one at a time)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
