"""Recall@K / NDCG@K on hand-computed examples (RLMRec/EasyRec protocol)."""
import math

import numpy as np
import pytest
import scipy.sparse as sp

from evaluation import per_user_metrics, summarise, users_with_test_items


def csr(rows: list[list[int]], n_items: int = 60) -> sp.csr_matrix:
    dense = np.zeros((len(rows), n_items))
    for user, items in enumerate(rows):
        dense[user, items] = 1
    return sp.csr_matrix(dense)


def test_two_hits_out_of_two_test_items():
    test = csr([[1, 3]])
    top = np.array([[3, 5, 1, 7, 8]])
    frame = per_user_metrics(top, np.array([0]), test, ks=(2, 5))
    assert frame["recall@2"][0] == pytest.approx(0.5)
    assert frame["ndcg@2"][0] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert frame["recall@5"][0] == pytest.approx(1.0)
    # hits at ranks 1 and 3; ideal has them at ranks 1 and 2
    ideal = 1 + 1 / math.log2(3)
    assert frame["ndcg@5"][0] == pytest.approx((1 + 1 / math.log2(4)) / ideal)


def test_fewer_test_items_than_k_uses_min_in_ideal_dcg():
    test = csr([[9]])
    top = np.array([[0, 1, 9, 2, 3]])
    frame = per_user_metrics(top, np.array([0]), test, ks=(5,))
    assert frame["recall@5"][0] == 1.0
    assert frame["ndcg@5"][0] == pytest.approx(1 / math.log2(4))


def test_recall_divides_by_all_test_items_not_by_k():
    test = csr([list(range(30))])
    top = np.arange(20)[None, :]
    frame = per_user_metrics(top, np.array([0]), test, ks=(20,))
    assert frame["recall@20"][0] == pytest.approx(20 / 30)
    assert frame["ndcg@20"][0] == pytest.approx(1.0)


def test_padding_never_counts_and_users_average():
    test = csr([[4], [5, 6], []])
    top = np.array([[-1, -1, 4], [5, -1, -1], [1, 2, 3]])
    users = users_with_test_items(test)
    assert users.tolist() == [0, 1]  # the user without test items is not averaged
    frame = per_user_metrics(top[users], users, test, ks=(1, 3))
    assert frame["recall@1"].tolist() == [0.0, 0.5]
    summary = summarise(frame, ks=(1, 3))
    assert summary["recall@3"] == pytest.approx((1.0 + 0.5) / 2)
    assert summary["ndcg@1"] == pytest.approx((0 + 1) / 2)


def test_tied_popularity_breaks_by_item_id_and_skips_train_items():
    from dataHandler import Dataset
    from model import Popularity

    # items 1 and 2 are tied (2 users each), item 0 has 1 user, item 3 has 3
    train = csr([[1, 3], [2, 3], [1, 2, 3], [0]], n_items=5)
    dataset = Dataset("t", train, train, train, [None] * 4, [None] * 5,
                      np.array(["none"] * 4, object), np.array(["none"] * 5, object))
    top, _ = Popularity().fit(dataset).recommend(np.array([0, 3]), 3)
    assert top.tolist() == [[2, 0, 4], [3, 1, 2]]
    test = csr([[2], [1]], n_items=5)
    frame = per_user_metrics(top, np.array([0, 1]), test, ks=(1, 3))
    assert frame["recall@1"].tolist() == [1.0, 0.0]
    assert frame["ndcg@3"][1] == pytest.approx(1 / math.log2(3))


def test_too_short_top_lists_are_rejected():
    with pytest.raises(ValueError, match="need 20"):
        per_user_metrics(np.zeros((1, 10), int), np.array([0]), csr([[1]]), ks=(20,))


