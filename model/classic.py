"""Classic collaborative recommenders, the yardsticks every other stage must beat:
popularity, and (see below) the matrix-factorisation and item-item models."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from coreMethod import top_k_rows
from model.base import ModelError, Recommender, register


def _popularity_order(counts: np.ndarray) -> np.ndarray:
    """Items by count, ties by the lower id: computed once per fit or load, not per call."""
    return np.lexsort((np.arange(len(counts)), -counts))


@register
class Popularity(Recommender):
    """Most-interacted training items first (ties: lower item id); the same list for all."""

    _name = "popularity"

    def fit(self, dataset) -> "Popularity":
        self.counts = np.asarray((dataset.train > 0).sum(axis=0)).ravel().astype(np.float32)
        self.order = _popularity_order(self.counts)
        self._fitted_on(dataset)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts)))

    def recommend(self, user_ids, k: int = 20, exclude_seen: bool = True,
                  among: np.ndarray | None = None, engine=None) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()  # a sort of the counts: nothing worth sharding
        users = np.atleast_1d(np.asarray(user_ids, dtype=np.int64))
        self._check_rows(users, self.n_users, "user")
        order = self.order if among is None else self.order[np.isin(self.order, among)]
        most_seen = int(np.diff(self.seen.indptr).max()) if exclude_seen else 0
        head = order[: k + most_seen]
        items = np.full((len(users), k), -1, dtype=np.int64)
        for row, user in enumerate(users):
            seen = self.seen.indices[self.seen.indptr[user]:self.seen.indptr[user + 1]] \
                if exclude_seen else ()
            kept = head[~np.isin(head, seen)][:k]
            items[row, : len(kept)] = kept
        scores = np.where(items >= 0, self.counts[np.maximum(items, 0)], -np.inf)
        return items, scores.astype(np.float32)

    def similar_items(self, item_ids, k: int = 20):
        raise NotImplementedError("popularity has no notion of item similarity")

    def similar_users(self, user_ids, k: int = 20):
        raise NotImplementedError("popularity has no notion of user similarity")

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray], folder) -> None:
        self.counts = arrays["counts"]
        self.order = _popularity_order(self.counts)


def _binary(matrix) -> sp.csr_matrix:
    """1.0 where a user interacted with an item (counts dropped)."""
    return (sp.csr_matrix(matrix) > 0).astype(np.float32).tocsr()


def _row_normalise(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Rows scaled to sum to one (empty rows stay empty)."""
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    return sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ matrix)


