"""Cold-start protocols on top of a data set's own split (`--split`):

- `warm` (the default): the data's train / validation / test files as they are.
- `cold-items`: a seeded fraction of the items that have interactions is taken out of
  training entirely; every interaction of half of them joins the validation split, of the
  other half the test split (the warm items keep their own validation and test pairs).
  Models are then measured over the whole catalogue and over the held-out items alone.
- `cold-users`: a seeded fraction of the users who have a written profile and test items
  lose their training interactions; they are scored from their profile alone.

The chosen rows are recorded in `Dataset.protocol`; nothing is written to disk."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from dataHandler import Dataset, build_user_profiles
from evaluation import Evaluator, compare_metric
from model.config import SPLITS


def apply_split(dataset: Dataset, split: str, fraction: float, seed: int) -> Dataset:
    """The data set under protocol `split` (the same object for 'warm')."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' ({', '.join(SPLITS)})")
    if split != "warm" and not 0 < fraction < 1:
        raise ValueError(f"--cold-fraction must be between 0 and 1 (got {fraction})")
    if split == "cold-items":
        return cold_items_split(dataset, fraction, seed)
    if split == "cold-users":
        return cold_users_split(dataset, fraction, seed)
    return dataset


def _columns(matrix: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """`matrix` with every column outside the boolean mask `keep` emptied."""
    kept = (matrix @ sp.diags(keep.astype(matrix.dtype))).tocsr()
    kept.eliminate_zeros()
    return kept


def _rows(matrix: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    kept = (sp.diags(keep.astype(matrix.dtype)) @ matrix).tocsr()
    kept.eliminate_zeros()
    return kept


def cold_items_split(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    everything = (dataset.train + dataset.val + dataset.test).tocsr()
    with_pairs = np.flatnonzero(np.diff(everything.tocsc().indptr) > 0)
    n_cold = int(round(fraction * len(with_pairs)))
    if n_cold < 2:
        raise ValueError(f"{dataset.name}: --cold-fraction {fraction} of {len(with_pairs)} "
                         "items with interactions leaves fewer than 2 cold items")
    cold = np.random.default_rng(seed).choice(with_pairs, n_cold, replace=False)
    val_items, test_items = np.sort(cold[: n_cold // 2]), np.sort(cold[n_cold // 2:])
    is_cold = np.zeros(dataset.n_items, dtype=bool)
    is_cold[cold] = True
    in_val, in_test = np.zeros_like(is_cold), np.zeros_like(is_cold)
    in_val[val_items], in_test[test_items] = True, True
    train = _columns(dataset.train, ~is_cold)
    val = _columns(dataset.val, ~is_cold) + _columns(everything, in_val)
    test = _columns(dataset.test, ~is_cold) + _columns(everything, in_test)
    users, sources = _user_profiles_for(dataset, train, drop_written=True)
    return _replaced(dataset, train, val.tocsr(), test.tocsr(), users, sources, {
        "split": "cold-items", "cold_fraction": fraction, "seed": seed,
        "val_items": val_items.tolist(), "test_items": test_items.tolist(),
        "note": "written user profiles are not used in this split: they were written from "
                "the data's training pairs, which include pairs of the held-out items. Item "
                "profiles are kept: where they were written from reviews (yelp-text's were), "
                "a held-out item's text may summarise reviews of its own test pairs"})


def cold_users_split(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    has_test = np.diff(dataset.test.indptr) > 0
    eligible = np.flatnonzero((dataset.user_profile_source == "written") & has_test
                              & (np.diff(dataset.train.indptr) > 0))
    n_cold = int(round(fraction * len(eligible)))
    if n_cold < 1:
        raise ValueError(f"{dataset.name}: --split cold-users needs users with a written "
                         f"profile, training and test items ({len(eligible)} here)")
    cold = np.sort(np.random.default_rng(seed).choice(eligible, n_cold, replace=False))
    is_cold = np.zeros(dataset.n_users, dtype=bool)
    is_cold[cold] = True
    train = _rows(dataset.train, ~is_cold)
    users, sources = _user_profiles_for(dataset, train, drop_written=False)
    return _replaced(dataset, train, dataset.val, dataset.test, users, sources, {
        "split": "cold-users", "cold_fraction": fraction, "seed": seed,
        "users": cold.tolist(),
        "note": "these users' training interactions are withheld; their written profile "
                "(from the data's training pairs) is all a model sees of them. The withheld "
                "items are not excluded from their lists (no model knows them): recommended, "
                "they count as misses for every model"})


def _user_profiles_for(dataset: Dataset, train: sp.csr_matrix, drop_written: bool
                       ) -> tuple[list[str | None], np.ndarray]:
    """Profiles built from training items are rebuilt from the new training split (the old
    ones describe removed pairs); written ones are kept unless `drop_written`."""
    keep = dataset.user_profile_source == "written"
    if drop_written:
        keep = np.zeros_like(keep)
    built = build_user_profiles(train, dataset.item_profiles)
    profiles = [dataset.user_profiles[u] if keep[u] else built[u] for u in range(len(built))]
    sources = np.where(keep, "written", np.where([p is not None for p in built], "built",
                                                 "none"))
    return profiles, sources.astype(object)


def _replaced(dataset: Dataset, train, val, test, user_profiles, user_sources,
              protocol: dict) -> Dataset:
    if test.nnz == 0:
        raise ValueError(f"{dataset.name}: the {protocol['split']} split leaves no test pairs")
    return Dataset(name=dataset.name, train=train.tocsr(), val=val.tocsr(), test=test.tocsr(),
                   user_profiles=user_profiles, item_profiles=dataset.item_profiles,
                   user_profile_source=user_sources,
                   item_profile_source=dataset.item_profile_source,
                   user_ids=dataset.user_ids, item_ids=dataset.item_ids,
                   hygiene=dataset.hygiene, protocol=protocol)


def cold_item_rows(dataset: Dataset, part: str = "test") -> np.ndarray:
    """The held-out items of the cold-items protocol ('val' or 'test'); empty otherwise."""
    return np.asarray(dataset.protocol.get(f"{part}_items", []), dtype=np.int64)


def cold_user_rows(dataset: Dataset) -> np.ndarray:
    return np.asarray(dataset.protocol.get("users", []), dtype=np.int64)


def cold_evaluator(dataset: Dataset, test: Evaluator) -> Evaluator | None:
    """The cold-start part of the test evaluation: ranking among the held-out items only
    (cold-items), or the held-out users (cold-users); None on the warm split."""
    split = dataset.protocol.get("split")
    if split == "cold-items":
        return Evaluator.among_items(dataset.test, dataset.train, cold_item_rows(dataset),
                                     test.ks)
    if split == "cold-users":
        return test.restricted(np.intersect1d(cold_user_rows(dataset), test.users))
    return None


CONTENT_BASELINE = "tfidf"


def cold_start_report(dataset: Dataset, results: dict[str, dict], per_user: dict,
                      ks: tuple[int, ...], seed: int) -> str:
    """The cold-start table (Markdown): each row's metrics on the held-out items or users,
    and its ratio to the TF-IDF baseline with the paired 95% bootstrap CI of the difference
    (also stored in `results[row]['cold']['vs_tfidf']`)."""
    protocol = dataset.protocol
    if protocol["split"] == "cold-items":
        scope = (f"{len(protocol['test_items']):,} held-out test items, ranked among "
                 "themselves (training items excluded)")
    else:
        scope = f"{len(protocol['users']):,} held-out users, full ranking over all items"
    columns = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
    header = ["variant", *(c.replace("recall", "R").replace("ndcg", "N") for c in columns),
              f"R@20 vs {CONTENT_BASELINE}", f"N@20 vs {CONTENT_BASELINE}"]
    lines = [f"Cold start ({protocol['split']}): {scope}. Note: {protocol['note']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baseline = per_user.get(f"{CONTENT_BASELINE} (cold)")
    for variant, result in results.items():
        cold = result.get("cold")
        if cold is None:
            continue
        if cold["status"] != "ok":
            lines.append(f"| {variant} | unavailable: {cold['reason']} |"
                         + " |" * (len(header) - 2))
            continue
        cells = [f"{cold['metrics'][c]:.4f}" for c in columns]
        if baseline is not None and variant != CONTENT_BASELINE and "recall@20" in columns:
            frame = per_user[f"{variant} (cold)"]
            cold["vs_tfidf"] = {m: compare_metric(baseline[m].to_numpy(), frame[m].to_numpy(),
                                                  seed) for m in ("recall@20", "ndcg@20")}
            cells += [_ratio_cell(cold["vs_tfidf"][m]) for m in ("recall@20", "ndcg@20")]
        else:
            cells += ["", ""]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if protocol["split"] == "cold-items" and max(ks) >= len(protocol["test_items"]):
        lines += ["", f"K = {max(ks)} covers all {len(protocol['test_items'])} held-out items: "
                  "Recall@K is 1 there for every model that can place them all."]
    return "\n".join(lines)


def _ratio_cell(compared: dict) -> str:
    ratio = f"{compared['b'] / compared['a']:.2f}x" if compared["a"] else "n/a"
    return f"{ratio} [{compared['ci95_low']:+.4f}, {compared['ci95_high']:+.4f}]"
