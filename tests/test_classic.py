"""Classic recommenders: closed forms checked by hand / numpy, save-load round trips, and the
ALS fold-in."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import write_easyrec
from dataHandler import load_dataset
from model.base import ModelError, Recommender
from model.classic import ALS, EASE, ItemKNN, Popularity, RP3beta

# 3 users x 3 items: user 0 has items 0 and 1, user 1 items 0 and 2, user 2 item 1 only
TINY = np.array([[1, 1, 0], [3, 0, 1], [0, 2, 0]], dtype=np.float32)


def as_dataset(train: np.ndarray) -> SimpleNamespace:
    matrix = sp.csr_matrix(train)
    return SimpleNamespace(train=matrix, val=matrix, test=matrix,
                           n_users=matrix.shape[0], n_items=matrix.shape[1])


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """60 users x 40 items in 4 taste clusters (users mostly pick their cluster's items),
    with counts, as an EasyRec folder read by the real loader."""
    rng = np.random.default_rng(7)
    n_users, n_items = 60, 40
    user_cluster, item_cluster = rng.integers(4, size=n_users), np.arange(n_items) % 4
    like = np.where(user_cluster[:, None] == item_cluster[None, :], 0.45, 0.04)
    hits = rng.random((n_users, n_items)) < like
    hits[np.arange(n_users), rng.integers(n_items, size=n_users)] = True  # nobody is empty
    counts = hits * rng.integers(1, 4, size=hits.shape)
    split = rng.random(hits.shape)
    train = np.where(split < 0.7, counts, 0)
    train[np.arange(n_users), np.argmax(counts, axis=1)] = counts.max(axis=1)
    val = np.where((split >= 0.7) & (split < 0.85) & (train == 0), counts, 0)
    test = np.where((split >= 0.85) & (train == 0), counts, 0)
    folder = write_easyrec(tmp_path_factory.mktemp("clustered"), train, val, test)
    return load_dataset(folder, "clustered")


def test_ease_matches_the_closed_form():
    l2 = 2.0
    model = EASE(l2=l2).fit(as_dataset(TINY))
    x = (TINY > 0).astype(np.float64)
    inverse = np.linalg.inv(x.T @ x + l2 * np.eye(3))
    expected = np.eye(3) - inverse / np.diag(inverse)[None, :]
    np.testing.assert_allclose(model.weights, expected, atol=1e-6)
    assert np.all(np.diag(model.weights) == 0)
    np.testing.assert_allclose(model.score(np.arange(3)), x @ expected, atol=1e-6)


def test_rp3beta_score_by_hand():
    model = RP3beta(alpha=0.5, beta=0.5, top_k=10).fit(as_dataset(TINY))
    # user 2 reaches item 0 only via item 1 -> user 0 -> item 0:
    # P_iu(1->0) = 1/2 (item 1 has users 0, 2), P_ui(0->0) = 1/2 (user 0 has items 0, 1);
    # each to the power 0.5, then divided by popularity(item 0) ** 0.5 = 2 ** 0.5
    expected = (0.5 ** 0.5) * (0.5 ** 0.5) / 2 ** 0.5
    assert model.score(np.array([2]))[0, 0] == pytest.approx(expected, rel=1e-5)
    assert model.weights[1, 2] == 0  # no walk from item 1 to item 2
    assert np.all(model.weights.diagonal() == 0)


def test_item_knn_score_by_hand():
    model = ItemKNN(top_k=10, shrink=1.0).fit(as_dataset(TINY))
    # items 0 (users 0, 1) and 1 (users 0, 2): one common user, norms sqrt(2) each
    expected = 1.0 / (np.sqrt(2) * np.sqrt(2) + 1.0)
    assert model.score(np.array([2]))[0, 0] == pytest.approx(expected, rel=1e-5)
    assert model.weights[0, 1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make", [lambda k: RP3beta(alpha=0.7, beta=0.3, top_k=k),
                                  lambda k: ItemKNN(top_k=k, shrink=2.0)])
def test_top_k_keeps_the_largest_weights_per_row(clustered, make):
    full = make(1000).fit(clustered).weights.toarray()
    pruned = make(3).fit(clustered).weights
    assert np.diff(pruned.indptr).max() <= 3
    assert np.diff(pruned.indptr).min() == 3  # every item has > 3 neighbours here
    for row in range(clustered.n_items):
        kept = pruned[row].toarray().ravel()
        np.testing.assert_allclose(kept[kept != 0], full[row, kept != 0], rtol=1e-6)
        assert kept[kept != 0].min() >= np.sort(full[row])[-3] - 1e-7


MODELS = {
    "popularity": lambda: Popularity(),
    "als": lambda: ALS(factors=8, regularization=1.0, alpha=5.0, iterations=10),
    "ease": lambda: EASE(l2=10.0),
    "rp3beta": lambda: RP3beta(alpha=0.8, beta=0.2, top_k=10),
    "itemknn": lambda: ItemKNN(top_k=10, shrink=5.0),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip_and_seen_items_excluded(clustered, tmp_path, name):
    model = MODELS[name]().fit(clustered)
    users = np.arange(clustered.n_users)
    items, scores = model.recommend(users, k=10)
    assert items.shape == scores.shape == (len(users), 10)
    assert not np.any((clustered.train[users[:, None], np.maximum(items, 0)].toarray() > 0)
                      & (items >= 0))
    assert np.all(np.diff(scores, axis=1) <= 0)
    loaded = Recommender.load(model.save(tmp_path / name))
    assert type(loaded) is type(model) and loaded.params() == model.params()
    loaded_items, loaded_scores = loaded.recommend(users, k=10)
    np.testing.assert_array_equal(loaded_items, items)
    np.testing.assert_array_equal(loaded_scores, scores)
    if name != "popularity":
        np.testing.assert_array_equal(loaded.similar_items([0, 5], 4)[0],
                                      model.similar_items([0, 5], 4)[0])


@pytest.mark.parametrize("name", ["ease", "rp3beta", "itemknn"])
def test_similar_items_from_item_weights(clustered, name):
    model = MODELS[name]().fit(clustered)
    items, scores = model.similar_items([0, 7], k=5)
    assert items.shape == scores.shape == (2, 5)
    assert 0 not in items[0] and 7 not in items[1]
    dense = model.weights.toarray() if sp.issparse(model.weights) else model.weights
    assert scores[0, 0] == pytest.approx(np.delete(dense[0], 0).max())
    assert items[0, 0] == np.argmax(np.where(np.arange(clustered.n_items) == 0, -np.inf,
                                             dense[0]))
    with pytest.raises(NotImplementedError, match="score-only"):
        model.similar_users([0])


def test_sparse_similar_items_are_padded():
    model = ItemKNN(top_k=1).fit(as_dataset(TINY))
    items, scores = model.similar_items([2], k=3)
    assert items[0, 0] == 0 and list(items[0, 1:]) == [-1, -1]
    assert np.all(np.isinf(scores[0, 1:]))


def test_als_is_implicit_with_binary_confidence(clustered):
    from implicit.cpu.als import AlternatingLeastSquares

    model = ALS(factors=8, regularization=1.0, alpha=5.0, iterations=5, seed=3).fit(clustered)
    reference = AlternatingLeastSquares(factors=8, regularization=1.0, alpha=5.0, iterations=5,
                                        random_state=3)
    reference.fit((clustered.train > 0).astype(np.float32).tocsr(), show_progress=False)
    np.testing.assert_allclose(model.item_vectors, reference.item_factors, rtol=1e-4,
                               atol=1e-5)
    counts = ALS(factors=8, regularization=1.0, alpha=5.0, iterations=5, seed=3,
                 binary=False).fit(clustered)
    assert not np.allclose(counts.item_vectors, model.item_vectors)


def test_als_fold_in_recovers_the_fitted_user_vectors(clustered):
    model = ALS(factors=8, regularization=1.0, alpha=5.0, iterations=20).fit(clustered)
    folded = model.fold_in_users(clustered.train)
    fitted = model.user_vectors
    cosine = (folded * fitted).sum(1) / (np.linalg.norm(folded, axis=1)
                                         * np.linalg.norm(fitted, axis=1))
    assert cosine.min() > 0.9
    new_user = model.fold_in_users(clustered.train[[4]] * 2)  # counts ignored when binary
    np.testing.assert_allclose(new_user[0], folded[4], rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="item columns"):
        model.fold_in_users(sp.csr_matrix((1, clustered.n_items + 1)))


def test_a_tuning_budget_stops_the_search_after_the_first_setting():
    from coreMethod import coordinate_search

    calls = []

    def score(params):
        calls.append(params)
        return -abs(params["x"] - 3)
    best, value, table = coordinate_search({"x": [1, 2, 3, 4]}, score, {"x": 1},
                                           budget_seconds=0.0)
    assert calls == [{"x": 1}] and best == {"x": 1} and len(table) == 1
    best, _, _ = coordinate_search({"x": [1, 2, 3, 4]}, score, {"x": 1})
    assert best == {"x": 3}


def test_the_search_grows_a_grid_past_an_edge_while_that_improves():
    from coreMethod import beyond_edge, coordinate_search

    def score(params):  # best at factors 512 (past the grid), shrink 0 (its lower edge)
        return -abs(params["factors"] - 512) - params["shrink"]
    best, _, table = coordinate_search({"factors": [64, 128, 256], "shrink": [0.0, 10.0]},
                                       score, {"factors": 64, "shrink": 10.0})
    assert best == {"factors": 512, "shrink": 0.0}
    assert sorted({row["factors"] for row in table}) == [64, 128, 256, 512, 1024]
    assert min(row["shrink"] for row in table) == 0.0  # never below a non-negative grid
    best, _, table = coordinate_search({"factors": [64, 128, 256]},
                                       lambda p: p["factors"], {"factors": 64}, extend=1)
    assert best == {"factors": 512} and len(table) == 4
    def small_gain(params):  # 512 is a little better, but not by enough to leave the grid
        return 1.0 + 0.001 * (params["factors"] >= 256) + 0.001 * (params["factors"] >= 512) \
            + 0.01 * (params["shrink"] == 5.0)
    best, _, table = coordinate_search({"factors": [64, 128, 256], "shrink": [5.0, 10.0]},
                                       small_gain, {"factors": 64, "shrink": 10.0})
    assert best == {"factors": 256, "shrink": 5.0}  # 512 not taken in the second round either
    assert {row["factors"] for row in table} == {64, 128, 256, 512}
    assert beyond_edge([0.3, 0.5, 1.0], 1.0) == 2.0 and beyond_edge([10.0, 30.0], 10.0) == 3.333333
    assert beyond_edge([-2.0, 0.0, 2.0], -2.0) == -4.0 and beyond_edge(["a", "b"], "b") is None
    assert beyond_edge([15, 25], 15) == 9 and beyond_edge([1, 2, 3], 2) is None
    assert beyond_edge([True, False], True) is None


def test_a_tuned_model_is_fitted_at_the_setting_it_reports(monkeypatch):
    from types import SimpleNamespace

    import model.tuning as tuning

    class Sized:
        def __init__(self, size):
            self.size = size

        def fit(self, dataset):
            return self

    class Validation:  # 512 (past the grid) scores highest, by less than the search needs
        def top_of(self, model, k):
            return model

        def mean(self, model, metric, k):
            return 0.3 + 0.001 * (model.size >= 256) + 0.001 * (model.size >= 512)

    monkeypatch.setitem(tuning.GRIDS, "als", (Sized, {"size": [64, 128, 256]}, {"size": 64}))
    monkeypatch.setattr(tuning.Evaluator, "on_validation",
                        staticmethod(lambda *args, **kwargs: Validation()))
    monkeypatch.setattr(tuning, "require_validation", lambda validation: None)
    model = tuning.tuned("als", SimpleNamespace(n_items=10))
    assert model.training_log["chosen_on_validation"] == {"size": 256} and model.size == 256
    assert model.training_log["settings_tried"] == 4  # 512 was tried, and not taken


def test_tfidf_recommends_the_item_whose_text_matches_the_users_items():
    from model import TfidfRecall
    from test_probed_defects import topic_data

    data = topic_data("Loves {} every week")
    model = TfidfRecall(min_df=1).fit(data)
    item_topic = np.arange(data.n_items) % 4
    top = model.recommend(np.arange(data.n_users), 4)[0]
    own_topic = item_topic[data.train[np.arange(data.n_users)].toarray().argmax(1)]
    assert (item_topic[top] == own_topic[:, None]).all()  # every pick from the user's topic
    assert model.training_log["user_text_choice_on_validation"]["written"]["chosen"] == "profile"
    tasteless = TfidfRecall(min_df=1).fit(topic_data("A 24-year-old technician"))
    assert set(tasteless.user_kind[:20]) == {"item-mean"}
