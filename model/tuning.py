"""Hyperparameters of the classic baselines chosen on the validation split (never the test
split), by coordinate ascent over a grid: the yardsticks are as strong as a practitioner
would make them, on any data set, with no per-dataset constants."""
from __future__ import annotations

import time
from typing import Callable

from coreMethod import coordinate_search
from evaluation import Evaluator
from model.base import Recommender, Unavailable, require_validation
from model.classic import ALS, EASE, ItemKNN, RP3beta
from utils import log

# (model class, grid, starting point); the grids bracket the values practitioners report
GRIDS: dict[str, tuple[Callable[..., Recommender], dict[str, list], dict]] = {
    "als": (ALS, {"factors": [64, 128, 256], "regularization": [10.0, 30.0, 100.0, 200.0, 400.0],
                  "alpha": [5.0, 10.0, 20.0, 40.0, 80.0], "iterations": [15, 25]},
            {"factors": 128, "regularization": 100.0, "alpha": 20.0, "iterations": 15}),
    "ease": (EASE, {"l2": [30.0, 100.0, 316.0, 1000.0, 3162.0]}, {"l2": 316.0}),
    "rp3beta": (RP3beta, {"alpha": [0.3, 0.5, 0.8, 1.0], "beta": [0.0, 0.1, 0.2, 0.3, 0.4],
                          "top_k": [100, 200, 500]},
                {"alpha": 0.5, "beta": 0.2, "top_k": 200}),
    "itemknn": (ItemKNN, {"shrink": [0.0, 10.0, 50.0, 200.0], "top_k": [50, 100, 200, 500]},
                {"shrink": 50.0, "top_k": 200}),
}
MAX_EASE_ITEMS = 40_000  # EASE inverts a dense items x items matrix


def tuned(name: str, dataset, fixed: dict | None = None, tune: bool = True,
          budget_seconds: float | None = None) -> Recommender:
    """The baseline `name` fitted with the hyperparameters that give the best validation
    Recall@20 (all validation users), or with the grid's starting point when `tune` is off.
    `fixed`: constructor arguments that are not tuned (e.g. a seed). `budget_seconds`: no new
    setting is tried after that long (the first one always is)."""
    make, grid, start = GRIDS[name]
    fixed = fixed or {}
    if name == "ease" and dataset.n_items > MAX_EASE_ITEMS:
        raise Unavailable(f"EASE needs a dense {dataset.n_items:,}^2 matrix; skipped above "
                          f"{MAX_EASE_ITEMS:,} items")
    validation = Evaluator.on_validation(dataset, (20,), max_users=None)
    if tune:
        require_validation(validation)
    started = time.perf_counter()

    kept: dict = {}

    def score(params: dict) -> float:
        model = make(**fixed, **params).fit(dataset)
        recall = validation.mean(validation.top_of(model, 20), "recall", 20)
        log(f"{name} {params}: val R@20 {recall:.4f}")
        if recall > kept.get("recall", -1.0):
            kept.update(recall=recall, model=model, params=params)
        return recall

    if tune:
        best, best_score, table = coordinate_search(grid, score, start,
                                                    budget_seconds=budget_seconds)
        # a setting past the grid's edge may score a little higher and still not be chosen
        # (its gain too small to count): the model is refitted at the chosen setting
        model = kept["model"] if kept["params"] == best else make(**fixed, **best).fit(dataset)
    else:
        best, best_score, table = start, float("nan"), []
        model = make(**fixed, **best).fit(dataset)
    model.training_log = {"chosen_on_validation": best, "best_val_recall@20": round(best_score, 5),
                          "settings_tried": len(table), "budget_seconds": budget_seconds,
                          "tuning_seconds": round(time.perf_counter() - started, 1),
                          "validation_table": table}
    return model
