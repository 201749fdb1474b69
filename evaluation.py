"""Recall@K and NDCG@K under the RLMRec/EasyRec protocol, per user and averaged, and the
run report (metrics.json, per-user metrics, report.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from utils import atomic_path, rows_contain, write_json_atomic, write_text_atomic

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


def write_run(run_dir: Path, config: dict, dataset_summary: dict, results: dict[str, dict],
              per_user: dict[str, pd.DataFrame], notes: list[str],
              top_lists: dict[str, np.ndarray] | None = None,
              vectors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Write the run folder atomically: metrics.json, config.json, per_user/*.csv (rows in
    test-user order), top/*.npy (the ranked lists of those users), embeddings/*.npz (user
    and item vectors of each embedding variant), report.md."""
    with atomic_path(run_dir) as tmp:
        tmp.mkdir(parents=True)
        for folder, arrays in (("top", top_lists or {}), ("embeddings", vectors or {})):
            (tmp / folder).mkdir()
            for variant, array in arrays.items():
                if folder == "top":
                    np.save(tmp / folder / f"{_file_name(variant)}.npy", array)
                else:
                    np.savez(tmp / folder / f"{_file_name(variant)}.npz",
                             users=array[0].astype(np.float32),
                             items=array[1].astype(np.float32))
        write_json_atomic(tmp / "metrics.json", {"dataset": dataset_summary, "variants": results})
        write_json_atomic(tmp / "config.json", config)
        (tmp / "per_user").mkdir()
        for variant, frame in per_user.items():
            frame.to_csv(tmp / "per_user" / f"{_file_name(variant)}.csv", index=False,
                         float_format="%.6g")
        write_text_atomic(tmp / "report.md", render_report(config, dataset_summary, results, notes))
    return run_dir


def _file_name(variant: str) -> str:
    """'fused + Wide&Deep' -> 'fused_wide_deep': a safe file name for a variant."""
    return "_".join("".join(c if c.isalnum() else " " for c in variant.lower()).split())


def render_report(config: dict, dataset_summary: dict, results: dict[str, dict],
                  notes: list[str]) -> str:
    lines = [f"# Run on {dataset_summary['dataset']}", "",
             f"{dataset_summary['users']:,} users x {dataset_summary['items']:,} items; "
             f"{dataset_summary['test_users']:,} test users. Full ranking over all items, "
             "training items excluded.", "", format_table(results), ""]
    lines += [f"- {note}" for note in notes]
    segment_lines = []
    for variant, result in results.items():
        for label, segments in result.get("segments", {}).items():
            for name, values in segments.items():
                segment_lines.append(f"| {variant} | {label}={name} | {values['users']} | "
                                     f"{values['recall@20']:.4f} | {values['ndcg@20']:.4f} |")
    if segment_lines:
        lines += ["", "## By user segment", "",
                  "| variant | segment | users | R@20 | N@20 |", "|---|---|---|---|---|"]
        lines += segment_lines
    lines += ["", f"Config: `{config.get('command', '')}`", ""]
    return "\n".join(lines)
