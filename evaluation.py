"""Recall@K and NDCG@K under the RLMRec/EasyRec protocol, per user and averaged; the one
`Evaluator` (split, exclusion mask, users) every stage, bundle and A/B report uses; the run
report (metrics.json, per-user metrics, report.md); and the A/B statistics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from model.engine import sharded_metrics
from model.retrieval import FaissRetriever
from utils import atomic_path, log, rows_contain, write_json_atomic, write_text_atomic

DEFAULT_KS = (5, 10, 20, 50)


def users_with_test_items(test: sp.csr_matrix) -> np.ndarray:
    """Users with at least one test item: the ones every metric averages over."""
    return np.flatnonzero(np.diff(test.indptr) > 0)


def per_user_metrics(top_items: np.ndarray, users: np.ndarray, test: sp.csr_matrix,
                     ks: tuple[int, ...] = DEFAULT_KS) -> pd.DataFrame:
    """One row per user: recall@K = hits in top K / number of test items; NDCG@K with binary
    relevance, ideal DCG over min(K, number of test items). `top_items` is ranked, -1 pads."""
    if top_items.shape[1] < max(ks):
        raise ValueError(f"top lists hold {top_items.shape[1]} items; need {max(ks)}")
    relevant = rows_contain(test, users, top_items[:, : max(ks)]).astype(np.float64)
    n_test = np.diff(test.indptr)[users].astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    ideal_cumulative = np.cumsum(discounts)
    frame = {"user": users, "n_test": n_test.astype(int)}
    for k in ks:
        hits = relevant[:, :k].sum(1)
        dcg = (relevant[:, :k] * discounts[:k]).sum(1)
        idcg = ideal_cumulative[np.minimum(k, n_test).astype(int) - 1]
        frame[f"recall@{k}"] = np.divide(hits, n_test, out=np.zeros_like(hits), where=n_test > 0)
        frame[f"ndcg@{k}"] = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=n_test > 0)
    return pd.DataFrame(frame)


def summarise(per_user: pd.DataFrame, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Means over the users in `per_user` (rounded for reports)."""
    columns = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
    return {c: round(float(per_user[c].mean()), 6) if len(per_user) else float("nan")
            for c in columns}


def segment_metrics(per_user: pd.DataFrame, labels: np.ndarray,
                    ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, dict]:
    """Metrics per user segment; `labels` is indexed by user id."""
    segments = labels[per_user["user"].to_numpy()]
    return {str(name): {"users": int((segments == name).sum()),
                        **summarise(per_user[segments == name], ks)}
            for name in sorted(set(segments))}


