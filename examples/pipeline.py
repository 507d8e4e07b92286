"""A small text-scoring pipeline: tokenize -> embed -> two scoring heads.

    dagc compile examples/pipeline.py --run 1000

Four actors. The tokenizer hashes words into ids, the embedder averages a learned table's
rows, and two heads score the embedding (a sentiment-like and a topic-like score); the
DAG returns both scores, so the embedding fans out to two actors.
"""

import zlib

import numpy as np
import ray

from dagc import InputNode, MultiOutputNode

VOCAB, DIM = 8192, 128


@ray.remote
class Tokenizer:
    def tokenize(self, text: str) -> np.ndarray:
        words = text.lower().split()
        return np.fromiter(
            (zlib.crc32(w.encode()) % VOCAB for w in words), dtype=np.int64, count=len(words)
        )


@ray.remote
class Embedder:
    def __init__(self, seed: int = 0):
        self.table = np.random.default_rng(seed).standard_normal((VOCAB, DIM)).astype(np.float32)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros(DIM, dtype=np.float32)
        return self.table[ids].mean(axis=0)


@ray.remote
class Head:
    def __init__(self, seed: int):
        self.w = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32) / DIM**0.5

    def score(self, vec: np.ndarray) -> float:
        return float(1.0 / (1.0 + np.exp(-vec @ self.w)))


def build():
    tok, emb = Tokenizer.remote(), Embedder.remote()
    sentiment, topic = Head.remote(1), Head.remote(2)
    with InputNode() as text:
        vec = emb.embed.bind(tok.tokenize.bind(text))
        dag = MultiOutputNode([sentiment.score.bind(vec), topic.score.bind(vec)])
    return dag


def example_input():
    return ("the quick brown fox jumps over the lazy dog",)
