"""Heterogeneous training: two different models on two actors, trained together.

    python examples/hetero_training.py                   # train, check against one process
    dagc compile examples/hetero_training.py --run 50

A text tower (embedding bag + MLP) lives on one actor, an image tower (a small CNN) on
another; the text actor also holds the classifier head that combines both towers'
features. One execution is one training iteration on one batch:

    image actor:  features = cnn(images) ------------------------------+  (tensor edge)
    text actor:   loss = CE(head([text_mlp(tokens), features]), labels) <+
                  backward through the head and the text tower
                  d loss / d features --------------------------------+  (tensor edge)
    image actor:  backward through the CNN, Adam step                 <+
    text actor:   Adam step

``execute(tokens, images, labels)`` returns ``[loss, image tower gradient norm]``. The two
feature/gradient edges are tensors over the communicator (``with_tensor_transport("nccl")``:
NCCL between GPU actors, gloo between CPU actors); each actor takes a GPU when the cluster
has two. ``main()`` trains a few iterations and checks every loss against the same two
models trained in this process (everything is seeded).
"""

import argparse
import time

import ray
import torch
import torch.nn.functional as F

import dagc
from dagc import InputNode, MultiOutputNode

VOCAB, WORDS, IMG, FEAT, CLASSES, BATCH = 1000, 12, 16, 64, 5, 16
LR, SEED = 3e-3, 0


def text_tower() -> torch.nn.Module:
    torch.manual_seed(SEED + 1)
    return torch.nn.ModuleDict(
        {
            "embed": torch.nn.EmbeddingBag(VOCAB, 64, mode="mean"),
            "mlp": torch.nn.Sequential(
                torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, FEAT)
            ),
        }
    )


def image_tower() -> torch.nn.Module:
    torch.manual_seed(SEED + 2)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * (IMG // 4) ** 2, FEAT),
    )


def head() -> torch.nn.Module:
    torch.manual_seed(SEED + 3)
    return torch.nn.Linear(2 * FEAT, CLASSES)


def text_features(tower, tokens):
    return tower["mlp"](tower["embed"](tokens))


def actor_device() -> torch.device:
    """Inside an actor: its GPU if Ray gave it one, else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


def grad_norm(params) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))


@ray.remote
class TextTrainer:
    """The text tower and the classifier head; the combine step and the loss live here."""

    def __init__(self):
        self.device = actor_device()
        self.reset()

    def reset(self) -> None:
        self.tower, self.head = text_tower().to(self.device), head().to(self.device)
        self.opt = torch.optim.Adam([*self.tower.parameters(), *self.head.parameters()], lr=LR)
        self.image_grad = None

    def combine(self, tokens, image_features, labels) -> float:
        """Forward through the text tower and the head, loss, backward (keeps the gradient
        of the loss with respect to the image features for the image actor)."""
        img = image_features.to(self.device).detach().requires_grad_()
        txt = text_features(self.tower, tokens.to(self.device))
        loss = F.cross_entropy(self.head(torch.cat([txt, img], dim=-1)), labels.to(self.device))
        loss.backward()
        self.image_grad = img.grad
        return loss.item()

    def features_grad(self, _loss) -> torch.Tensor:
        g, self.image_grad = self.image_grad, None
        return g

    def step(self, loss: float) -> float:
        self.opt.step()
        self.opt.zero_grad()
        return loss

    def ping(self) -> bool:
        return True


@ray.remote
class ImageTrainer:
    """The image tower: forward, then backward from the gradient the text actor sends."""

    def __init__(self):
        self.device = actor_device()
        self.reset()

    def reset(self) -> None:
        self.tower = image_tower().to(self.device)
        self.opt = torch.optim.Adam(self.tower.parameters(), lr=LR)
        self.features = None

    def forward(self, images) -> torch.Tensor:
        self.features = self.tower(images.to(self.device))
        return self.features.detach()

    def backward_step(self, grad) -> float:
        self.features.backward(grad.to(self.device))
        self.features = None
        norm = grad_norm(self.tower.parameters())
        self.opt.step()
        self.opt.zero_grad()
        return norm

    def ping(self) -> bool:
        return True


def actor_options(n: int) -> dict:
    """A GPU per actor when the cluster has n of them, else Ray's defaults (CPU actors).

    (Not ``num_gpus=0``: naming any resource makes Ray reserve a CPU per actor.)
    """
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= n else {}


def make_actors() -> list:
    opts = actor_options(2)
    actors = [TextTrainer.options(**opts).remote(), ImageTrainer.options(**opts).remote()]
    ray.get([a.ping.remote() for a in actors])
    return actors


def build_dag(actors: list, transport="nccl"):
    text, image = actors
    with InputNode() as inp:
        features = image.forward.bind(inp[1]).with_tensor_transport(transport)
        loss = text.combine.bind(inp[0], features, inp[2])
        grad = text.features_grad.bind(loss).with_tensor_transport(transport)
        return MultiOutputNode([text.step.bind(loss), image.backward_step.bind(grad)])


def build():
    return build_dag(make_actors())


def batch(i: int):
    """Batch i of a synthetic task: (tokens, images, labels); the label depends on both."""
    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(0, VOCAB, (BATCH, WORDS), generator=g)
    images = torch.randn(BATCH, 3, IMG, IMG, generator=g)
    labels = ((tokens[:, 0] % CLASSES) + (images[:, 0].mean((1, 2)) > 0).long()) % CLASSES
    return tokens, images, labels


def example_input():
    return batch(0)


def reference(steps: int, first_batch: int = 0) -> list:
    """Both models trained in this process: [(loss, image tower grad norm)] per iteration."""
    tt, it, hd = text_tower(), image_tower(), head()
    opt_t = torch.optim.Adam([*tt.parameters(), *hd.parameters()], lr=LR)
    opt_i = torch.optim.Adam(it.parameters(), lr=LR)
    out = []
    for k in range(steps):
        tokens, images, labels = batch(first_batch + k)
        logits = hd(torch.cat([text_features(tt, tokens), it(images)], dim=-1))
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        out.append((loss.item(), grad_norm(it.parameters())))
        opt_t.step(), opt_i.step()
        opt_t.zero_grad(), opt_i.zero_grad()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        actors = make_actors()
        with dagc.compile(build_dag(actors)) as cg:
            t0 = time.perf_counter()
            got = [tuple(cg.execute(*batch(k)).get(timeout=120)) for k in range(a.steps)]
            dt = time.perf_counter() - t0
        want = reference(a.steps)
        worst = max(abs(g - w) / abs(w) for gw, ww in zip(got, want) for g, w in zip(gw, ww))
        assert worst < 1e-4, f"losses differ from the single-process run: {got} vs {want}"
        print(
            f"{a.steps} iterations, loss {got[0][0]:.4f} -> {got[-1][0]:.4f}; losses and "
            f"gradient norms match the single-process run (largest relative difference "
            f"{worst:.1e}); {a.steps / dt:.1f} iterations/s"
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
