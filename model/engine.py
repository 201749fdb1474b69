"""Where the heavy steps run: in this process (`--engine local`, the default) or on a Ray
cluster (`--engine ray`, `--workers N`, `--ray-address` to join a running one).

Each heavy step is a plain function over a shard: `encode_batch` (one length-sorted batch of
profile texts), `search_shard` (one slice of users against a replicated FAISS index) and
`metrics_shard` (those users' Recall/NDCG). The local engine runs the whole step in this
process (one shard); the Ray engine maps the shards over workers (Ray Data with an actor
pool for encoding, Ray tasks for the rest) and puts the results back in order, so both give
the same rows."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from model.retrieval import SEARCH_CHUNK, FaissRetriever, query_order, seen_counts
from utils import log, peak_memory_mb

ENGINES = ("local", "ray")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def process_memory() -> dict:
    """This process: id, peak resident memory and unique memory (USS: what ending it would
    free) now, in MB."""
    import psutil
    return {"worker": f"{socket.gethostname()}:{os.getpid()}",
            "peak_rss_mb": round(peak_memory_mb(), 1),
            "uss_mb": round(psutil.Process().memory_full_info().uss / 2**20, 1)}


def _measured(function: Callable, *args) -> tuple:
    return function(*args), process_memory()


class LocalEngine:
    """Every shard in this process, one after the other."""

    name, workers, storage = "local", 1, None

    def encode(self, encoder, texts: list[str], desc: str = "encode") -> np.ndarray:
        return encoder.encode(texts, desc=desc)

    def worker_memory(self) -> list[dict]:
        return [process_memory()]

    def close(self) -> None:
        pass


class RayEngine:
    """Shards as Ray tasks (one CPU each); encoding as Ray Data `map_batches` over an actor
    pool whose actors receive the encoder once. Starts a local Ray instance with `workers`
    CPUs unless `address` names a running cluster ('auto' or host:port), to which the
    project's code is shipped (`code_runtime_env`). `storage`: where Ray Train workers
    persist their results (`model.ddp`), a folder every node reaches or a URI."""

    name = "ray"

    def __init__(self, workers: int = 2, address: str | None = None,
                 storage: str | None = None) -> None:
        try:
            import ray
        except ImportError as error:  # pragma: no cover - ray is in requirements.txt
            raise RuntimeError("--engine ray needs ray[data,train] (pip install "
                               "'ray[data,train]==2.60.0')") from error
        self.ray, self.workers = ray, max(1, int(workers))
        self.storage = storage if not storage or "://" in storage else \
            os.path.abspath(os.path.expanduser(storage))  # Ray Train wants an absolute path
        self._started_here = not ray.is_initialized()
        if self._started_here:
            ray.init(address=address, num_cpus=None if address else self.workers,
                     runtime_env=code_runtime_env() if address else None,
                     include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=False)
        cpus = ray.cluster_resources().get("CPU", 0)
        log(f"ray: {cpus:.0f} CPUs, {self.workers} workers")
        if self.workers > cpus:
            log(f"warning: --workers {self.workers} exceeds the cluster's {cpus:.0f} CPUs; "
                "the encoding actor pool waits for CPUs that never come")
        self._remote = ray.remote(num_cpus=1)(_measured)
        self.memory: dict[str, dict] = {}  # worker process -> its largest memory figures

    def map(self, function: Callable, shards: Sequence[tuple], shared: tuple = ()) -> list:
        shared_refs = [self.ray.put(value) for value in shared]  # one copy per node
        done = self.ray.get([self._remote.remote(function, *shared_refs, *shard)
                             for shard in shards])
        for _, memory in done:
            self._record(memory)
        return [value for value, _ in done]

    def _record(self, memory: dict) -> None:
        known = self.memory.setdefault(memory["worker"], memory)
        for key in ("peak_rss_mb", "uss_mb"):
            known[key] = max(known[key], memory[key])

    def encode(self, encoder, texts: list[str], desc: str = "encode") -> np.ndarray:
        import ray.data
        from ray.data import ActorPoolStrategy

        out = np.empty((len(texts), encoder.dim), dtype=np.float32)
        if not texts:
            return out
        if encoder.device != "cpu":  # the GPU is here; CPU actors would run another model
            log(f"{desc}: encoder on {encoder.device}: encoded in the driver, not on Ray")
            return encoder.encode(texts, desc=desc)
        batches = [{"rows": rows, "texts": [texts[i] for i in rows]}
                   for rows in encoder.batches(texts)]
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # one line per step is ours
        ray.data.DataContext.get_current().enable_progress_bars = False
        encoded = ray.data.from_items(batches).map_batches(
            _EncodeActor, fn_constructor_kwargs={"encoder": encoder}, batch_size=1,
            compute=ActorPoolStrategy(size=self.workers), num_cpus=1)
        progress, done = tqdm(total=len(texts), desc=f"{desc} (ray x {self.workers})",
                              unit="text", disable=None), 0
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            for rows, vectors in zip(batch["rows"], batch["embedding"]):
                out[np.asarray(rows, dtype=np.int64)] = np.asarray(vectors, dtype=np.float32)
                progress.update(len(rows))
                done += len(rows)
            for worker, rss, uss in zip(batch["worker"], batch["peak_rss_mb"], batch["uss_mb"]):
                self._record({"worker": str(worker), "peak_rss_mb": float(rss),
                              "uss_mb": float(uss)})
        progress.close()
        if done != len(texts):
            raise RuntimeError(f"{desc}: Ray returned {done} of {len(texts)} embeddings")
        log(f"{desc}: {len(texts)} texts encoded by {self.workers} Ray actors")
        return out

    def worker_memory(self) -> list[dict]:
        """The largest memory figures of each worker process (task or encoding actor) that
        ran a shard so far."""
        return sorted(self.memory.values(), key=lambda row: row["worker"])

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
        vectors = np.stack([self.encoder.encode_batch(list(texts)) for texts in batch["texts"]])
        memory = process_memory()
        return {"rows": batch["rows"], "embedding": vectors,
                **{key: np.full(len(vectors), value) for key, value in memory.items()}}


def code_runtime_env() -> dict:
    """The Ray job environment that lets a cluster's workers import this project: its
    folder shipped to every node as the job's working directory (without .git and what
    git ignores: runs/, .venv/, dataset/...). The nodes need the packages installed."""
    return {"working_dir": str(PROJECT_ROOT), "excludes": [".git"]}


def make_engine(name: str = "local", workers: int = 2, address: str | None = None,
                storage: str | None = None):
    if name == "local":
        return LocalEngine()
    if name == "ray":
        return RayEngine(workers, address, storage)
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
    """`retriever.search` for `users`, sharded over the engine's workers: whole query
    chunks of the one-process order per shard, so the lists are the same."""
    if engine is None or engine.workers == 1 or len(users) <= SEARCH_CHUNK:
        return retriever.search(user_vectors, k, exclude, users)
    order = query_order(seen_counts(exclude, users))
    chunks = np.array_split(np.arange(-(-len(users) // SEARCH_CHUNK)), engine.workers)
    positions = [order[c[0] * SEARCH_CHUNK:(c[-1] + 1) * SEARCH_CHUNK] for c in chunks if len(c)]
    shards = [(np.ascontiguousarray(user_vectors[users[p]]),
               None if exclude is None else exclude[users[p]]) for p in positions]
    parts = engine.map(search_shard, shards, (retriever.to_bytes(), retriever.row_to_item, k))
    items = np.empty((len(users), k), dtype=np.int64)
    scores = np.empty((len(users), k), dtype=np.float32)
    for p, (shard_items, shard_scores) in zip(positions, parts):
        items[p], scores[p] = shard_items, shard_scores
    return items, scores


def sharded_metrics(engine, metric: Callable, top: np.ndarray, users: np.ndarray,
                    truth: sp.csr_matrix, ks: tuple[int, ...]) -> pd.DataFrame:
    """Per-user metrics computed shard by shard on the workers and merged in user order."""
    if engine is None or engine.workers == 1 or len(users) <= SEARCH_CHUNK:
        return metric(top, users, truth, ks)  # not worth a round trip
    shards = [(top[s], users[s], truth[users[s]]) for s in user_shards(len(users), engine)]
    return pd.concat(engine.map(metrics_shard, shards, (metric, tuple(ks))), ignore_index=True)
