"""Pipeline-parallel inference of a small transformer, split into stages on separate actors.

    dagc compile examples/pipeline_parallel.py --run 50

Each stage actor holds a slice of the layers. The input is a batch of token ids; the driver
splits it into microbatches (inp[0], inp[1], ...) and every microbatch flows through the
stages, so while stage 1 works on microbatch 0, stage 0 already works on microbatch 1.
Activations travel between stages as tensors over the communicator
(`with_tensor_transport("nccl")`): NCCL when the stages hold GPUs, gloo on CPU — the same
file runs unchanged on both.
"""

import ray
import torch

from dagc import InputNode, MultiOutputNode

VOCAB, DIM, HEADS, LAYERS, STAGES, MICROBATCHES = 1000, 128, 4, 6, 3, 4
SEQ, BATCH = 32, 16
USE_GPU = torch.cuda.is_available()


class TransformerStage:
    def __init__(self, stage: int, stages: int, seed: int = 0):
        torch.manual_seed(seed + stage)
        self.device = "cuda" if USE_GPU else "cpu"
        self.first, self.last = stage == 0, stage == stages - 1
        per = LAYERS // stages
        layers = [
            torch.nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, dropout=0.0, batch_first=True)
            for _ in range(per)
        ]
        self.body = torch.nn.Sequential(*layers).to(self.device).eval()
        self.embed = torch.nn.Embedding(VOCAB, DIM).to(self.device) if self.first else None
        self.head = torch.nn.Linear(DIM, VOCAB).to(self.device) if self.last else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.first:
            x = self.embed(x)
        x = self.body(x)
        if self.last:
            return self.head(x[:, -1]).argmax(-1).cpu()  # next-token ids, back on the CPU
        return x


# A GPU each when there are GPUs; on CPU no explicit resources, so the stages fit any node.
TransformerStage = (
    ray.remote(num_gpus=1)(TransformerStage) if USE_GPU else ray.remote(TransformerStage)
)


def build():
    stages = [TransformerStage.remote(i, STAGES) for i in range(STAGES)]
    with InputNode() as inp:
        outs = []
        for m in range(MICROBATCHES):
            x = inp[m]
            for s in stages[:-1]:
                x = s.forward.bind(x).with_tensor_transport("nccl")
            outs.append(stages[-1].forward.bind(x))
        dag = MultiOutputNode(outs)
    return dag


def example_input():
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return tuple(ids.chunk(MICROBATCHES))
