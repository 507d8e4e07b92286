"""A serving graph: preprocess fan-out -> model -> postprocess, many clients at once.

    python examples/serving.py                           # check answers, then load test
    python examples/serving.py --clients 8 --seconds 5
    dagc compile examples/serving.py --run 1000

A request is ``{"id": ..., "text": ...}``. Two preprocessors read it side by side: one
turns the words into hashed token ids, the other computes a few surface features of the
text. The model actor (a small torch MLP over a bag of embeddings plus the features) gives
class logits; the postprocessor turns them into ``{"id", "label", "score", "top3"}``, the
id copied from the request, so a client can tell its answer from everyone else's.

Several client threads call ``cg.execute(request)`` and ``.get()`` at the same time, as
the threads of a web server would: dagc's ``execute()`` is safe to call from many threads,
and every client gets the answer to its own request. The model actor takes a GPU when the
cluster has one; the preprocessors stay on CPU. ``main()`` checks every answer against the
same pipeline run in this process, then reports latency under load.
"""

import argparse
import statistics
import threading
import time
import zlib

import numpy as np
import ray
import torch

import dagc
from dagc import InputNode

VOCAB, DIM, NFEAT, SEED = 4096, 64, 4, 0
LABELS = ("billing", "bug", "feature", "question", "praise", "spam")
WORDS = (
    "the app crashes when i pay my bill twice please add dark mode how do i export "
    "great work thanks refund free money click here login fails slow sync"
).split()


# -- the stages, as plain functions (the actors and the reference share them) ------------------
# Only the model needs torch; pre- and postprocessing pass numpy arrays, so their actors
# never import torch.
def tokenize(text: str) -> np.ndarray:
    return np.array(
        [zlib.crc32(w.encode()) % VOCAB for w in text.lower().split()] or [0], dtype=np.int64
    )


def surface_features(text: str) -> np.ndarray:
    words = text.split()
    return np.array(
        [
            len(words) / 20,
            sum(map(len, words)) / max(1, len(words)) / 10,
            text.count("!") + text.count("?"),
            float(any(c.isdigit() for c in text)),
        ],
        dtype=np.float32,
    )


def make_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.ModuleDict(
        {
            "embed": torch.nn.EmbeddingBag(VOCAB, DIM, mode="mean"),
            "mlp": torch.nn.Sequential(
                torch.nn.Linear(DIM + NFEAT, 128),
                torch.nn.GELU(),
                torch.nn.Linear(128, len(LABELS)),
            ),
        }
    ).eval()


@torch.no_grad()
def classify(model, ids: np.ndarray, feats: np.ndarray) -> np.ndarray:
    device = next(model.parameters()).device
    emb = model["embed"](torch.as_tensor(ids, device=device).unsqueeze(0))
    x = torch.cat([emb, torch.as_tensor(feats, device=device).unsqueeze(0)], dim=-1)
    return model["mlp"](x)[0].cpu().numpy()


def answer(request: dict, logits: np.ndarray) -> dict:
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:3]
    return {
        "id": request["id"],
        "label": LABELS[top[0]],
        "score": round(float(p[top[0]]), 6),
        "top3": [LABELS[i] for i in top],
    }


# -- the actors ----------------------------------------------------------------------------
@ray.remote
class Tokenizer:
    def tokenize(self, request: dict) -> np.ndarray:
        return tokenize(request["text"])


@ray.remote
class Featurizer:
    def features(self, request: dict) -> np.ndarray:
        return surface_features(request["text"])


@ray.remote
class Classifier:
    def __init__(self):
        device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self.model = make_model().to(device)

    def predict(self, ids: np.ndarray, feats: np.ndarray) -> np.ndarray:
        return classify(self.model, ids, feats)


@ray.remote
class Postprocessor:
    def postprocess(self, request: dict, logits: np.ndarray) -> dict:
        return answer(request, logits)


def make_actors() -> list:
    gpu = {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {}
    actors = [
        Tokenizer.remote(),
        Featurizer.remote(),
        Classifier.options(**gpu).remote(),
        Postprocessor.remote(),
    ]
    ray.get([a.__ray_ready__.remote() for a in actors])
    return actors


def build_dag(actors: list):
    tok, feat, model, post = actors
    with InputNode() as request:
        ids = tok.tokenize.bind(request)  # the fan-out: both read the request
        feats = feat.features.bind(request)
        logits = model.predict.bind(ids, feats)
        return post.postprocess.bind(request, logits)


def build():
    return build_dag(make_actors())


def request(i: int) -> dict:
    """Request i: a few words picked by i (deterministic), tagged with its id."""
    g = torch.Generator().manual_seed(i)
    n = 3 + int(torch.randint(0, 10, (1,), generator=g))
    words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)]
    return {"id": i, "text": " ".join(words) + ("?" if i % 3 == 0 else "")}


def example_input():
    return (request(0),)


_REFERENCE_MODEL = None
_REFERENCE_LOCK = threading.Lock()


def reference(req: dict) -> dict:
    """The same pipeline in this process (callable from many threads)."""
    global _REFERENCE_MODEL
    with _REFERENCE_LOCK:  # make_model() seeds torch's global generator: once only
        if _REFERENCE_MODEL is None:
            _REFERENCE_MODEL = make_model()
    text = req["text"]
    return answer(req, classify(_REFERENCE_MODEL, tokenize(text), surface_features(text)))


def same_answer(got: dict, want: dict) -> bool:
    return (
        got["id"] == want["id"]
        and got["label"] == want["label"]
        and got["top3"] == want["top3"]
        and abs(got["score"] - want["score"]) < 1e-4
    )


def load(execute, clients: int, seconds: float = 0.0, per_client: int = 0, check=None) -> dict:
    """``clients`` threads, each sending requests one after another (``execute(req)``
    returns the answer) for ``seconds`` or ``per_client`` requests; latency percentiles,
    requests/s, and the number of answers ``check(request, answer)`` rejected."""
    lat: list[float] = []
    bad: list = []
    errors: list = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(c: int):
        mine, wrong = [], []
        try:
            k = 0
            while (k < per_client) if per_client else (time.perf_counter() < deadline):
                req = request(c * 1_000_000 + k)
                t0 = time.perf_counter()
                ans = execute(req)
                mine.append(time.perf_counter() - t0)
                if check is not None and not check(req, ans):
                    wrong.append((req, ans))
                k += 1
        except BaseException as e:  # reported below, never lost in a thread
            errors.append(e)
        with lock:
            lat.extend(mine)
            bad.extend(wrong)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3
    return {
        "requests": len(lat),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "mean_ms": statistics.fmean(lat) * 1e3,
        "requests_per_s": len(lat) / wall,
        "wrong": len(bad),
        "clients": clients,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with dagc.compile(build_dag(make_actors())) as cg:
            run = lambda req: cg.execute(req).get(timeout=60)
            m = load(
                run,
                a.clients,
                per_client=25,
                check=lambda req, ans: same_answer(ans, reference(req)),
            )
            assert m["wrong"] == 0, f"{m['wrong']} answers differ from the reference"
            print(
                f"{m['requests']} requests from {a.clients} threads: every answer is its "
                f"own request's and matches the single-process pipeline"
            )
            m = load(run, a.clients, seconds=a.seconds)
            print(
                f"{a.clients} clients for {a.seconds:g} s: p50 {m['p50_ms']:.2f} ms, "
                f"p99 {m['p99_ms']:.2f} ms, {m['requests_per_s']:.0f} requests/s"
            )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