def _top_k(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` columns of each row (ties: lower column); -inf entries become -1 / -inf."""
    return top_k_rows(block, k)


def _sparse_top_k(weights_of_rows, n_items: int, k: int, chunk: int = 1024) -> sp.csr_matrix:
    """Item x item CSR matrix keeping the `k` largest non-zero weights of each row, built in
    row blocks from `weights_of_rows(rows) -> dense (len(rows), n_items)`; the diagonal is
    dropped (an item is not its own neighbour)."""
    width = min(k, n_items)
    parts = []
    for start in range(0, n_items, chunk):
        rows = np.arange(start, min(start + chunk, n_items))
        block = np.asarray(weights_of_rows(rows), dtype=np.float32)
        block[np.arange(len(rows)), rows] = 0.0
        top = np.argpartition(-block, width - 1, axis=1)[:, :width]
        values = np.take_along_axis(block, top, 1)
        keep = values != 0
        parts.append(sp.csr_matrix((values[keep], (np.repeat(rows, width)[keep.ravel()],
                                                   top[keep])), shape=(n_items, n_items)))
    return sp.csr_matrix(sum(parts[1:], parts[0]))


class _ItemToItem(Recommender):
    """Score-only model scoring with an item x item matrix: score(u) = X[u] @ weights, where
    X is the binary training matrix. Subclasses set `self.weights` (dense or CSR) in fit."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: np.ndarray | sp.csr_matrix | None = None

    def score(self, users: np.ndarray) -> np.ndarray:
        self._check_fitted()
        scores = self.seen[users] @ self.weights
        return scores.toarray() if sp.issparse(scores) else np.asarray(scores)

    def similar_items(self, item_ids, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Items with the largest weights in each item's row (the item itself left out; a
        sparse row with fewer than `k` entries is padded with -1 / -inf)."""
        self._check_fitted()
        items = np.atleast_1d(np.asarray(item_ids, dtype=np.int64))
        self._check_rows(items, self.n_items, "item")
        if sp.issparse(self.weights):
            block = np.full((len(items), self.n_items), -np.inf, dtype=np.float32)
            stored = self.weights[items].tocoo()
            block[stored.row, stored.col] = stored.data
        else:
            block = np.array(self.weights[items], dtype=np.float32)
        block[np.arange(len(items)), items] = -np.inf
        if self.item_mask is not None:
            block[:, ~self.item_mask] = -np.inf
        return _top_k(block, k)

    def sparse_weights(self, k: int = 200) -> sp.csr_matrix:
        """The item x item weights as CSR; dense ones (EASE) keep each row's `k` largest."""
        self._check_fitted()
        if sp.issparse(self.weights):
            return sp.csr_matrix(self.weights)
        return _sparse_top_k(lambda rows: self.weights[rows], self.n_items, k)

    def similar_users(self, user_ids, k: int = 20):
        raise NotImplementedError(f"{type(self).__name__} is score-only (item x item weights, "
                                  "no user vectors): it has no notion of user similarity")

    def _arrays(self) -> dict[str, np.ndarray]:
        if not sp.issparse(self.weights):
            return {"weights": self.weights}
        w = self.weights
        return {"weights_data": w.data, "weights_indices": w.indices,
                "weights_indptr": w.indptr, "weights_shape": np.array(w.shape)}

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray], folder) -> None:
        if "weights" in arrays:
            self.weights = arrays["weights"]
        else:
            self.weights = sp.csr_matrix((arrays["weights_data"], arrays["weights_indices"],
                                          arrays["weights_indptr"]),
                                         shape=tuple(arrays["weights_shape"]))


@register
class ALS(Recommender):
    """Implicit-feedback matrix factorisation (Hu, Koren & Volinsky 2008) fitted by `implicit`.
    The confidence of an observed pair is alpha * value (value 1 when `binary`, else the
    count): implicit multiplies the matrix by its `alpha` argument and solves with weight c
    on observed and 1 on unobserved pairs."""

    def __init__(self, factors: int = 128, regularization: float = 100.0, alpha: float = 40.0,
                 iterations: int = 20, binary: bool = True, seed: int = 0,
                 use_gpu: bool = False) -> None:
        super().__init__()
        self.factors, self.regularization, self.alpha = factors, regularization, alpha
        self.iterations, self.binary, self.seed, self.use_gpu = iterations, binary, seed, use_gpu

    def params(self) -> dict[str, Any]:
        return {"factors": self.factors, "regularization": self.regularization,
                "alpha": self.alpha, "iterations": self.iterations, "binary": self.binary,
                "seed": self.seed, "use_gpu": self.use_gpu}

    def _implicit(self, gpu: bool = False):
        from implicit.als import AlternatingLeastSquares
        return AlternatingLeastSquares(factors=self.factors, regularization=self.regularization,
                                       alpha=self.alpha, iterations=self.iterations,
                                       random_state=self.seed, use_gpu=gpu)

    def _values(self, user_items) -> sp.csr_matrix:
        matrix = sp.csr_matrix(user_items, dtype=np.float32)
        return _binary(matrix) if self.binary else matrix

    def fit(self, dataset) -> "ALS":
        start = time.perf_counter()
        with threadpool_limits(1, "blas"):  # implicit runs its own threads
            als = self._implicit(self.use_gpu)
            als.fit(self._values(dataset.train), show_progress=False)
        als = als.to_cpu() if self.use_gpu else als
        self.user_vectors = np.asarray(als.user_factors, dtype=np.float32)
        self.item_vectors = np.asarray(als.item_factors, dtype=np.float32)
        self.training_log = {"fit_seconds": round(time.perf_counter() - start, 2)}
        self._fitted_on(dataset)
        return self

    def fold_in_users(self, user_items) -> np.ndarray:
        """User vectors, one per row of `user_items` (users x items, new or changed users),
        solved in closed form against the learnt item vectors (implicit's
        `recalculate_user`, the step `partial_fit_users` stores). Nothing is stored."""
        user_items = self._values(user_items)
        _, item_vectors = self.embeddings()
        if user_items.shape[1] != len(item_vectors):
            raise ModelError(f"user_items has {user_items.shape[1]} item columns; the model "
                             f"has {len(item_vectors)} items")
        with threadpool_limits(1, "blas"):
            als = self._implicit()
            als.item_factors = item_vectors
            vectors = als.recalculate_user(np.arange(user_items.shape[0]), user_items)
        return np.asarray(vectors, dtype=np.float32).reshape(user_items.shape[0], -1)


@register
class EASE(_ItemToItem):
    """EASE^R (Steck 2019): B = I - P diag(1 / diag(P)), P = (X^T X + l2 I)^-1, diag(B) = 0;
    X is the binary training matrix. B is dense (n_items^2 float32)."""

    def __init__(self, l2: float = 500.0) -> None:
        super().__init__()
        self.l2 = l2

    def params(self) -> dict[str, Any]:
        return {"l2": self.l2}

    def fit(self, dataset) -> "EASE":
        start = time.perf_counter()
        x = _binary(dataset.train)
        gram = np.asarray((x.T @ x).todense(), dtype=np.float32)
        gram[np.diag_indices_from(gram)] += self.l2
        weights = _spd_inverse(gram)
        weights /= -np.diag(weights).copy()[None, :]
        np.fill_diagonal(weights, 0.0)
        self.weights = weights
        self.training_log = {"fit_seconds": round(time.perf_counter() - start, 2)}
        self._fitted_on(dataset)
        return self


def _spd_inverse(matrix: np.ndarray, block: int = 2048) -> np.ndarray:
    """Inverse of a symmetric positive definite C-ordered matrix by Cholesky, in place (no
    second n x n copy). LAPACK sees the transpose, so its lower triangle is our upper."""
    factor, info = lapack.spotrf(matrix.T, lower=True, overwrite_a=True, clean=False)
    if info == 0:
        factor, info = lapack.spotri(factor, lower=True, overwrite_c=True)
    if info != 0:
        raise ValueError(f"X^T X + l2 I is not positive definite (LAPACK info {info}); "
                         "use a larger l2")
    inverse = factor.T  # upper triangle valid; mirror it into the lower one block by block
    for start in range(0, len(inverse), block):
        stop = min(start + block, len(inverse))
        inverse[start:stop, :start] = inverse[:start, start:stop].T
        square = inverse[start:stop, start:stop]
        square[...] = np.triu(square) + np.triu(square, 1).T
    return inverse


@register
class RP3beta(_ItemToItem):
    """RP3beta (Paudel et al. 2017; Dacrema et al. 2019): three-step random-walk item x item
    weights W = P_iu^alpha @ P_ui^alpha with column j divided by popularity(j)^beta, the
    `top_k` largest per row kept; P_ui / P_iu are the row-normalised binary training matrix
    and its transpose."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.2, top_k: int = 200) -> None:
        super().__init__()
        self.alpha, self.beta, self.top_k = alpha, beta, top_k

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "top_k": self.top_k}

    def fit(self, dataset) -> "RP3beta":
        start = time.perf_counter()
        x = _binary(dataset.train)
        user_to_item = _row_normalise(x).power(self.alpha)
        item_to_user = _row_normalise(x.T.tocsr()).power(self.alpha).tocsr()
        popularity = np.asarray(x.sum(axis=0)).ravel()
        damping = np.power(popularity, -self.beta, out=np.zeros_like(popularity),
                           where=popularity > 0)
        self.weights = _sparse_top_k(
            lambda rows: (item_to_user[rows] @ user_to_item).toarray() * damping,
            x.shape[1], self.top_k)
        self.training_log = {"fit_seconds": round(time.perf_counter() - start, 2)}
        self._fitted_on(dataset)
        return self


@register
class ItemKNN(_ItemToItem):
    """Item-based kNN: cosine similarity of the items' binary user columns with a shrink term,
    s_ij = x_i . x_j / (|x_i| |x_j| + shrink), the `top_k` most similar kept per item."""

    def __init__(self, top_k: int = 100, shrink: float = 0.0) -> None:
        super().__init__()
        self.top_k, self.shrink = top_k, shrink

    def params(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "shrink": self.shrink}

    def fit(self, dataset) -> "ItemKNN":
        start = time.perf_counter()
        x = _binary(dataset.train)
        item_users = x.T.tocsr()
        norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())

        def cosine(rows: np.ndarray) -> np.ndarray:
            dots = (item_users[rows] @ x).toarray()
            return dots / (norms[rows, None] * norms[None, :] + self.shrink + 1e-6)

        self.weights = _sparse_top_k(cosine, x.shape[1], self.top_k)
        self.training_log = {"fit_seconds": round(time.perf_counter() - start, 2)}
        self._fitted_on(dataset)
        return self
