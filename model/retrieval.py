"""Top-K retrieval: FAISS inner-product search with seen items excluded. One retriever
serves the pipeline, the evaluator and bundles."""
from __future__ import annotations

import os

import faiss
import numpy as np
import scipy.sparse as sp

from utils import atomic_path, rows_contain

SEARCH_CHUNK = 2048  # queries per FAISS call


class FaissRetriever:
    """Top-K items per user by inner product, seen items excluded.

    kind: 'flat' (exact), 'ivf' (inverted lists, `nprobe` probed) or 'hnsw' (graph, `ef_search`
    candidates kept while searching). The index moves to the GPU when faiss sees one (HNSW
    has no GPU version and stays on the CPU).
    """

    def __init__(self, kind: str = "flat", nprobe: int = 16, hnsw_m: int = 32,
                 use_gpu: bool | None = None, ef_search: int = 128) -> None:
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index kind '{kind}' (flat, ivf or hnsw)")
        self.kind, self.nprobe, self.hnsw_m, self.ef_search = kind, nprobe, hnsw_m, ef_search
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self.index = None
        self.row_to_item = None

    def fit(self, item_vectors: np.ndarray, items: np.ndarray | None = None) -> "FaissRetriever":
        """Index the rows `items` of `item_vectors` (all rows by default)."""
        items = np.arange(len(item_vectors)) if items is None else np.asarray(items)
        if len(items) == 0:
            raise ValueError("no item vectors to index")
        vectors = np.ascontiguousarray(item_vectors[items], dtype=np.float32)
        self.row_to_item = items.astype(np.int64)
        self.index = self._build(vectors)
        return self

    def _build(self, vectors: np.ndarray):
        dim = vectors.shape[1]
        if self.kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
        else:
            nlist = self.nlist_for(len(vectors))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(self.nprobe, nlist)
        if self.kind == "hnsw":  # faiss builds HNSW graphs differently with several threads
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                index.add(vectors)
            finally:
                faiss.omp_set_num_threads(threads)
        else:
            index.add(vectors)
        if self.use_gpu and self.kind != "hnsw":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    @staticmethod
    def nlist_for(count: int) -> int:
        """Inverted lists of an IVF index over `count` vectors (~4 sqrt(n), >= 39 per list)."""
        return max(1, min(int(4 * np.sqrt(count)), count // 39 or 1))

    def search_width(self) -> int | None:
        """What an approximate search looks at: IVF's nprobe, HNSW's ef_search (None: exact)."""
        return {"ivf": self.nprobe, "hnsw": self.ef_search}.get(self.kind)

    def set_search_width(self, width: int) -> None:
        """Lists probed per query (IVF) or candidates kept while searching (HNSW); exact
        search ignores it."""
        if self.kind == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            self.nprobe = ivf.nprobe = min(width, ivf.nlist)
        elif self.kind == "hnsw":
            self.ef_search = self.index.hnsw.efSearch = width

    def search(self, user_vectors: np.ndarray, k: int, exclude: sp.csr_matrix | None = None,
               users: np.ndarray | None = None, chunk: int = SEARCH_CHUNK
               ) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, scores) of shape (len(users), k); -1 / -inf pad short lists."""
        users = np.arange(len(user_vectors)) if users is None else np.asarray(users)
        counts = seen_counts(exclude, users)
        order = query_order(counts)
        top_items = np.full((len(users), k), -1, dtype=np.int64)
        top_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        for start in range(0, len(users), chunk):
            rows = order[start:start + chunk]
            depth = min(k + int(counts[rows].max()), self.index.ntotal)
            queries = np.ascontiguousarray(user_vectors[users[rows]], dtype=np.float32)
            scores, positions = self.index.search(queries, depth)
            items = np.where(positions >= 0, self.row_to_item[np.maximum(positions, 0)], -1)
            invalid = positions < 0
            if exclude is not None:
                invalid |= rows_contain(exclude, users[rows], items)
            keep = np.argsort(invalid, axis=1, kind="stable")[:, :k]  # valid ones, in rank order
            picked_invalid = np.take_along_axis(invalid, keep, 1)
            width = keep.shape[1]
            top_items[rows, :width] = np.where(picked_invalid, -1,
                                               np.take_along_axis(items, keep, 1))
            top_scores[rows, :width] = np.where(picked_invalid, -np.inf,
                                                np.take_along_axis(scores, keep, 1))
        return top_items, top_scores

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            faiss.write_index(self._cpu_index(), str(tmp))

    def _cpu_index(self):
        return faiss.index_gpu_to_cpu(self.index) if self.use_gpu and self.kind != "hnsw" \
            else self.index

    def to_bytes(self) -> np.ndarray:
        """The index serialised (a CPU copy), to replicate it on other workers."""
        return faiss.serialize_index(self._cpu_index())

    @classmethod
    def from_bytes(cls, data: np.ndarray, row_to_item: np.ndarray) -> "FaissRetriever":
        return cls._wrap(faiss.deserialize_index(data), row_to_item)

    @classmethod
    def _wrap(cls, index, row_to_item: np.ndarray | None) -> "FaissRetriever":
        retriever = cls("flat" if isinstance(index, faiss.IndexFlat) else
                        "hnsw" if isinstance(index, faiss.IndexHNSW) else "ivf", use_gpu=False)
        retriever.index = index
        if retriever.kind == "ivf":  # the search width is saved with the index
            retriever.nprobe = faiss.extract_index_ivf(index).nprobe
        elif retriever.kind == "hnsw":
            retriever.ef_search = index.hnsw.efSearch
        retriever.row_to_item = np.arange(index.ntotal, dtype=np.int64) if row_to_item is None \
            else np.asarray(row_to_item, dtype=np.int64)
        return retriever

    @classmethod
    def load(cls, path: str | os.PathLike, row_to_item: np.ndarray | None = None,
             use_gpu: bool | None = None) -> "FaissRetriever":
        """An index written by `save` (or by faiss.write_index); `row_to_item` maps index
        rows to item ids (identity by default)."""
        return cls._wrap(faiss.read_index(str(path)), row_to_item)


def seen_counts(exclude: sp.csr_matrix | None, users: np.ndarray) -> np.ndarray:
    """How many items each user has excluded (0 without an exclusion matrix)."""
    return np.diff(exclude.indptr)[users] if exclude is not None else np.zeros(len(users))


def query_order(counts: np.ndarray) -> np.ndarray:
    """The order users are searched in: similar seen counts share a query size. A sharded
    search cuts this order at multiples of SEARCH_CHUNK, so every FAISS call gets the same
    queries as in one process and the lists are identical to the last bit."""
    return np.argsort(counts, kind="stable")


def top_overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's `truth` list (-1 padding ignored) that `found` also holds."""
    return round(float(np.mean([len(np.intersect1d(f[f >= 0], t[t >= 0]))
                                / max((t >= 0).sum(), 1) for f, t in zip(found, truth)])), 4)


OVERLAP_TARGET = 0.95  # share of the exact top 20 an IVF index must keep to be used
CALIBRATION_USERS = 2000
MAX_EF_SEARCH = 1024


def calibrated_retriever(item_vectors: np.ndarray, items: np.ndarray | None,
                         user_vectors: np.ndarray, seen: sp.csr_matrix | None,
                         users: np.ndarray, kind: str = "ivf", width: int = 16,
                         target: float = OVERLAP_TARGET) -> tuple[FaissRetriever, dict]:
    """An approximate index (`kind` 'ivf' or 'hnsw') whose top 20 keeps `target` of the exact
    top 20 for `users`, its search width (IVF nprobe, HNSW ef_search) doubled from `width`
    until it does; or the exact index where that would take more than an eighth of IVF's
    lists or an ef_search over MAX_EF_SEARCH (the approximate search then costs about what
    exact search does). Returns the retriever and what was measured."""
    exact = FaissRetriever("flat", use_gpu=False).fit(item_vectors, items)
    truth = exact.search(user_vectors, 20, seen, users)[0]
    approximate = FaissRetriever(kind, nprobe=width, ef_search=width,
                                 use_gpu=False).fit(item_vectors, items)
    limit = faiss.extract_index_ivf(approximate.index).nlist // 8 if kind == "ivf" \
        else MAX_EF_SEARCH
    tried = {}
    while width <= limit:
        approximate.set_search_width(width)
        tried[width] = top_overlap(approximate.search(user_vectors, 20, seen, users)[0], truth)
        if tried[width] >= target:
            return approximate, {"type": type(approximate.index).__name__, "width": width,
                                 "overlap@20_by_width": tried, "target": target}
        width *= 2
    return exact, {"type": "IndexFlatIP", "tried": kind, "width_limit": limit,
                   "overlap@20_by_width": tried, "target": target}


def calibration_users(candidates: np.ndarray, seed: int = 0,
                      count: int = CALIBRATION_USERS) -> np.ndarray:
    """A seeded sorted sample of `count` of the `candidates` (all of them when fewer)."""
    return np.sort(np.random.default_rng(seed).choice(candidates, min(count, len(candidates)),
                                                      replace=False))


def active_users(seen: sp.csr_matrix) -> np.ndarray:
    """Users with at least one training interaction (the ones a bundle serves)."""
    return np.flatnonzero(np.diff(seen.indptr) > 0)
