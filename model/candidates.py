"""Multi-channel candidate generation for the ranking stage: every recall channel (a fused
model and each of its parts: ALS, LightGCN, text, ...; the score-only item-item models:
EASE, RP3beta, item-kNN) retrieves its own top list, the ranker sees their union, and each
channel's rank of every candidate is a feature."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from coreMethod import top_k_rows
from model.retrieval import FaissRetriever


class VectorChannel:
    """A channel scored by inner product: user vectors and a retriever over its items."""

    def __init__(self, user_vectors: np.ndarray, retriever: FaissRetriever) -> None:
        self.user_vectors, self.retriever = user_vectors, retriever

    def top(self, users: np.ndarray, depth: int, exclude: sp.csr_matrix | None) -> np.ndarray:
        """(len(users), depth) items, best first, -1 padded (a user without a vector: all)."""
        top = self.retriever.search(self.user_vectors, depth, exclude, users)[0]
        top[~self.user_vectors[users].any(axis=1)] = -1
        return top


class ItemItemChannel:
    """A score-only model's channel: a user's scores are their training history times the
    item x item weights (EASE, RP3beta, item-kNN), `block_floats` scores at a time. Items
    scored 0 or less are not retrieved (no path from the user's history)."""

    def __init__(self, history: sp.csr_matrix, weights: sp.csr_matrix,
                 block_floats: int = 1 << 24) -> None:
        self.history, self.weights, self.block_floats = history, weights, block_floats

    def top(self, users: np.ndarray, depth: int, exclude: sp.csr_matrix | None) -> np.ndarray:
        out = np.full((len(users), depth), -1, dtype=np.int64)
        for start, scores in score_blocks(self.history, self.weights, users, self.block_floats):
            scores[scores <= 0] = -np.inf
            if exclude is not None:
                seen = exclude[users[start:start + len(scores)]].tocoo()
                scores[seen.row, seen.col] = -np.inf
            out[start:start + len(scores)] = top_k_rows(scores, depth)[0]
        return out


def score_blocks(history: sp.csr_matrix, weights: sp.csr_matrix, users: np.ndarray,
                 block_floats: int):
    """(start, dense history[users[start:...]] @ weights): an item-item model's score rows
    of `users`, about `block_floats` scores per block."""
    step = max(1, block_floats // max(weights.shape[1], 1))
    for start in range(0, len(users), step):
        yield start, (history[users[start:start + step]] @ weights).toarray()


class ChannelCandidates:
    """For a set of users: each channel's top-`depth` list (training items excluded), the
    union of the first `widths[c]` items of channel c (channel 0's order first), and a
    lookup of where each channel ranks any (user, item) pair (`depth` when not in its list).

    channels: name -> a `VectorChannel` (`channel_retrievers` builds them once per model) or
    an `ItemItemChannel`.
    """

    def __init__(self, channels: dict[str, VectorChannel | ItemItemChannel],
                 users: np.ndarray, exclude: sp.csr_matrix | None, depth: int,
                 widths: list[int], n_items: int) -> None:
        self.users, self.depth = np.asarray(users), depth
        self.names = list(channels)
        lists = [channel.top(self.users, depth, exclude) for channel in channels.values()]
        self.candidates = union_of_lists([top[:, :width] for top, width in zip(lists, widths)])
        self._row_of_user = np.full(int(self.users.max(initial=-1)) + 1, -1, dtype=np.int64)
        self._row_of_user[self.users] = np.arange(len(self.users))
        self._n_items = n_items
        self._lookup = [self._sorted_keys(top) for top in lists]

    def _sorted_keys(self, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sorted row * n_items + item keys, the rank of each) of one channel's lists."""
        rows = np.repeat(np.arange(len(top), dtype=np.int64), top.shape[1])
        ranks = np.tile(np.arange(top.shape[1]), len(top))
        items = top.ravel()
        valid = items >= 0
        keys = rows[valid] * self._n_items + items[valid]
        order = np.argsort(keys, kind="stable")
        return keys[order], ranks[valid][order]

    def ranks(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(len(users), channels) int: the rank of items[r] in each channel's list for
        users[r] (users from this set), `depth` where absent or padding."""
        rows = self._row_of_user[users]
        keys = rows * self._n_items + np.maximum(items, 0)
        out = np.full((len(users), len(self._lookup)), self.depth, dtype=np.int64)
        for column, (sorted_keys, ranks) in enumerate(self._lookup):
            if len(sorted_keys) == 0:
                continue
            position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
            hit = (sorted_keys[position] == keys) & (items >= 0)
            out[hit, column] = ranks[position[hit]]
        return out


def channel_retrievers(channels: dict[str, tuple[np.ndarray, np.ndarray]],
                       kind: str = "flat", width: int = 128) -> dict[str, VectorChannel]:
    """A `VectorChannel` per (user vectors, item vectors): an inner-product retriever, exact
    or `kind` 'hnsw' / 'ivf' searched at `width` (ef_search / nprobe); an item with a zero
    vector in a channel (e.g. no text) is not retrievable from it."""
    return {name: VectorChannel(np.ascontiguousarray(users, dtype=np.float32),
                                FaissRetriever(kind, nprobe=width, ef_search=width,
                                               use_gpu=False).fit(
                                    items, np.flatnonzero(items.any(axis=1))))
            for name, (users, items) in channels.items()}


def union_of_lists(lists: list[np.ndarray]) -> np.ndarray:
    """Row-wise union of ranked lists (rows are users): the first list in its order, then
    what each later list adds, in its order; -1 pads rows to the widest union."""
    merged = np.concatenate(lists, axis=1)
    order = np.argsort(merged, axis=1, kind="stable")  # equal items: the earliest first
    in_order = np.take_along_axis(merged, order, 1)
    repeat_in_order = np.zeros(merged.shape, dtype=bool)
    repeat_in_order[:, 1:] = in_order[:, 1:] == in_order[:, :-1]
    dropped = np.zeros(merged.shape, dtype=bool)
    np.put_along_axis(dropped, order, repeat_in_order, 1)
    dropped |= merged < 0
    keep = np.argsort(dropped, axis=1, kind="stable")
    union = np.where(np.take_along_axis(dropped, keep, 1), -1, np.take_along_axis(merged, keep, 1))
    return union[:, :max(1, int((~dropped).sum(1).max(initial=0)))]


def pair_sums(history: sp.csr_matrix, weights: sp.csr_matrix, users: np.ndarray,
              items: np.ndarray, block_floats: int = 1 << 24) -> np.ndarray:
    """sum over j of history[users[r], j] * weights[j, items[r]] for every r (an item-item
    model's score of each pair; 0 for padding): each block of distinct users' score rows
    (history @ weights, a sparse product) at most `block_floats` floats at a time."""
    out = np.zeros(len(users), dtype=np.float32)
    distinct, row = np.unique(users, return_inverse=True)
    inside = np.flatnonzero((items >= 0) & (items < weights.shape[1]))
    by_row = inside[np.argsort(row[inside], kind="stable")]  # pairs grouped by user block
    for start, scores in score_blocks(history, weights, distinct, block_floats):
        lo, hi = np.searchsorted(row[by_row], [start, start + len(scores)])
        picked = by_row[lo:hi]
        out[picked] = scores[row[picked] - start, items[picked]]
    return out
