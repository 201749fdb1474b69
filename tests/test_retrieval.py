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


def _clustered(rows: int, dim: int, rng, centres) -> np.ndarray:
    return (centres[rng.integers(len(centres), size=rows)]
            + 0.3 * rng.normal(size=(rows, dim))).astype(np.float32)


def test_ivf_is_used_only_where_it_keeps_the_exact_top_20():
    from model.retrieval import calibrated_retriever

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(64, 8))
    items, users = _clustered(40000, 8, rng, centres), _clustered(1000, 8, rng, centres)
    seen = sp.random(1000, 40000, density=1e-3, format="csr", random_state=4)
    sample = np.arange(1000)
    kept, report = calibrated_retriever(items, None, users, seen, sample, "ivf", width=4)
    assert kept.kind == "ivf" and report["type"] == "IndexIVFFlat"
    assert report["overlap@20_by_width"][report["width"]] >= report["target"]
    exact = FaissRetriever("flat").fit(items).search(users, 20, seen, sample)[0]
    found = kept.search(users, 20, seen, sample)[0]
    overlap = np.mean([len(np.intersect1d(f, e)) / 20 for f, e in zip(found, exact)])
    assert overlap == pytest.approx(report["overlap@20_by_width"][report["width"]], abs=1e-4)
    refused, why = calibrated_retriever(items, None, users, seen, sample, "ivf", 4, target=1.01)
    assert refused.kind == "flat" and why["type"] == "IndexFlatIP"
    assert max(why["overlap@20_by_width"]) <= why["width_limit"]


def test_an_hnsw_index_keeps_its_search_width_through_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 8)).astype(np.float32)
    saved = FaissRetriever("hnsw", ef_search=48).fit(items)
    saved.set_search_width(96)
    saved.save(tmp_path / "items.faiss")
    loaded = FaissRetriever.load(tmp_path / "items.faiss")
    assert loaded.kind == "hnsw" and loaded.search_width() == 96


def test_a_run_with_an_approximate_index_checks_it_on_validation(tmp_path):
    import json

    from click.testing import CliRunner

    from main import cli

    result = CliRunner().invoke(cli, ["run", "--model", "als", "--index", "hnsw",
                                      "--no-tune-baselines", "--runs-dir", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads(next(tmp_path.glob("demo/*/metrics.json")).read_text())
    report = metrics["variants"]["als"]["index"]
    kept = report["type"] == "IndexHNSWFlat"
    best = max(report["overlap@20_by_width"].values())
    assert kept == (best >= report["target"])  # kept only where it holds the exact top 20