class Evaluator:
    """One split's evaluation under the full-ranking protocol: the users averaged over
    (those with at least one truth item, or a fixed sample of them), the truth matrix, and
    what is excluded from every list (the training items). With an `engine` (model.engine),
    retrieval and per-user metrics are sharded over its workers."""

    def __init__(self, truth: sp.csr_matrix, exclude: sp.csr_matrix,
                 ks: tuple[int, ...] = DEFAULT_KS, users: np.ndarray | None = None,
                 items: np.ndarray | None = None, engine=None) -> None:
        self.truth, self.exclude, self.ks = truth.tocsr(), exclude.tocsr(), tuple(ks)
        self.engine = engine
        self.users = users_with_test_items(self.truth) if users is None else np.asarray(users)
        self.items = None if items is None else np.asarray(items)  # the only items ranked

    @classmethod
    def on_test(cls, dataset, ks: tuple[int, ...] = DEFAULT_KS, engine=None) -> "Evaluator":
        return cls(dataset.test, dataset.train, ks, engine=engine)

    @classmethod
    def on_validation(cls, dataset, ks: tuple[int, ...] = (20,), max_users: int | None = 4000,
                      seed: int = 0) -> "Evaluator":
        """Validation users (a fixed sample of `max_users` of them, to keep early stopping
        cheap); never the test split."""
        users = users_with_test_items(dataset.val)
        if max_users is not None and len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
        return cls(dataset.val, dataset.train, ks, users)

    @classmethod
    def among_items(cls, truth: sp.csr_matrix, exclude: sp.csr_matrix, items: np.ndarray,
                    ks: tuple[int, ...] = DEFAULT_KS) -> "Evaluator":
        """Ranking among `items` only, their truth pairs only (the cold-item protocol)."""
        keep = np.zeros((1, truth.shape[1]), dtype=truth.dtype)
        keep[0, items] = 1
        cut = sp.csr_matrix(truth.multiply(keep))
        cut.eliminate_zeros()
        return cls(cut, exclude, ks, items=items)

    def restricted(self, users: np.ndarray) -> "Evaluator":
        return Evaluator(self.truth, self.exclude, self.ks, np.asarray(users), self.items,
                         self.engine)

    def compacted(self) -> "Evaluator":
        """The same evaluation over user rows 0..n-1: user vectors are passed for this
        evaluator's users only, in its order (no all-users matrix)."""
        return Evaluator(self.truth[self.users], self.exclude[self.users], self.ks,
                         np.arange(len(self.users)), self.items, self.engine)

    @property
    def k(self) -> int:
        return max(self.ks)

    def top_of(self, model, k: int | None = None) -> np.ndarray:
        """The ranked lists of a fitted recall model for this split's users."""
        return model.recommend(self.users, k or self.k, among=self.items, engine=self.engine)[0]

    def top_of_vectors(self, user_vectors: np.ndarray, item_vectors: np.ndarray,
                       k: int | None = None, items: np.ndarray | None = None) -> np.ndarray:
        """Exact inner-product lists over `items` (all items by default)."""
        top, _ = FaissRetriever("flat").fit(item_vectors, items).search(
            user_vectors, k or self.k, self.exclude, self.users)
        return top

    def per_user(self, top: np.ndarray) -> pd.DataFrame:
        return sharded_metrics(self.engine, per_user_metrics, top, self.users, self.truth,
                               self.ks)

    def metrics(self, top: np.ndarray) -> dict[str, float]:
        return summarise(self.per_user(top), self.ks)

    def mean(self, top: np.ndarray, metric: str = "recall", k: int = 20) -> float:
        """One metric averaged over the users, unrounded (for early stopping)."""
        if len(self.users) == 0:
            return float("nan")
        frame = per_user_metrics(top[:, :k], self.users, self.truth, (k,))
        return float(frame[f"{metric}@{k}"].mean())

    def vector_recall(self, user_vectors: np.ndarray, item_vectors: np.ndarray,
                      k: int = 20) -> float:
        """Recall@k of inner-product retrieval over these vectors."""
        return self.mean(self.top_of_vectors(user_vectors, item_vectors, k), "recall", k)


def retrieved_recall(retriever, users: np.ndarray, seen: sp.csr_matrix, rows: np.ndarray,
                     truth: sp.csr_matrix, k: int = 20) -> float:
    """Mean Recall@k of `rows` of `users` retrieved by `retriever`, `seen` items excluded."""
    top = retriever.search(users, k, seen, rows)[0]
    return float(per_user_metrics(top, rows, truth, (k,))[f"recall@{k}"].mean())


def profile_or_item_mean(dataset, label: str, users: np.ndarray,
                         top_with_profiles: Callable[["Evaluator"], np.ndarray],
                         top_with_item_mean: Callable[["Evaluator"], np.ndarray]) -> dict | None:
    """Validation Recall@20 of representing `users` (those with a profile and training items)
    by their profile or by the mean of their items; each callable gives the ranked lists of
    the evaluator's users. The record of the choice, None when no user has validation items."""
    validation = Evaluator.on_validation(dataset, (20,), max_users=None)
    compared = np.intersect1d(users, validation.users)
    if len(compared) == 0:
        return None
    validation = validation.restricted(compared)
    profile = validation.mean(top_with_profiles(validation))
    mean = validation.mean(top_with_item_mean(validation))
    log(f"{label} ({len(compared):,} users with validation items): val R@20 profile "
        f"{profile:.4f} vs item-mean {mean:.4f}")
    return {"users_compared": int(len(compared)), "val_recall@20_profile": round(profile, 5),
            "val_recall@20_item_mean": round(mean, 5),
            "chosen": "profile" if profile >= mean else "item-mean"}


