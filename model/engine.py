"""Where the heavy steps run: in this process (`--engine local`, the default) or on a Ray
cluster (`--engine ray`, `--workers N`, `--ray-address` to join a running one).

Each heavy step is a plain function over a shard: `encode_batch` (one length-sorted batch of
profile texts), `search_shard` (one slice of users against a replicated FAISS index) and
`metrics_shard` (those users' Recall/NDCG). The local engine calls them in turn; the Ray
engine maps them over workers (Ray Data with an actor pool for encoding, Ray tasks for the
rest) and puts the results back in order, so both give the same rows."""
from __future__ import annotations

import logging
import os
import resource
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from model.retrieval import FaissRetriever
from utils import log

ENGINES = ("local", "ray")


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LocalEngine:
    """Every shard in this process, one after the other."""

    name, workers = "local", 1

    def map(self, function: Callable, shards: Sequence[tuple], shared: tuple = ()) -> list:
        return [function(*shared, *shard) for shard in shards]

    def encode(self, encoder, texts: list[str], desc: str = "encode") -> np.ndarray:
        return encoder.encode(texts, desc=desc)

    def worker_memory(self) -> list[dict]:
        return [{"worker": os.getpid(), "peak_rss_mb": round(peak_rss_mb(), 1)}]

    def close(self) -> None:
        pass


class RayEngine:
    """Shards as Ray tasks (one CPU each); encoding as Ray Data `map_batches` over an actor
    pool whose actors receive the encoder once. Starts a local Ray instance with `workers`
    CPUs unless `address` names a running cluster ('auto' or host:port)."""

    name = "ray"

    def __init__(self, workers: int = 2, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as error:  # pragma: no cover - ray is in requirements.txt
            raise RuntimeError("--engine ray needs ray[data,train] (pip install "
                               "'ray[data,train]==2.60.0')") from error
        self.ray, self.workers = ray, max(1, int(workers))
        self._started_here = not ray.is_initialized()
        if self._started_here:
            ray.init(address=address, num_cpus=None if address else self.workers,
                     include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=False)
        log(f"ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {self.workers} workers")
        self._tasks: dict[Callable, object] = {}

    def map(self, function: Callable, shards: Sequence[tuple], shared: tuple = ()) -> list:
        remote = self._tasks.setdefault(function, self.ray.remote(num_cpus=1)(function))
        shared_refs = [self.ray.put(value) for value in shared]  # one copy per node
        return self.ray.get([remote.remote(*shared_refs, *shard) for shard in shards])

    def encode(self, encoder, texts: list[str], desc: str = "encode") -> np.ndarray:
        import ray.data
        from ray.data import ActorPoolStrategy

        out = np.empty((len(texts), encoder.dim), dtype=np.float32)
        if not texts:
            return out
        batches = [{"rows": rows, "texts": [texts[i] for i in rows]}
                   for rows in encoder.batches(texts)]
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # one line per step is ours
        ray.data.DataContext.get_current().enable_progress_bars = False
        encoded = ray.data.from_items(batches).map_batches(
            _EncodeActor, fn_constructor_kwargs={"encoder": encoder}, batch_size=1,
            compute=ActorPoolStrategy(size=self.workers), num_cpus=1)
        done = 0
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            for rows, vectors in zip(batch["rows"], batch["embedding"]):
                out[np.asarray(rows, dtype=np.int64)] = np.asarray(vectors, dtype=np.float32)
                done += len(rows)
        log(f"{desc}: {done} texts encoded by {self.workers} Ray actors")
        return out

    def worker_memory(self) -> list[dict]:
        """Peak memory of the worker processes, one line per worker that ran a shard."""
        seen = self.map(_worker_memory, [() for _ in range(4 * self.workers)])
        return sorted({row["worker"]: row for row in seen}.values(), key=lambda r: r["worker"])

    def close(self) -> None:
        if self._started_here and self.ray.is_initialized():
            self.ray.shutdown()


class _EncodeActor:
    """Holds the encoder (unpickled once per actor) and encodes one batch per call."""

    def __init__(self, encoder) -> None:
        import torch
        torch.set_num_threads(1)
        self.encoder = encoder

    def __call__(self, batch: dict) -> dict:  # batch_size=1: one encoder batch per call
        return {"rows": batch["rows"], "embedding": np.stack(
            [self.encoder.encode_batch(list(texts)) for texts in batch["texts"]])}


def _worker_memory() -> dict:
    return {"worker": os.getpid(), "peak_rss_mb": round(peak_rss_mb(), 1)}


def make_engine(name: str = "local", workers: int = 2, address: str | None = None):
    if name == "local":
        return LocalEngine()
    if name == "ray":
        return RayEngine(workers, address)
    raise ValueError(f"unknown engine '{name}' ({', '.join(ENGINES)})")


# ------------------------------------------------------------------ shard functions
def search_shard(index_bytes: np.ndarray, row_to_item: np.ndarray, k: int,
                 user_vectors: np.ndarray, exclude: sp.csr_matrix | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of these users (rows of `user_vectors`, their seen items in `exclude`)."""
    retriever = FaissRetriever.from_bytes(index_bytes, row_to_item)
    return retriever.search(user_vectors, k, exclude)


def metrics_shard(metric: Callable, ks: tuple[int, ...], top: np.ndarray, users: np.ndarray,
                  truth: sp.csr_matrix) -> pd.DataFrame:
    """`metric(top, rows, truth, ks)` (evaluation.per_user_metrics) for these users, whose
    truth rows are `truth`'s, in order."""
    frame = metric(top, np.arange(len(users)), truth, ks)
    frame["user"] = users
    return frame


def user_shards(count: int, engine) -> list[np.ndarray]:
    """Positions 0..count-1 in `engine.workers` contiguous slices (no empty ones)."""
    return [s for s in np.array_split(np.arange(count), engine.workers) if len(s)]


def search(engine, retriever: FaissRetriever, user_vectors: np.ndarray, k: int,
           exclude: sp.csr_matrix | None, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`retriever.search` for `users`, sharded over the engine's workers."""
    if engine is None or engine.workers == 1:
        return retriever.search(user_vectors, k, exclude, users)
    shards = [(np.ascontiguousarray(user_vectors[users[s]]),
               None if exclude is None else exclude[users[s]]) for s in user_shards(len(users),
                                                                                 engine)]
    parts = engine.map(search_shard, shards, (retriever.to_bytes(), retriever.row_to_item, k))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def sharded_metrics(engine, metric: Callable, top: np.ndarray, users: np.ndarray,
                    truth: sp.csr_matrix, ks: tuple[int, ...]) -> pd.DataFrame:
    """Per-user metrics computed shard by shard on the workers and merged in user order."""
    if engine is None or engine.workers == 1 or len(users) == 0:
        return metric(top, users, truth, ks)
    shards = [(top[s], users[s], truth[users[s]]) for s in user_shards(len(users), engine)]
    return pd.concat(engine.map(metrics_shard, shards, (metric, tuple(ks))), ignore_index=True)
