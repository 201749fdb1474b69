"""The ranking stage's features of (user, candidate item) pairs, from training data only:
each recall channel's score, cosine and rank, item-item model scores, activity and
popularity, k-means segments, and hashed crosses for the wide part."""
from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp
import torch

from coreMethod import unit_rows
from model.candidates import pair_sums

HASH_SIZE = 1 << 18
N_BUCKETS = 5
WIDE_FIELDS = ("item", "user_segment x item_segment", "activity x popularity",
               "user_segment x item", "item_segment x activity")


def _buckets(values: np.ndarray) -> np.ndarray:
    """Quantile buckets 0..N_BUCKETS-1 (ties share a bucket)."""
    edges = np.quantile(values, np.linspace(0, 1, N_BUCKETS + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64)


class RankingFeatures:
    """Everything the ranker knows about a user or an item, from *training* data only.

    signals: name -> (user vectors, item vectors) of each recall channel, scored by inner
    product; `primary` is the one whose order the candidates start with. Per channel a pair
    gets its cosine, its inner product (the channel's own score) and its rank in the
    channel's list. Segments are k-means clusters of the primary vectors.
    item_item: name -> sparse item x item weights of a score-only model (RP3beta, EASE, ...):
    a pair gets that model's score, the sum of the weights from the user's training items;
    with `item_item_channels`, these models are candidate channels too (a rank each).
    """

    item_item_channels = False  # rankers saved before item-item channels

    def __init__(self, train: sp.csr_matrix, signals: dict[str, tuple[np.ndarray, np.ndarray]],
                 primary: str, n_segments: int = 32, seed: int = 2023,
                 item_item: dict[str, sp.csr_matrix] | None = None,
                 item_item_channels: bool = False) -> None:
        if train is None:  # filled by `load`
            return
        self.item_item_channels = item_item_channels
        binary = train > 0
        self.history = sp.csr_matrix(binary, dtype=np.float32)
        self.item_item = {name: _canonical(w) for name, w in (item_item or {}).items()}
        self.activity = np.log1p(np.asarray(binary.sum(axis=1)).ravel()).astype(np.float32)
        self.popularity = np.log1p(np.asarray(binary.sum(axis=0)).ravel()).astype(np.float32)
        self.activity_bucket, self.popularity_bucket = (_buckets(self.activity),
                                                        _buckets(self.popularity))
        signals = {primary: signals[primary], **signals}  # the primary channel first
        self.signals = {name: (unit_rows(u), unit_rows(i)) for name, (u, i) in signals.items()}
        self.norms = {name: (_norms(u), _norms(i)) for name, (u, i) in signals.items()}
        self.user_vectors, self.item_vectors = self.signals[primary]
        # faiss k-means wants ~39 points per cluster: fewer segments on small data
        n_segments = max(2, min(n_segments, min(len(self.user_vectors),
                                                len(self.item_vectors)) // 39))
        self.user_segment = self._segments(self.user_vectors, n_segments, seed)
        self.item_segment = self._segments(self.item_vectors, n_segments, seed)
        self.n_segments = n_segments

    @staticmethod
    def _segments(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
        kmeans = faiss.Kmeans(vectors.shape[1], k, niter=15, seed=seed, verbose=False)
        kmeans.train(vectors)
        return kmeans.index.search(vectors, 1)[1].ravel().astype(np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: getattr(self, name) for name in self._ARRAYS}
        for position, name in enumerate(self.signals):
            out[f"signal{position}_users"], out[f"signal{position}_items"] = self.signals[name]
            out[f"signal{position}_user_norms"], out[f"signal{position}_item_norms"] = \
                self.norms[name]
        matrices = {"history": self.history, **{f"item_item{p}": w for p, w in
                                                enumerate(self.item_item.values())}}
        for key, matrix in matrices.items():
            out.update({f"{key}_data": matrix.data, f"{key}_indices": matrix.indices,
                        f"{key}_indptr": matrix.indptr, f"{key}_shape": np.array(matrix.shape)})
        return out

    _ARRAYS = ("activity", "popularity", "activity_bucket", "popularity_bucket",
               "user_segment", "item_segment")

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], names: list[str], primary: str,
                    n_segments: int, item_item: list[str] = (),
                    item_item_channels: bool = False) -> "RankingFeatures":
        def matrix(key: str) -> sp.csr_matrix:
            return sp.csr_matrix((arrays[f"{key}_data"], arrays[f"{key}_indices"],
                                  arrays[f"{key}_indptr"]), shape=tuple(arrays[f"{key}_shape"]))

        features = cls(None, {}, primary)
        features.history = matrix("history")
        features.item_item = {name: _canonical(matrix(f"item_item{p}"))
                              for p, name in enumerate(item_item)}
        features.item_item_channels = item_item_channels
        for name in cls._ARRAYS:
            setattr(features, name, arrays[name])
        features.signals = {name: (arrays[f"signal{p}_users"], arrays[f"signal{p}_items"])
                            for p, name in enumerate(names)}
        features.norms = {name: (arrays[f"signal{p}_user_norms"],
                                 arrays[f"signal{p}_item_norms"]) for p, name in enumerate(names)}
        features.user_vectors, features.item_vectors = features.signals[primary]
        features.n_segments = n_segments
        return features

    @property
    def rank_channels(self) -> list[str]:
        """The channels whose rank of a pair is a feature, in candidate-channel order."""
        return [*self.signals, *(self.item_item if self.item_item_channels else ())]

    @property
    def n_dense(self) -> int:
        return 2 * len(self.signals) + len(self.rank_channels) + 2 + 2 * len(self.item_item)

    def channels(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each channel's own vectors (inner product = its score), primary first."""
        return {name: (u * self.norms[name][0][:, None], i * self.norms[name][1][:, None])
                for name, (u, i) in self.signals.items()}

    def primary_scores(self, users: np.ndarray, items: np.ndarray,
                       chunk: int = 65536) -> np.ndarray:
        """The primary channel's score of each pair, `chunk` pairs at a time (two gathered
        vector blocks of pairs x dim floats each)."""
        name = next(iter(self.signals))
        (u, i), (nu, ni) = self.signals[name], self.norms[name]
        out = np.empty(len(users), dtype=np.float32)
        for start in range(0, len(users), chunk):
            rows = slice(start, start + chunk)
            out[rows] = np.einsum("ij,ij->i", u[users[rows]], i[items[rows]]) \
                * nu[users[rows]] * ni[items[rows]]
        return out

    def categorical_sizes(self) -> list[int]:
        return [self.n_segments, self.n_segments, N_BUCKETS, N_BUCKETS]

    def build(self, users: np.ndarray, items: np.ndarray,
              ranks: np.ndarray) -> dict[str, torch.Tensor]:
        """Feature tensors for pairs (users[r], items[r]); ranks[r, c]: the pair's rank in
        channel c's list (one column: the same rank for every channel)."""
        ranks = np.broadcast_to(ranks.reshape(len(users), -1),
                                (len(users), len(self.rank_channels)))
        cosines = [np.einsum("ij,ij->i", u[users], i[items]) for u, i in self.signals.values()]
        products = [cosine * self.norms[name][0][users] * self.norms[name][1][items]
                    for cosine, name in zip(cosines, self.signals)]
        item_item = [pair_sums(self.history, w, users, items) for w in self.item_item.values()]
        dense = np.stack(cosines + products + list(np.log1p(ranks.T).astype(np.float32))
                         + [self.activity[users], self.popularity[items]] + item_item
                         + [np.log1p(np.maximum(s, 0)) for s in item_item], axis=1)
        user_segment, item_segment = self.user_segment[users], self.item_segment[items]
        activity, popularity = self.activity_bucket[users], self.popularity_bucket[items]
        crosses = [items, user_segment * self.n_segments + item_segment,
                   activity * N_BUCKETS + popularity, user_segment * (1 << 24) + items,
                   item_segment * N_BUCKETS + activity]
        wide = np.stack([_hash(field, values) for field, values in enumerate(crosses)], axis=1)
        return {"wide": torch.as_tensor(wide), "dense": torch.as_tensor(dense.astype(np.float32)),
                "categorical": torch.as_tensor(np.stack(
                    [user_segment, item_segment, activity, popularity], axis=1)),
                "users": torch.as_tensor(users, dtype=torch.long),
                "items": torch.as_tensor(items, dtype=torch.long)}


def _canonical(matrix) -> sp.csr_matrix:
    """float32 CSR, duplicates summed, column indices sorted."""
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    matrix.sum_duplicates()
    return matrix


def _norms(vectors: np.ndarray) -> np.ndarray:
    return np.linalg.norm(vectors, axis=1).astype(np.float32)


def _hash(field: int, values: np.ndarray) -> np.ndarray:
    """Field-salted multiplicative hash into HASH_SIZE buckets (collisions are rare enough
    for a linear model at these sizes)."""
    with np.errstate(over="ignore"):  # wrap-around is the point of the multiply
        mixed = values.astype(np.uint64) + np.uint64(field + 1) * np.uint64(0x9E3779B97F4A7C15)
        mixed *= np.uint64(0xBF58476D1CE4E5B9)
    return (mixed >> np.uint64(40)).astype(np.int64) % HASH_SIZE