def format_table(results: dict[str, dict], ks: tuple[int, ...] = DEFAULT_KS) -> str:
    """Markdown table with a row per variant; unavailable variants say why."""
    metric_columns = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    header = ["variant"] + [c.replace("recall", "R").replace("ndcg", "N") for c in metric_columns]
    header += ["time s", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, result in results.items():
        if result.get("status") != "ok":
            cells = [variant, f"unavailable: {result.get('reason', '')}"] + [""] * (len(header) - 2)
        else:
            metrics = result["metrics"]
            cells = [variant] + [f"{metrics[c]:.4f}" for c in metric_columns]
            cells += [f"{result.get('seconds', 0):.1f}", f"{result.get('peak_memory_mb', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_run(folder: Path, config: dict, dataset_summary: dict, results: dict[str, dict],
              per_user: dict[str, pd.DataFrame], notes: list[str],
              top_lists: dict[str, np.ndarray] | None = None,
              comparison: dict | None = None, extra: str = "") -> Path:
    """Write a run's results into `folder` (a staging folder the caller renames into place):
    metrics.json, config.json, per_user/*.parquet (rows in test-user order), top/*.npy (the
    ranked lists of those users), report.md."""
    folder = Path(folder)
    (folder / "top").mkdir(parents=True, exist_ok=True)
    for variant, array in (top_lists or {}).items():
        np.save(folder / "top" / f"{file_name(variant)}.npy", array)
    write_json_atomic(folder / "metrics.json", {"dataset": dataset_summary, "variants": results,
                                                "versus_best_classic": comparison})
    write_json_atomic(folder / "config.json", config)
    (folder / "per_user").mkdir(exist_ok=True)
    for variant, frame in per_user.items():
        frame.to_parquet(folder / "per_user" / f"{file_name(variant)}.parquet", index=False)
    if comparison is not None:
        notes = [*notes, describe_comparison(comparison)]
    write_text_atomic(folder / "report.md",
                      render_report(config, dataset_summary, results, notes, extra))
    return folder


def versus_best_classic(results: dict[str, dict], per_user: dict[str, pd.DataFrame],
                        classic: tuple[str, ...], ours: str, seed: int = 0) -> dict | None:
    """The run's final row `ours` (named before the run, not picked on test) against the
    classic row with the best *validation* Recall@20 (`best_val_recall@20` in its log; every
    classic row when none has one): means, ratio, and the paired bootstrap CI of the
    per-user difference, for Recall@20 and NDCG@20. None when either side is missing."""
    ok = {name for name, r in results.items()
          if r.get("status") == "ok" and "recall@20" in r["metrics"]}
    classics = [name for name in classic if name in ok]
    if ours not in ok or ours in classic or not classics:
        return None
    validated = [n for n in classics if np.isfinite(results[n].get("best_val_recall@20") or np.nan)]
    best_classic = max(validated, key=lambda n: results[n]["best_val_recall@20"]) \
        if validated else max(classics, key=lambda n: results[n]["metrics"]["recall@20"])
    out = {"best_classic": best_classic, "best_row": ours,
           "classic_chosen_on": "validation" if validated else "test (no validation figure)"}
    for metric in ("recall@20", "ndcg@20"):
        compared = compare_metric(per_user[best_classic][metric].to_numpy(),
                                  per_user[ours][metric].to_numpy(), seed)
        out[metric] = {**{k: round(v, 5) for k, v in compared.items()},
                       "ratio": round(compared["b"] / compared["a"], 4) if compared["a"] else None}
    return out


def describe_comparison(comparison: dict) -> str:
    """One line: 'fused + Wide&Deep vs als: R@20 1.036x [+0.0026, +0.0074], N@20 ...'."""
    parts = [f"{metric.replace('recall', 'R').replace('ndcg', 'N')} "
             + (f"{c['ratio']:.3f}x" if c["ratio"] is not None else "ratio n/a (classic 0)")
             + f" [{c['ci95_low']:+.4f}, {c['ci95_high']:+.4f}]"
             for metric, c in comparison.items() if isinstance(c, dict)]
    chosen_on = comparison.get("classic_chosen_on", "validation")
    return (f"final row {comparison['best_row']!r} vs best classic "
            f"{comparison['best_classic']!r} (chosen on {chosen_on}): {', '.join(parts)} "
            "(ratio of means; 95% paired bootstrap CI of the difference)")


def seed_summary(run_dirs: list[Path]) -> dict:
    """Mean and standard deviation (over runs with different seeds) of every metric of every
    row that succeeded in all of them, and each run's comparison with its best classic row."""
    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in run_dirs]
    names = [n for n, r in runs[0]["variants"].items()
             if all(run["variants"].get(n, {}).get("status") == "ok" for run in runs)]
    rows = {}
    for name in names:
        table = pd.DataFrame([run["variants"][name]["metrics"] for run in runs])
        rows[name] = {metric: {"mean": round(float(table[metric].mean()), 5),
                               "std": round(float(table[metric].std(ddof=1)), 5)
                               if len(table) > 1 else 0.0} for metric in table.columns}
    return {"runs": [str(d) for d in run_dirs],
            "seeds": [run_config_seed(d) for d in run_dirs], "variants": rows,
            "versus_best_classic": [run.get("versus_best_classic") for run in runs]}


