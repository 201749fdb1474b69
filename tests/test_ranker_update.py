"""The ranker's part of a daily update: features grown to the new rows without touching the
trained ones, and one warm-started epoch kept only when validation agrees."""
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

from main import cli
from model.bundle import Bundle
from model.ranker_update import grown_features, warm_epoch
from model.ranking import WideDeepRanker
from model.ranking_features import RankingFeatures


def _features(n_users: int = 120, n_items: int = 90, seed: int = 0):
    rng = np.random.default_rng(seed)
    train = sp.random(n_users, n_items, density=0.1, format="csr", random_state=seed)
    signals = {"als": (rng.normal(size=(n_users, 8)), rng.normal(size=(n_items, 8))),
               "text": (rng.normal(size=(n_users, 6)), rng.normal(size=(n_items, 6)))}
    item_item = {"ease": sp.random(n_items, n_items, density=0.05, format="csr",
                                   random_state=seed + 1)}
    return train, RankingFeatures(train, signals, "als", item_item=item_item)


def test_grown_features_keep_trained_rows_and_fold_new_ones_in():
    train, features = _features()
    seen = sp.lil_matrix((122, 91), dtype=np.float32)
    seen[:120, :90] = train > 0
    seen[120, [3, 7]] = 1  # a new user with two known items
    seen[[5, 9, 120], 90] = 1  # a new item: two known users and the new one
    seen = seen.tocsr()
    primary = (np.ones((122, 8)), np.ones((91, 8)))
    grown = grown_features(features, seen, primary)
    users, items = grown.channels()["text"]
    trained_users, trained_items = features.channels()["text"]
    np.testing.assert_allclose(users[:120], trained_users, rtol=1e-6)
    np.testing.assert_allclose(items[:90], trained_items, rtol=1e-6)
    np.testing.assert_allclose(items[90], trained_users[[5, 9]].mean(0), rtol=1e-5)
    np.testing.assert_allclose(users[120], items[[3, 7, 90]].mean(0), rtol=1e-5)
    np.testing.assert_allclose(grown.channels()["als"][0], primary[0], rtol=1e-6)
    assert (grown.history != (seen > 0)).nnz == 0
    assert grown.item_item["ease"].shape == (91, 91) and grown.item_item["ease"][:, 90].nnz == 0
    assert np.array_equal(grown.user_segment[:120], features.user_segment)
    assert 0 <= grown.user_segment[120] < features.n_segments
    unchanged = np.flatnonzero(np.diff(seen.indptr)[:120] == np.diff(train.indptr))
    assert np.array_equal(grown.activity_bucket[unchanged], features.activity_bucket[unchanged])


@pytest.fixture(scope="module")
def ranked_bundle(tmp_path_factory) -> Bundle:
    root = tmp_path_factory.mktemp("ranked-update")
    runner = CliRunner()
    output = runner.invoke(cli, ["run", "--dataset", "demo", "--model", "als", "--rank",
                                 "widedeep", "--rank-on", "als", "--rank-epochs", "1",
                                 "--data-root", str(root / "data"), "--runs-dir",
                                 str(root / "runs")], catch_exceptions=False).output
    run = [line for line in output.splitlines() if line.startswith("run written to ")][-1][15:]
    result = runner.invoke(cli, ["export", "--run", run, "--variant", "als", "--out",
                                 str(root / "bundle")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Bundle(Path(root / "bundle"))


def _day(bundle: Bundle, seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(the parent's interactions, a day of new pairs: known users', two new users' and two
    new items') in the day's row space (two more user rows and two more item rows)."""
    rng = np.random.default_rng(seed)
    before = bundle.seen.tocsr().copy()
    n_users, n_items = before.shape
    before.resize((n_users + 2, n_items + 2))
    users = np.concatenate([rng.integers(0, n_users, 400), [n_users] * 3, [n_users + 1] * 2,
                            rng.integers(0, n_users, 10)])
    items = np.concatenate([rng.integers(0, n_items, 400), [1, 2, n_items], [3, n_items + 1],
                            rng.choice([n_items, n_items + 1], 10)])
    added = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=before.shape)
    added = ((added > 0).astype(np.float32) - before.multiply(added > 0)).tocsr()
    added.eliminate_zeros()
    return before, added


def _weights(net: torch.nn.Module) -> dict:
    return {k: v for k, v in net.state_dict().items() if not k.endswith("_vectors")}


def _same(one: list, two: list) -> list[bool]:
    return [all(torch.equal(a, b) for a, b in zip(_weights(x).values(), _weights(y).values()))
            for x, y in zip(one, two, strict=True)]


def test_the_epoch_moves_the_networks_and_validation_decides(ranked_bundle, tmp_path):
    ranker = ranked_bundle.ranker
    ranker.kept_recall_order = False  # the demo's one-epoch ranker kept the recall order
    before, added = _day(ranked_bundle)
    primary = grown_features(ranker.features, before + added, None).channels()["als"]
    updated, report = warm_epoch(ranker, before, added, primary, check=None)
    assert report["positives"] > 0 and report["epoch"].startswith("kept")
    assert not any(_same(updated.nets, ranker.nets))
    assert updated.nets[0].user_vectors.shape[0] == before.shape[0]  # grown rows
    new_users = np.array([before.shape[0] - 2, before.shape[0] - 1])
    lists = updated.recommend(new_users, before + added, 10)[0]
    assert (lists >= 0).all() and not (before + added)[new_users].multiply(
        sp.csr_matrix((np.ones(20), (np.repeat([0, 1], 10), lists.ravel())),
                      shape=(2, before.shape[1]))).nnz  # ranked, seen items excluded
    loaded = WideDeepRanker.load(updated.save(tmp_path / "ranker"), device="cpu")
    users = np.concatenate([np.arange(0, 50, 7), new_users])
    assert np.array_equal(loaded.recommend(users, before + added, 10)[0],
                          updated.recommend(users, before + added, 10)[0])

    rng = np.random.default_rng(1)  # held-out pairs of a sample of known users
    rows = np.sort(rng.choice(before.shape[0] - 2, 150, replace=False))
    held_out = sp.csr_matrix((np.ones(300, np.float32), (np.repeat(rows, 2),
                                                         rng.integers(0, before.shape[1] - 2,
                                                                      300))),
                             shape=before.shape)
    held_out = (held_out - held_out.multiply(before + added)).tocsr()
    held_out.eliminate_zeros()
    rows = np.flatnonzero(np.diff(held_out.indptr) > 0)
    checked, verdict = warm_epoch(ranker, before, added, primary, check=(rows, held_out))
    kept = verdict["val_ndcg_updated"] >= verdict["val_ndcg_trained"]
    assert verdict["epoch"] == ("kept" if kept else "dropped (validation NDCG@20 fell)")
    assert all(_same(checked.nets, ranker.nets)) != kept
