"""Fold-in: a vector for a new or changed user (or item) from the vectors of what they
interacted with, without training. Two rules: the mean of those vectors, or implicit ALS's
closed form (YᵀY + (α-1)Y_uᵀY_u + λI)⁻¹ αY_uᵀ1, as `implicit`'s `recalculate_user`
computes it, solved here by batched conjugate gradient. Which rule (and α, λ) suits a bundle is
chosen once, at its export, by how well each reproduces the trained vectors of existing
users from their interactions alone."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

SAMPLE_USERS = 300
CG_STEPS = 30  # conjugate-gradient iterations at most
CG_TOLERANCE = 1e-3  # ... stopping when every residual is this small relative to its target
CG_CELLS = 1 << 16  # rows x padded width per batch (bounds the (rows, width, dim) array)
ALPHAS = (1.0, 10.0, 40.0)
RIDGES = (0.01, 0.1, 1.0)  # times the mean squared norm of an item vector's coordinates


@dataclass
class FoldIn:
    """Vectors for rows of an interaction matrix from the other side's vectors: the mean of
    those vectors, or implicit ALS's closed form with confidence `alpha` on observed pairs
    and 1 elsewhere, and L2 weight `regularization`."""
    method: str = "mean"  # 'mean' or 'als'
    alpha: float = 1.0
    regularization: float = 0.1
    reproduction_overlap: float = 0.0

    def vectors(self, interactions: sp.csr_matrix, other: np.ndarray,
                start: np.ndarray | None = None) -> np.ndarray:
        """One vector per row of `interactions` (rows without interactions: zero, or their
        `start`). ALS rows are solved by conjugate gradient, warm-started from `start`."""
        observed = (interactions > 0).astype(np.float32).tocsr()
        counts = np.diff(observed.indptr)
        out = np.zeros((observed.shape[0], other.shape[1]), dtype=np.float32) if start is None \
            else start.astype(np.float32).copy()
        rows = np.flatnonzero(counts > 0)
        if self.method == "mean":
            out[rows] = (observed[rows] @ other) / counts[rows, None]
            return out
        gram = other.T @ other + self.regularization * np.eye(other.shape[1], dtype=np.float32)
        padded_other = np.vstack([other, np.zeros((1, other.shape[1]), other.dtype)])
        order = rows[np.argsort(counts[rows], kind="stable")]  # similar lengths pad little
        position = 0
        while position < len(order):
            widths = counts[order[position:]]  # ascending: a chunk is as wide as its last row
            cells = np.arange(1, len(widths) + 1) * widths
            size = max(1, int(np.searchsorted(cells, CG_CELLS, side="right")))
            chunk = order[position:position + size]
            out[chunk] = self._solve(observed[chunk], padded_other, gram, out[chunk])
            position += size
        return out

    def _solve(self, rows: sp.csr_matrix, padded_other: np.ndarray, gram: np.ndarray,
               start: np.ndarray) -> np.ndarray:
        """Batched conjugate gradient on (G + (α-1)Y_uᵀY_u) x = αY_uᵀ1 for each row u
        (`padded_other`: the other side's vectors and a last zero row for padding)."""
        counts = np.diff(rows.indptr)
        width = int(counts.max())
        slots = np.arange(width)[None, :] < counts[:, None]
        padded = np.full((len(counts), width), len(padded_other) - 1, dtype=np.int64)
        padded[slots] = rows.indices
        vectors = padded_other[padded]  # (rows, width, dim)

        def apply(x: np.ndarray) -> np.ndarray:
            inner = np.einsum("nld,nd->nl", vectors, x)
            return x @ gram + (self.alpha - 1.0) * np.einsum("nld,nl->nd", vectors, inner)

        x = start.astype(np.float32)
        target = self.alpha * vectors.sum(axis=1)
        residual = target - apply(x)
        direction, norm = residual.copy(), np.einsum("nd,nd->n", residual, residual)
        enough = CG_TOLERANCE ** 2 * np.einsum("nd,nd->n", target, target)
        for _ in range(CG_STEPS):
            if (norm <= enough).all():
                break
            product = apply(direction)
            step = norm / np.maximum(np.einsum("nd,nd->n", direction, product), 1e-30)
            x += step[:, None] * direction
            residual -= step[:, None] * product
            new_norm = np.einsum("nd,nd->n", residual, residual)
            direction = residual + (new_norm / np.maximum(norm, 1e-30))[:, None] * direction
            norm = new_norm
        return x

    @classmethod
    def recorded(cls, manifest: dict) -> FoldIn | None:
        """The rule a bundle version records (chosen once, at its full export)."""
        chosen = manifest.get("fold_in")
        if not chosen:
            return None
        return cls(chosen["method"], chosen["alpha"], chosen["regularization"],
                   chosen["reproduction_overlap_at_20"])

    def describe(self) -> dict:
        return {"method": self.method, "alpha": self.alpha,
                "regularization": round(self.regularization, 6),
                "reproduction_overlap_at_20": round(self.reproduction_overlap, 4)}


def fold_in_options(items: np.ndarray, params: dict | None) -> list[FoldIn]:
    """The mean, ALS's closed form at the model's own ALS settings when they are known, and
    a small grid of confidences and (relative) regularisations."""
    scale = float(np.mean(np.einsum("ij,ij->j", items, items)))
    options = [FoldIn("mean")] + [FoldIn("als", alpha, ridge * scale)
                                  for alpha in ALPHAS for ridge in RIDGES]
    params = params or {}
    if "alpha" in params and "regularization" in params:
        options.append(FoldIn("als", float(params["alpha"]), float(params["regularization"])))
    return options


def choose_fold_in(users: np.ndarray, items: np.ndarray, seen: sp.csr_matrix, retriever,
                   params: dict | None = None, seed: int = 0) -> FoldIn:
    """The fold-in that best reproduces existing users' top-20 lists (their trained vectors
    vs vectors folded in from their training items), on a sample of users."""
    rng = np.random.default_rng(seed)
    active = np.flatnonzero(np.diff(seen.indptr) >= 2)
    sample = np.sort(rng.choice(active, min(SAMPLE_USERS, len(active)), replace=False))
    if len(sample) == 0:
        return FoldIn()
    truth = retriever.search(users, 20, seen, sample)[0]
    options = fold_in_options(items, params)
    for option in options:
        folded = option.vectors(seen[sample], items)
        top = retriever.search(folded, 20, seen[sample])[0]
        option.reproduction_overlap = float(np.mean(
            [len(set(a[a >= 0]) & set(b[b >= 0])) / 20 for a, b in zip(truth, top)]))
    return max(options, key=lambda o: o.reproduction_overlap)


def neighbour_mean(interactions: sp.csr_matrix, vectors: np.ndarray) -> np.ndarray:
    """Per row, the mean of the vectors of its columns (zero for a row without any)."""
    binary = (interactions > 0).astype(np.float32)
    counts = np.maximum(np.asarray(binary.sum(axis=1)).ravel(), 1)
    return np.asarray(binary @ vectors, dtype=np.float32) / counts[:, None]


def grown_by_neighbours(users: np.ndarray, items: np.ndarray, interactions: sp.csr_matrix
                        ) -> tuple[np.ndarray, np.ndarray]:
    """`users` and `items` grown to the rows of `interactions` (new rows appended): a new
    item starts as the mean of its trained users' vectors, then a new user as the mean of its
    items' (new ones included), then an item that only new users had as the mean of theirs."""
    n_users, n_items = interactions.shape
    grown_users = np.zeros((n_users, users.shape[1]), np.float32)
    grown_items = np.zeros((n_items, items.shape[1]), np.float32)
    grown_users[:len(users)], grown_items[:len(items)] = users, items
    by_item = interactions.T.tocsr()
    new_items, new_users = np.arange(len(items), n_items), np.arange(len(users), n_users)
    grown_items[new_items] = neighbour_mean(by_item[new_items][:, :len(users)], users)
    grown_users[new_users] = neighbour_mean(interactions[new_users], grown_items)
    alone = new_items[~grown_items[new_items].any(axis=1)]
    grown_items[alone] = neighbour_mean(by_item[alone], grown_users)
    return grown_users, grown_items
