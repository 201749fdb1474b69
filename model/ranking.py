"""The ranking stage: features of (user, candidate item) pairs and the Wide&Deep ranker."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

HASH_SIZE = 1 << 18
N_BUCKETS = 5
WIDE_FIELDS = ("item", "user_segment x item_segment", "activity x popularity",
               "user_segment x item", "item_segment x activity")


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0).astype(np.float32)


def _buckets(values: np.ndarray) -> np.ndarray:
    """Quantile buckets 0..N_BUCKETS-1 (ties share a bucket)."""
    edges = np.quantile(values, np.linspace(0, 1, N_BUCKETS + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64)


class RankingFeatures:
    """Everything the ranker knows about a user or an item, from *training* data only.

    signals: name -> (user vectors, item vectors) of each recall signal; `primary` is the
    one that generated the candidates. Segments are k-means clusters of the primary vectors.
    """

    def __init__(self, train: sp.csr_matrix, signals: dict[str, tuple[np.ndarray, np.ndarray]],
                 primary: str, n_segments: int = 32, seed: int = 2023) -> None:
        binary = train > 0
        self.activity = np.log1p(np.asarray(binary.sum(axis=1)).ravel()).astype(np.float32)
        self.popularity = np.log1p(np.asarray(binary.sum(axis=0)).ravel()).astype(np.float32)
        self.activity_bucket, self.popularity_bucket = (_buckets(self.activity),
                                                        _buckets(self.popularity))
        self.signals = {name: (_unit(u), _unit(i)) for name, (u, i) in signals.items()}
        self.user_vectors, self.item_vectors = self.signals[primary]
        self.user_segment = self._segments(self.user_vectors, n_segments, seed)
        self.item_segment = self._segments(self.item_vectors, n_segments, seed)
        self.n_segments = n_segments

    @staticmethod
    def _segments(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
        import faiss

        kmeans = faiss.Kmeans(vectors.shape[1], k, niter=15, seed=seed, verbose=False)
        kmeans.train(vectors)
        return kmeans.index.search(vectors, 1)[1].ravel().astype(np.int64)

    @property
    def n_dense(self) -> int:
        return len(self.signals) + 3

    def categorical_sizes(self) -> list[int]:
        return [self.n_segments, self.n_segments, N_BUCKETS, N_BUCKETS]

    def build(self, users: np.ndarray, items: np.ndarray,
              ranks: np.ndarray) -> dict[str, torch.Tensor]:
        """Feature tensors for pairs (users[r], items[r]) at recall rank ranks[r]."""
        cosines = [np.einsum("ij,ij->i", u[users], i[items]) for u, i in self.signals.values()]
        dense = np.stack(cosines + [self.activity[users], self.popularity[items],
                                    np.log1p(ranks).astype(np.float32)], axis=1)
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


def _hash(field: int, values: np.ndarray) -> np.ndarray:
    """Field-salted multiplicative hash into HASH_SIZE buckets (collisions are rare enough
    for a linear model at these sizes)."""
    with np.errstate(over="ignore"):  # wrap-around is the point of the multiply
        mixed = values.astype(np.uint64) + np.uint64(field + 1) * np.uint64(0x9E3779B97F4A7C15)
        mixed *= np.uint64(0xBF58476D1CE4E5B9)
    return (mixed >> np.uint64(40)).astype(np.int64) % HASH_SIZE


class WideDeep(torch.nn.Module):
    """Wide: a linear model over hashed one-hot and crossed features (memorisation).
    Deep: an MLP over dense features, embeddings of segments and buckets, and projections
    of the user and item vectors with their element-wise product (generalisation).
    mode: 'widedeep' (joint), 'wide' or 'deep' (ablations). Output: logits."""

    def __init__(self, features: RankingFeatures, mode: str = "widedeep",
                 hidden: tuple[int, ...] = (128, 64), embedding_dim: int = 8,
                 projection_dim: int = 32) -> None:
        super().__init__()
        if mode not in ("widedeep", "wide", "deep"):
            raise ValueError(f"unknown ranker mode '{mode}' (widedeep, wide or deep)")
        self.mode = mode
        self.wide = torch.nn.EmbeddingBag(HASH_SIZE, 1, mode="sum")
        torch.nn.init.zeros_(self.wide.weight)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("user_vectors", torch.as_tensor(features.user_vectors))
        self.register_buffer("item_vectors", torch.as_tensor(features.item_vectors))
        self.register_buffer("dense_mean", torch.zeros(features.n_dense))
        self.register_buffer("dense_std", torch.ones(features.n_dense))
        self.categorical = torch.nn.ModuleList(
            torch.nn.Embedding(size, embedding_dim) for size in features.categorical_sizes())
        dim = features.user_vectors.shape[1]
        self.user_projection = torch.nn.Linear(dim, projection_dim)
        self.item_projection = torch.nn.Linear(dim, projection_dim)
        layers, width = [], features.n_dense + embedding_dim * len(self.categorical) \
            + 3 * projection_dim
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
            width = size
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def set_dense_scaling(self, dense: torch.Tensor) -> None:
        self.dense_mean.copy_(dense.mean(0))
        self.dense_std.copy_(dense.std(0).clamp(min=1e-6))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logit = self.bias.expand(len(batch["dense"]))
        if self.mode in ("widedeep", "wide"):
            logit = logit + self.wide(batch["wide"]).squeeze(-1)
        if self.mode in ("widedeep", "deep"):
            user = self.user_projection(self.user_vectors[batch["users"]])
            item = self.item_projection(self.item_vectors[batch["items"]])
            parts = [(batch["dense"] - self.dense_mean) / self.dense_std, user, item, user * item]
            parts += [table(batch["categorical"][:, k]) for k, table in enumerate(self.categorical)]
            logit = logit + self.mlp(torch.cat(parts, dim=1)).squeeze(-1)
        return logit

    @torch.no_grad()
    def score(self, features: RankingFeatures, users: np.ndarray, items: np.ndarray,
              ranks: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Scores of pairs (users[r], items[r]) at recall rank ranks[r]; -inf where
        items[r] is -1 (padding)."""
        self.eval()
        out = np.full(len(users), -np.inf, dtype=np.float32)
        valid = np.flatnonzero(items >= 0)
        for start in range(0, len(valid), chunk):
            rows = valid[start:start + chunk]
            out[rows] = self(features.build(users[rows], items[rows], ranks[rows])).numpy()
        return out