def run_config_seed(run_dir: Path) -> int:
    return json.loads((Path(run_dir) / "config.json").read_text())["run"]["seed"]


def render_seed_summary(summary: dict) -> str:
    lines = [f"Over {len(summary['runs'])} seeds ({', '.join(map(str, summary['seeds']))}): "
             "mean +- standard deviation.", "",
             "| variant | R@20 | N@20 |", "|---|---|---|"]
    for name, metrics in summary["variants"].items():
        cells = [f"{metrics[m]['mean']:.4f} +- {metrics[m]['std']:.4f}"
                 for m in ("recall@20", "ndcg@20") if m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- seed {seed}: {describe_comparison(c)}"
              for seed, c in zip(summary["seeds"], summary["versus_best_classic"]) if c]
    return "\n".join(lines) + "\n"


def file_name(variant: str) -> str:
    """'fused + Wide&Deep' -> 'fused_wide_deep': a safe file name for a variant."""
    return "_".join("".join(c if c.isalnum() else " " for c in variant.lower()).split())


def render_report(config: dict, dataset_summary: dict, results: dict[str, dict],
                  notes: list[str], extra: str = "") -> str:
    lines = [f"# Run on {dataset_summary['dataset']}", "",
             f"{dataset_summary['users']:,} users x {dataset_summary['items']:,} items; "
             f"{dataset_summary['test_users']:,} test users. Full ranking over all items, "
             "training items excluded.", "",
             format_table(results, tuple(config.get("run", {}).get("ks", DEFAULT_KS))), ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", extra] if extra else []
    segment_lines = []
    for variant, result in results.items():
        for label, segments in result.get("segments", {}).items():
            for name, values in segments.items():
                segment_lines.append(f"| {variant} | {label}={name} | {values['users']} | "
                                     f"{values.get('recall@20', float('nan')):.4f} | "
                                     f"{values.get('ndcg@20', float('nan')):.4f} |")
    if segment_lines:
        lines += ["", "## By user segment", "",
                  "| variant | segment | users | R@20 | N@20 |", "|---|---|---|---|---|"]
        lines += segment_lines
    lines += ["", f"Config: `{config.get('command', '')}`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- offline A/B reports

ACTIVITY_SEGMENTS = ("low", "mid", "high")
POPULARITY_SEGMENTS = ("head", "torso", "tail")


class ABError(ValueError):
    """Two runs that cannot be compared; the message says why."""


def load_run_variant(run_dir: Path, variant: str | None) -> tuple[dict, str, pd.DataFrame,
                                                                  np.ndarray]:
    """(metrics.json, variant, per-user frame, top lists) of one variant of a run folder;
    the last successful variant of the run when `variant` is None."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():
        raise ABError(f"{run_dir}: not a run folder (no metrics.json)")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ok = [name for name, result in metrics["variants"].items() if result.get("status") == "ok"]
    variant = variant or (ok[-1] if ok else None)
    if variant not in ok:
        raise ABError(f"{run_dir}: no successful variant {variant!r}; it has {ok}")
    stored = run_dir / "per_user" / f"{file_name(variant)}.parquet"
    frame = pd.read_parquet(stored) if stored.exists() else \
        pd.read_csv(stored.with_suffix(".csv"))  # a run written before Parquet
    top_file = run_dir / "top" / f"{file_name(variant)}.npy"
    top = np.load(top_file) if top_file.exists() else None
    return metrics, variant, frame, top


def same_data(summary_a: dict, summary_b: dict) -> bool:
    """Two data set summaries describe the same interactions. Profile text is not part of
    that: runs before and after new LLM profiles or cleaning compare."""
    def core(summary: dict) -> dict:
        return {k: summary.get(k) for k in ("users", "items", "interactions", "test_users",
                                             "split_sha256")}
    return core(summary_a) == core(summary_b)


def paired_bootstrap_ci(differences: np.ndarray, resamples: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean of paired per-user differences (users resampled)."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = np.empty(resamples)
    for start in range(0, resamples, 200):  # 200 resamples at a time bounds memory
        count = min(200, resamples - start)
        means[start:start + count] = differences[rng.integers(n, size=(count, n))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Wilcoxon signed-rank and paired t-test p-values (1.0 where A and B never differ)."""
    from scipy import stats

    if np.allclose(a, b):
        return {"wilcoxon_p": 1.0, "paired_t_p": 1.0}
    return {"wilcoxon_p": float(stats.wilcoxon(b, a).pvalue),
            "paired_t_p": float(stats.ttest_rel(b, a).pvalue)}


def compare_metric(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict[str, float]:
    mean_a, mean_b = float(a.mean()), float(b.mean())
    low, high = paired_bootstrap_ci(b - a, seed=seed)
    return {"a": mean_a, "b": mean_b, "lift": mean_b - mean_a,
            "relative_lift": (mean_b - mean_a) / mean_a if mean_a else float("nan"),
            "ci95_low": low, "ci95_high": high, **paired_test(a, b)}


def segment_of_users(train: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    """Activity tertiles of the users' training interaction counts: low, mid, high."""
    counts = np.diff(train.indptr)[users]
    edges = np.quantile(counts, [1 / 3, 2 / 3])
    return np.array(ACTIVITY_SEGMENTS)[np.searchsorted(edges, counts, side="right")]


def popularity_segments(train: sp.csr_matrix) -> np.ndarray:
    """Per item: head (most popular items holding 1/3 of training interactions), torso (the
    next third), tail (the rest, including items never interacted with)."""
    popularity = np.asarray((train > 0).sum(axis=0)).ravel()
    order = np.argsort(-popularity, kind="stable")
    share = np.cumsum(popularity[order]) / max(popularity.sum(), 1)
    labels = np.empty(len(popularity), dtype=object)
    labels[order] = np.array(POPULARITY_SEGMENTS)[np.searchsorted([1 / 3, 2 / 3], share,
                                                                   side="left").clip(0, 2)]
    return labels


def recall_by_item_segment(top: np.ndarray, users: np.ndarray, test: sp.csr_matrix,
                           item_segment: np.ndarray, k: int = 20) -> dict[str, np.ndarray]:
    """Per user, Recall@k over the test items of each popularity segment (NaN without any)."""
    hits = rows_contain(test, users, top[:, :k])
    out = {}
    sub = test[users]
    for name in POPULARITY_SEGMENTS:
        in_segment = np.zeros(test.shape[1], dtype=bool)
        in_segment[item_segment == name] = True
        relevant = np.asarray((sub[:, in_segment] > 0).sum(axis=1)).ravel()  # distinct items
        segment_hits = (hits & in_segment[np.maximum(top[:, :k], 0)]).sum(1)
        out[name] = np.where(relevant > 0, segment_hits / np.maximum(relevant, 1), np.nan)
    return out


def list_statistics(top: np.ndarray, train: sp.csr_matrix, k: int = 20) -> dict[str, float]:
    """Catalogue coverage and popularity bias of the top-k lists."""
    popularity = np.asarray((train > 0).sum(axis=0)).ravel()
    shown = top[:, :k][top[:, :k] >= 0]
    return {"coverage@%d" % k: float(len(np.unique(shown)) / train.shape[1]),
            "mean_item_popularity@%d" % k: float(popularity[shown].mean()) if len(shown) else 0.0,
            "catalogue_mean_popularity": float(popularity.mean())}


def ab_compare(run_a: Path, run_b: Path, variant_a: str | None, variant_b: str | None,
               evaluator: Evaluator, seed: int = 0) -> dict:
    """Everything the A/B report shows, as one dict (written as ab.json). `evaluator` is the
    test split the runs were evaluated on (its exclusion mask gives the training counts)."""
    train, test = evaluator.exclude, evaluator.truth
    metrics_a, variant_a, frame_a, top_a = load_run_variant(run_a, variant_a)
    metrics_b, variant_b, frame_b, top_b = load_run_variant(run_b, variant_b)
    if not same_data(metrics_a["dataset"], metrics_b["dataset"]):
        raise ABError(f"runs are on different datasets or splits: {run_a} has "
                      f"{_split_line(metrics_a['dataset'])}, {run_b} has "
                      f"{_split_line(metrics_b['dataset'])}")
    if not np.array_equal(frame_a["user"].to_numpy(), frame_b["user"].to_numpy()):
        raise ABError("the runs evaluated different test users; they cannot be paired")
    users = frame_a["user"].to_numpy()
    metric_columns = [c for c in frame_a.columns if "@" in c]
    report = {"a": {"run": str(run_a), "variant": variant_a},
              "b": {"run": str(run_b), "variant": variant_b},
              "dataset": metrics_a["dataset"], "users": int(len(users)),
              "metrics": {c: compare_metric(frame_a[c].to_numpy(), frame_b[c].to_numpy(), seed)
                          for c in metric_columns}}
    activity = segment_of_users(train, users)
    report["by_user_activity"] = {
        name: {"users": int((activity == name).sum()),
               **compare_metric(frame_a["ndcg@20"].to_numpy()[activity == name],
                                frame_b["ndcg@20"].to_numpy()[activity == name], seed)}
        for name in ACTIVITY_SEGMENTS if (activity == name).sum() > 1}
    if top_a is not None and top_b is not None:
        item_segment = popularity_segments(train)
        per_a = recall_by_item_segment(top_a, users, test, item_segment)
        per_b = recall_by_item_segment(top_b, users, test, item_segment)
        report["by_item_popularity"] = {}
        for name in POPULARITY_SEGMENTS:
            has = ~np.isnan(per_a[name])
            if has.sum() > 1:
                report["by_item_popularity"][name] = {
                    "users": int(has.sum()),
                    **compare_metric(per_a[name][has], per_b[name][has], seed)}
        report["lists"] = {"a": list_statistics(top_a, train), "b": list_statistics(top_b, train)}
    return report


def _split_line(summary: dict) -> str:
    counts = summary["interactions"]
    return (f"{summary['dataset']} {summary['users']}x{summary['items']}, "
            f"train/val/test {counts['train']}/{counts['val']}/{counts['test']}")


def write_ab_report(report: dict, out_dir: Path, overwrite: bool = False) -> Path:
    """report.md, report.html (plots inlined), ab.json and the PNG plots, atomically."""
    import base64

    with atomic_path(out_dir, "ab.json", overwrite) as tmp:
        tmp.mkdir(parents=True)
        plots = {"curves": _plot_curves(report, tmp / "metric_curves.png"),
                 "segments": _plot_segments(report, tmp / "lift_by_segment.png")}
        write_json_atomic(tmp / "ab.json", report)
        markdown = render_ab_markdown(report)
        write_text_atomic(tmp / "report.md", markdown + "\n![curves](metric_curves.png)\n"
                          "![segments](lift_by_segment.png)\n")
        images = "".join(
            f'<img alt="{name}" src="data:image/png;base64,'
            f'{base64.b64encode(path.read_bytes()).decode()}">' for name, path in plots.items())
        write_text_atomic(tmp / "report.html", _html_page(markdown, images))
    return out_dir


def render_ab_markdown(report: dict) -> str:
    a, b = report["a"], report["b"]
    lines = [f"# Offline A/B: {b['variant']} (B) vs {a['variant']} (A)", "",
             f"- A: `{a['run']}` ({a['variant']})", f"- B: `{b['run']}` ({b['variant']})",
             f"- {report['dataset']['dataset']}: {report['users']:,} paired test users; full "
             "ranking, training items excluded; 95% CI: paired bootstrap over users "
             "(2,000 resamples); p: Wilcoxon signed-rank and paired t-test.", "",
             "| metric | A | B | lift | relative | 95% CI of lift | Wilcoxon p | paired t p |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_ab_row(name, values) for name, values in report["metrics"].items()]
    for title, key in (("NDCG@20 by user activity (training interactions, tertiles)",
                        "by_user_activity"),
                       ("Recall@20 by test-item popularity (head/torso/tail by share of "
                        "training interactions)", "by_item_popularity")):
        if report.get(key):
            lines += ["", f"## {title}", "",
                      "| segment | users | A | B | lift | relative | 95% CI of lift | "
                      "Wilcoxon p | paired t p |", "|---|---|---|---|---|---|---|---|---|"]
            lines += [_ab_row(f"{name} | {values['users']:,}", values)
                      for name, values in report[key].items()]
    if report.get("lists"):
        lines += ["", "## Lists (top 20)", "", "| run | coverage of catalogue | mean popularity "
                  "of shown items | catalogue mean popularity |", "|---|---|---|---|"]
        for side in ("a", "b"):
            values = report["lists"][side]
            lines.append(f"| {side.upper()} | {values['coverage@20']:.3f} | "
                         f"{values['mean_item_popularity@20']:.1f} | "
                         f"{values['catalogue_mean_popularity']:.1f} |")
    return "\n".join(lines) + "\n"


def _ab_row(label: str, values: dict) -> str:
    return (f"| {label} | {values['a']:.4f} | {values['b']:.4f} | {values['lift']:+.4f} | "
            f"{values['relative_lift']:+.1%} | [{values['ci95_low']:+.4f}, "
            f"{values['ci95_high']:+.4f}] | {values['wilcoxon_p']:.3g} | "
            f"{values['paired_t_p']:.3g} |")


def _plot_curves(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, metric in zip(axes, ("recall", "ndcg")):
        names = [n for n in report["metrics"] if n.startswith(metric + "@")]
        ks = [int(n.split("@")[1]) for n in names]
        for side, style in (("a", "o-"), ("b", "s-")):
            label = f"{side.upper()}: {report[side]['variant']}"
            axis.plot(ks, [report["metrics"][n][side] for n in names], style, label=label)
        axis.set_xlabel("K")
        axis.set_title(f"{metric.upper()}@K")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_segments(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"activity: {name}", v) for name, v in report.get("by_user_activity", {}).items()]
    rows += [(f"items: {name}", v) for name, v in report.get("by_item_popularity", {}).items()]
    figure, axis = plt.subplots(figsize=(7, 0.5 + 0.45 * max(len(rows), 1)))
    for position, (label, values) in enumerate(rows):
        axis.errorbar(values["lift"], position, fmt="o", color="tab:blue",
                      xerr=[[values["lift"] - values["ci95_low"]],
                            [values["ci95_high"] - values["lift"]]], capsize=4)
    axis.axvline(0, color="grey", linewidth=1)
    axis.set_yticks(range(len(rows)), [label for label, _ in rows])
    axis.set_xlabel("lift of B over A (NDCG@20 by activity, Recall@20 by item popularity), 95% CI")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _html_page(markdown: str, images: str) -> str:
    """A minimal, dependency-free rendering of the report's Markdown tables and headings."""
    import html

    body, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                table.append(line)
            continue
        if table:
            cells = [[html.escape(c.strip()) for c in row.strip("|").split("|")] for row in table]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                           for row in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
            table = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<p>{html.escape(line[2:]).replace('`', '')}</p>")
    style = ("body{font-family:sans-serif;margin:24px;max-width:1100px}"
             "table{border-collapse:collapse;margin:8px 0 16px}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:8px 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Offline A/B report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}{images}</body></html>\n")
