"""The content baseline a practitioner tries first: TF-IDF over the same profiles the text
encoder reads (scikit-learn), scored by the inner product of L2-normalised sparse vectors."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

from evaluation import profile_or_item_mean
from model.base import Recommender, Unavailable, register
from model.config import USER_TEXT_CHOICES, USER_TEXT_SOURCES


@register
class TfidfRecall(Recommender):
    """TF-IDF recall. Item vectors: the TF-IDF of their profiles (vocabulary and IDF from the
    item profiles; items without text cannot be recommended). User vectors: their profile's
    TF-IDF, or the normalised mean of their training items' vectors, chosen per profile source
    on validation as in `TextRecall` (`user_text`)."""

    places_cold_start = True
    _name = "tfidf"

    def __init__(self, user_text: str = "auto", min_df: int = 2,
                 max_features: int = 100_000) -> None:
        super().__init__()
        if user_text not in USER_TEXT_CHOICES:
            raise ValueError(f"user_text must be one of {', '.join(USER_TEXT_CHOICES)}")
        self.user_text, self.min_df, self.max_features = user_text, min_df, max_features
        self.item_matrix: sp.csr_matrix | None = None
        self.user_matrix: sp.csr_matrix | None = None
        self.vectorizer: TfidfVectorizer | None = None

    def params(self) -> dict[str, Any]:
        return {"user_text": self.user_text, "min_df": self.min_df,
                "max_features": self.max_features}

    def fit(self, dataset) -> "TfidfRecall":
        start = time.perf_counter()
        item_rows = [i for i, p in enumerate(dataset.item_profiles) if p is not None]
        if not item_rows:
            raise Unavailable("no item profiles in this data")
        self.vectorizer = TfidfVectorizer(min_df=min(self.min_df, len(item_rows)),
                                          max_features=self.max_features, sublinear_tf=True,
                                          dtype=np.float32)
        texts = self.vectorizer.fit_transform([dataset.item_profiles[i] for i in item_rows])
        self.item_matrix = _place_rows(texts, item_rows, dataset.n_items)
        self.item_mask = np.zeros(dataset.n_items, dtype=bool)
        self.item_mask[item_rows] = True
        self._fitted_on(dataset)
        self.user_matrix = normalize(self.seen @ self.item_matrix).astype(np.float32).tocsr()
        self.user_kind = np.where(np.diff(self.user_matrix.indptr) > 0, "item-mean", "none")
        self.user_text_choice = {}
        for source in USER_TEXT_SOURCES[self.user_text]:
            if not (dataset.user_profile_source == source).any():
                continue
            self._use_profiles(dataset, source)
        self.user_mask = self.user_kind != "none"
        self.training_log = {"vocabulary": len(self.vectorizer.vocabulary_),
                             "fit_seconds": round(time.perf_counter() - start, 2),
                             "user_text_choice_on_validation": self.user_text_choice}
        return self

    def _use_profiles(self, dataset, source: str) -> None:
        """Profiles of one source replace the item-mean where validation says so ('auto');
        users without training items always get theirs, and a profile with no known word is
        never used."""
        rows = np.flatnonzero(dataset.user_profile_source == source)
        profiles = self.vectorizer.transform([dataset.user_profiles[u] for u in rows])
        rows, profiles = rows[profiles.getnnz(1) > 0], profiles[profiles.getnnz(1) > 0]
        use = np.ones(len(rows), dtype=bool)
        if self.user_text == "auto":
            choice = profile_or_item_mean(
                dataset, f"tfidf users ({source} profiles)", rows[self.user_kind[rows] != "none"],
                self._lists_with(_replace_rows(self.user_matrix, rows, profiles)),
                self._lists_with(self.user_matrix))
            if choice is not None:
                self.user_text_choice[source] = choice
                if choice["chosen"] == "item-mean":
                    use = self.user_kind[rows] == "none"  # their profile is all they have
        self.user_matrix = _replace_rows(self.user_matrix, rows[use], profiles[use])
        self.user_kind[rows[use]] = source

    def _lists_with(self, user_matrix: sp.csr_matrix):
        """The ranked lists of a split's users if `user_matrix` held the user vectors."""
        def lists(split) -> np.ndarray:
            kept, self.user_matrix = self.user_matrix, user_matrix
            try:
                return split.top_of(self, 20)
            finally:
                self.user_matrix = kept
        return lists

    def score(self, users: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return (self.user_matrix[users] @ self.item_matrix.T).toarray()

    def similar_items(self, item_ids, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        items = np.atleast_1d(np.asarray(item_ids, dtype=np.int64))
        self._check_rows(items, self.n_items, "item")
        block = (self.item_matrix[items] @ self.item_matrix.T).toarray()
        block[np.arange(len(items)), items] = -np.inf
        block[:, ~self.item_mask] = -np.inf
        order = np.argsort(-block, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(block, order, 1)

    def similar_users(self, user_ids, k: int = 20):
        raise NotImplementedError("tfidf has sparse user vectors; look-alikes are not offered")

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"user_kind": self.user_kind.astype(str)}
        for name, matrix in (("items", self.item_matrix), ("users", self.user_matrix)):
            arrays.update({f"{name}_data": matrix.data, f"{name}_indices": matrix.indices,
                           f"{name}_indptr": matrix.indptr,
                           f"{name}_shape": np.array(matrix.shape)})
        return arrays

    def _restore(self, state: dict, arrays: dict[str, np.ndarray], folder) -> None:
        self.user_kind = arrays["user_kind"]
        self.item_matrix, self.user_matrix = (
            sp.csr_matrix((arrays[f"{n}_data"], arrays[f"{n}_indices"], arrays[f"{n}_indptr"]),
                          shape=tuple(arrays[f"{n}_shape"])) for n in ("items", "users"))


def _place_rows(rows_matrix: sp.csr_matrix, rows: list[int], n_rows: int) -> sp.csr_matrix:
    """A CSR matrix of `n_rows` rows holding rows_matrix[j] at row rows[j], zeros elsewhere."""
    placement = sp.csr_matrix((np.ones(len(rows), dtype=np.float32),
                               (np.asarray(rows), np.arange(len(rows)))),
                              shape=(n_rows, rows_matrix.shape[0]))
    return (placement @ rows_matrix).tocsr()


def _replace_rows(matrix: sp.csr_matrix, rows: np.ndarray, values: sp.csr_matrix) -> sp.csr_matrix:
    """A copy of `matrix` with rows[j] set to values[j]."""
    out = matrix.tolil()
    if len(rows):
        out[rows] = values
    return out.tocsr()
