"""FAISS retrieval against brute force, seen-item exclusion, and user fallbacks."""
import numpy as np
import pytest
import scipy.sparse as sp

from coreMethod import mean_of_items
from model import FaissRetriever


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(users, items, k, seen):
    scores = users @ items.T
    scores[seen.toarray() > 0] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_flat_search_matches_brute_force_with_seen_items_excluded():
    users, items = random_unit(50, 16, 0), random_unit(300, 16, 1)
    seen = sp.random(50, 300, density=0.05, format="csr", random_state=2)
    top, scores = FaissRetriever("flat").fit(items).search(users, 20, seen)
    assert np.array_equal(top, brute_force(users, items, 20, seen))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert not np.any(seen.toarray()[np.arange(50)[:, None], top] > 0)


def test_search_a_subset_of_users_and_an_item_subset():
    users, items = random_unit(10, 8, 3), random_unit(40, 8, 4)
    indexed = np.arange(0, 40, 2)  # odd items have no vector and are never returned
    seen = sp.csr_matrix((10, 40))
    top, _ = FaissRetriever("flat").fit(items, indexed).search(users, 5, seen, np.array([7, 2]))
    expected = indexed[brute_force(users[[7, 2]], items[indexed], 5, seen[[7, 2]][:, indexed])]
    assert np.array_equal(top, expected)


def test_short_lists_are_padded():
    items = random_unit(6, 4, 5)
    seen = sp.csr_matrix(np.array([[1, 1, 1, 1, 0, 0]]))
    top, scores = FaissRetriever("flat").fit(items).search(random_unit(1, 4, 6), 4, seen)
    assert sorted(top[0, :2]) == [4, 5] and top[0, 2:].tolist() == [-1, -1]
    assert np.isinf(scores[0, 2:]).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_exact_neighbours(kind):
    rng = np.random.default_rng(7)
    centres = random_unit(20, 32, 8)
    items = centres[rng.integers(20, size=2000)] + 0.1 * rng.normal(size=(2000, 32))
    items = (items / np.linalg.norm(items, axis=1, keepdims=True)).astype(np.float32)
    users = random_unit(100, 32, 9)
    seen = sp.csr_matrix((100, 2000))
    exact, _ = FaissRetriever("flat").fit(items).search(users, 10, seen)
    approx, _ = FaissRetriever(kind, nprobe=8).fit(items).search(users, 10, seen)
    overlap = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert overlap > 0.8


def test_index_round_trips_through_a_file(tmp_path):
    import faiss
    items = random_unit(30, 8, 10)
    retriever = FaissRetriever("flat").fit(items)
    retriever.save(tmp_path / "items.faiss")
    loaded = faiss.read_index(str(tmp_path / "items.faiss"))
    assert loaded.ntotal == 30
    assert np.allclose(loaded.reconstruct_n(0, 30), items)


def test_mean_of_items_ignores_counts_and_unusable_items():
    train = sp.csr_matrix(np.array([[3, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=np.float32))
    items = np.array([[1, 0], [0, 1], [5, 5]], dtype=np.float32)
    users = mean_of_items(train, items, np.array([True, True, False]))
    assert np.allclose(users[0], [np.sqrt(0.5), np.sqrt(0.5)])
    assert np.allclose(users[1], 0) and np.allclose(users[2], 0)
