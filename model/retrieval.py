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

    kind: 'flat' (exact), 'ivf' (inverted lists, `nprobe` probed) or 'hnsw'. The index moves
    to the GPU when faiss sees one (HNSW has no GPU version and stays on the CPU).
    """

    def __init__(self, kind: str = "flat", nprobe: int = 16, hnsw_m: int = 32,
                 use_gpu: bool | None = None) -> None:
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index kind '{kind}' (flat, ivf or hnsw)")
        self.kind, self.nprobe, self.hnsw_m = kind, nprobe, hnsw_m
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
            index.hnsw.efSearch = 128
        else:
            nlist = self.nlist_for(len(vectors))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(self.nprobe, nlist)
        index.add(vectors)
        if self.use_gpu and self.kind != "hnsw":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    @staticmethod
    def nlist_for(count: int) -> int:
        """Inverted lists of an IVF index over `count` vectors (~4 sqrt(n), >= 39 per list)."""
        return max(1, min(int(4 * np.sqrt(count)), count // 39 or 1))

    def set_nprobe(self, nprobe: int) -> None:
        """Inverted lists probed per query (IVF; other kinds ignore it)."""
        self.nprobe = nprobe
        if self.kind == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = min(nprobe, ivf.nlist)

    def search(self, user_vectors: np.ndarray, k: int, exclude: sp.csr_matrix | None = None,
               users: np.ndarray | None = None, chunk: int = SEARCH_CHUNK
               ) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, scores) of shape (len(users), k); -1 / -inf pad short lists."""
        users = np.arange(len(user_vectors)) if users is None else np.asarray(users)
        seen_counts = np.diff(exclude.indptr)[users] if exclude is not None else np.zeros(len(users))
        order = query_order(seen_counts)
        top_items = np.full((len(users), k), -1, dtype=np.int64)
        top_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        for start in range(0, len(users), chunk):
            rows = order[start:start + chunk]
            depth = min(k + int(seen_counts[rows].max()), self.index.ntotal)
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
        index = faiss.index_gpu_to_cpu(self.index) if self.use_gpu and self.kind != "hnsw" \
            else self.index
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))

    def to_bytes(self) -> np.ndarray:
        """The index serialised (a CPU copy), to replicate it on other workers."""
        index = faiss.index_gpu_to_cpu(self.index) if self.use_gpu and self.kind != "hnsw" \
            else self.index
        return faiss.serialize_index(index)

    @classmethod
    def from_bytes(cls, data: np.ndarray, row_to_item: np.ndarray) -> "FaissRetriever":
        return cls._wrap(faiss.deserialize_index(data), row_to_item)

    @classmethod
    def _wrap(cls, index, row_to_item: np.ndarray | None) -> "FaissRetriever":
        retriever = cls("flat" if isinstance(index, faiss.IndexFlat) else
                        "hnsw" if isinstance(index, faiss.IndexHNSW) else "ivf", use_gpu=False)
        retriever.index = index
        retriever.row_to_item = np.arange(index.ntotal, dtype=np.int64) if row_to_item is None \
            else np.asarray(row_to_item, dtype=np.int64)
        return retriever

    @classmethod
    def load(cls, path: str | os.PathLike, row_to_item: np.ndarray | None = None,
             use_gpu: bool | None = None) -> "FaissRetriever":
        """An index written by `save` (or by faiss.write_index); `row_to_item` maps index
        rows to item ids (identity by default)."""
        return cls._wrap(faiss.read_index(str(path)), row_to_item)


def query_order(seen_counts: np.ndarray) -> np.ndarray:
    """The order users are searched in: similar seen counts share a query size. A sharded
    search cuts this order at multiples of SEARCH_CHUNK, so every FAISS call gets the same
    queries as in one process and the lists are identical to the last bit."""
    return np.argsort(seen_counts, kind="stable")