def test_best_row_is_compared_with_the_best_classic_row_per_user():
    import pandas as pd

    from evaluation import describe_comparison, versus_best_classic

    frames = {"als": pd.DataFrame({"recall@20": [0.5, 0.5, 1.0, 0.0],
                                   "ndcg@20": [0.4, 0.4, 0.8, 0.0]}),
              "ease": pd.DataFrame({"recall@20": [0.0, 0.5, 0.5, 0.0],
                                    "ndcg@20": [0.0, 0.3, 0.3, 0.0]}),
              "popularity": pd.DataFrame({"recall@20": [1.0] * 4, "ndcg@20": [1.0] * 4}),
              "fused": pd.DataFrame({"recall@20": [1.0, 0.5, 1.0, 0.5],
                                     "ndcg@20": [0.8, 0.4, 0.8, 0.2]})}
    results = {name: {"status": "ok", "metrics": {m: float(f[m].mean()) for m in f}}
               for name, f in frames.items()}
    results["text"] = {"status": "unavailable"}
    results["als"]["best_val_recall@20"], results["ease"]["best_val_recall@20"] = 0.3, 0.2
    comparison = versus_best_classic(results, frames, ("als", "ease"), "fused")
    assert (comparison["best_classic"], comparison["best_row"]) == ("als", "fused")
    results["ease"]["best_val_recall@20"] = 0.4  # chosen on validation, not on test
    assert versus_best_classic(results, frames, ("als", "ease"), "fused")["best_classic"] == "ease"
    results["ease"]["best_val_recall@20"] = 0.2
    recall = comparison["recall@20"]
    assert recall["ratio"] == 1.5 and recall["lift"] == 0.25  # 0.75 / 0.5
    assert 0 <= recall["ci95_low"] <= 0.25 <= recall["ci95_high"] <= 0.5
    assert comparison["ndcg@20"]["ratio"] == 1.375  # 0.55 / 0.4
    assert versus_best_classic({"als": results["als"]}, frames, ("als",), "fused") is None
    zero = {n: pd.DataFrame({"recall@20": [0.0] * 4, "ndcg@20": [0.0] * 4}) for n in frames}
    flat = versus_best_classic(results, zero, ("als", "ease"), "fused")
    assert flat["recall@20"]["ratio"] is None and "n/a" in describe_comparison(flat)
    for name in results:  # no validation figure: the line says the classic row was picked on test
        results[name].pop("best_val_recall@20", None)
    untuned = versus_best_classic(results, frames, ("als", "ease"), "fused")
    assert "(chosen on test (no validation figure))" in describe_comparison(untuned)
    assert "chosen on validation" in describe_comparison(comparison)


def test_seed_summary_is_the_mean_and_std_over_runs(tmp_path):
    import json

    from evaluation import seed_summary

    dirs = []
    for seed, recall in ((1, 0.2), (2, 0.4)):
        folder = tmp_path / str(seed)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"run": {"seed": seed}}))
        (folder / "metrics.json").write_text(json.dumps({"variants": {
            "als": {"status": "ok", "metrics": {"recall@20": recall}},
            "text": {"status": "ok" if seed == 1 else "unavailable",
                     "metrics": {"recall@20": 0.1}}}}))
        dirs.append(folder)
    summary = seed_summary(dirs)
    assert summary["seeds"] == [1, 2] and list(summary["variants"]) == ["als"]
    als = summary["variants"]["als"]["recall@20"]
    assert als["mean"] == 0.3 and als["std"] == round(np.std([0.2, 0.4], ddof=1), 5)


def test_rows_contain_reads_stored_nonzero_entries_only():
    import scipy.sparse as sp

    from utils import rows_contain

    matrix = sp.csr_matrix(np.array([[0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]], np.float32))
    matrix.data[matrix.data == 2] = 0  # an explicit zero is stored but not contained
    items = np.array([[1, 3, -1, 0], [0, 1, 2, 3], [0, 0, 2, -1], [1, 1, 1, 1]])
    got = rows_contain(matrix, np.array([0, 1, 2, 0]), items)
    assert got.tolist() == [[True, False, False, False], [False] * 4,
                            [True, True, False, False], [True] * 4]
    assert rows_contain(matrix, np.array([1]), np.array([[0, 2]])).tolist() == [[False, False]]
