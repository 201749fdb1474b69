"""`main.py stream`: replay a data set as a stream and measure what the daily update
guarantees against a full retrain on the same data, step by step.

Arrival by time when the data's train.csv has a `timestamp` column: the newest 20% of the
training pairs arrive in `steps` slices of time order. Otherwise seeded: 10% of users and 5%
of items are new, so all their training interactions arrive later; 10% of the other training
interactions arrive later too; the later interactions are spread over the steps at random.
The base model (tuned on validation, as in `run`) is exported as version 1 of a bundle
store; at each step the
increment goes through `update_bundle` (with the validation pairs of known users as its
no-regression check), and the same model class with the same hyperparameters is retrained
from scratch on base + increments so far. Both are evaluated on the test items of the users
known at that step (training items excluded, full ranking)."""
from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dataHandler import DataError
from evaluation import Evaluator, paired_bootstrap_ci
from model.bundle import (FORMAT_VERSION, Bundle, original_ids, seal_manifest,
                          write_version_files)
from model.foldin import choose_fold_in
from model.graph import GraphSAGE
from model.retrieval import FaissRetriever
from model.update import parse_timestamps, update_bundle
from model.versions import BundleStore
from utils import atomic_path, log, write_json_atomic, write_text_atomic

STREAM_MODELS = ("als", "lightgcn", "graphsage")
STREAM_OPTIONS = ("seed", "runs_dir", "tune_baselines", "tune_budget", "threads", "sage_fanout")
NEW_USERS, NEW_ITEMS, LATE_PAIRS = 0.10, 0.05, 0.10
LATEST_BY_TIME = 0.20  # with timestamps: the newest fifth of the training pairs streams in


def arrival_steps(train: sp.csr_matrix, steps: int, seed: int) -> np.ndarray:
    """Per training pair (in COO order): 0 for the base, 1..steps for its increment."""
    rng = np.random.default_rng(seed)
    coo = train.tocoo()
    n_users, n_items = train.shape
    new_users = np.zeros(n_users, bool)
    new_users[rng.choice(n_users, int(NEW_USERS * n_users), replace=False)] = True
    new_items = np.zeros(n_items, bool)
    new_items[rng.choice(n_items, int(NEW_ITEMS * n_items), replace=False)] = True
    late = new_users[coo.row] | new_items[coo.col] | (rng.random(coo.nnz) < LATE_PAIRS)
    return np.where(late, rng.integers(1, steps + 1, coo.nnz), 0)


def timestamp_steps(train: sp.csr_matrix, folder: Path | None,
                    steps: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(arrival step, time) per training pair (in COO order) when `folder`/train.csv has a
    `timestamp` column (numbers or dates): a pair arrives at its first timestamp; the newest
    LATEST_BY_TIME of the pairs form the increments, in equal-sized slices of time order.
    None without timestamps."""
    path = folder / "train.csv" if folder is not None else None
    if path is None or not path.is_file() or \
            "timestamp" not in pd.read_csv(path, nrows=0).columns:
        return None
    frame = pd.read_csv(path, usecols=["user", "item", "timestamp"], dtype={"timestamp": str},
                        keep_default_na=False)
    when = parse_timestamps(path, frame["timestamp"], frame.index.to_numpy() + 2)
    first = pd.Series(when, index=frame["user"].to_numpy(np.int64) * train.shape[1]
                      + frame["item"].to_numpy(np.int64)).groupby(level=0).min()
    coo = train.tocoo()
    times = first.reindex(coo.row.astype(np.int64) * train.shape[1] + coo.col).to_numpy()
    order = np.argsort(times, kind="stable")
    late = order[int(round((1 - LATEST_BY_TIME) * len(order))):]
    if len(late) < steps:
        raise DataError(f"{path}: {len(late)} training pairs arrive late, fewer than the "
                        f"{steps} steps asked for")
    arrival = np.zeros(coo.nnz, dtype=np.int64)
    arrival[late] = 1 + np.arange(len(late)) * steps // len(late)
    return arrival, times


def _matrix(coo: sp.coo_matrix, keep: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=coo.shape)


class Stream:
    def __init__(self, dataset, models, variant: str, steps: int, out: Path, seed: int,
                 folder: Path | None = None) -> None:
        self.dataset, self.models, self.variant, self.steps = dataset, models, variant, steps
        self.out, self.seed = out, seed
        self.user_ids = original_ids(dataset.user_ids, dataset.n_users)
        self.item_ids = original_ids(dataset.item_ids, dataset.n_items)
        self.coo = dataset.train.tocoo()
        by_time = timestamp_steps(dataset.train, folder, steps)
        self.arrival_kind = "timestamp" if by_time is not None else "seeded random"
        self.arrival, self.times = by_time if by_time is not None else \
            (arrival_steps(dataset.train, steps, seed), None)
        self.evaluator = Evaluator.on_test(dataset, (20,))
        self.held_back: list[int] = []

    def train_until(self, step: int) -> sp.csr_matrix:
        return _matrix(self.coo, self.arrival <= step)

    def run(self) -> dict:
        base = dataclasses.replace(self.dataset, train=self.train_until(0))
        started = time.perf_counter()
        model = self.models(base).get(self.variant)
        params = model.params()
        log(f"stream: base {self.variant} fitted in {time.perf_counter() - started:.1f} s "
            f"with {params}")
        store = self.out / "bundle"
        self._write_base(model, base, store)
        rows = [self._row(0, base.train, Bundle(store), model, 0.0, 0.0, True, "base")]
        for step in range(1, self.steps + 1):
            rows.append(self._step(step, store, model, params))
            log(f"stream step {step}: {rows[-1]}")
        return {"dataset": self.dataset.name, "variant": self.variant, "steps": self.steps,
                "seed": self.seed, "arrival": self.arrival_kind, "params": params, "rows": rows}

    def _write_base(self, model, base, store: Path) -> None:
        known_users = np.flatnonzero(np.diff(base.train.indptr) > 0)
        known_items = np.flatnonzero(np.asarray((base.train > 0).sum(axis=0)).ravel() > 0)
        users, items = model.embeddings()
        with atomic_path(store) as tmp:
            bundle_store = BundleStore.initialise(tmp)
            with bundle_store.staged_version() as (version, folder):
                folder.mkdir(parents=True)
                users, items = (users[known_users].astype(np.float32),
                                items[known_items].astype(np.float32))
                retriever = FaissRetriever("flat", use_gpu=False).fit(items)
                seen = base.train[known_users][:, known_items].tocsr()
                write_version_files(
                    folder, users, items,
                    {"row": np.arange(len(users)), "id": [self.user_ids[u] for u in known_users]},
                    {"row": np.arange(len(items)), "id": [self.item_ids[i] for i in known_items]},
                    retriever, seen)
                fold_in = choose_fold_in(users, items, seen, retriever, model.params())
                seal_manifest(folder, {
                    "format_version": FORMAT_VERSION, "variant": self.variant,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "dataset": {"dataset": self.dataset.name, "stream_base": True},
                    "data": {"dataset": self.dataset.name}, "users": len(known_users),
                    "items": len(known_items), "dim": int(users.shape[1]),
                    "storage": "float32", "scales": {"users": 1.0, "items": 1.0},
                    "metrics_at_export": {}, "text_encoder": None, "ranker": None,
                    "text_encoder_unavailable": f"stream of '{self.variant}'",
                    "model_params": model.params(), "fold_in": fold_in.describe(),
                    "graph": model.save_graph(folder, known_users, known_items)
                    if hasattr(model, "save_graph") else None,
                    "version": version, "parent": None,
                    "data_cutoff": {"training_interactions": int(base.train.nnz)},
                    "changes": {"kind": "full", "stream_step": 0}})
            bundle_store.switch(version)

    def _increment_files(self, step: int, known_before: np.ndarray) -> tuple[Path, Path]:
        """This step's arrivals, plus those of earlier steps whose update was held back (they
        are not in the current version; a real pipeline would send them again)."""
        pairs = np.isin(self.arrival, [*self.held_back, step])
        increment = self.out / "increments" / f"step{step}.csv"
        increment.parent.mkdir(parents=True, exist_ok=True)
        columns = {"user": [self.user_ids[u] for u in self.coo.row[pairs]],
                   "item": [self.item_ids[i] for i in self.coo.col[pairs]]}
        if self.times is not None:
            columns["timestamp"] = self.times[pairs]
        pd.DataFrame(columns).to_csv(increment, index=False)
        val = self.dataset.val.tocoo()
        keep = np.isin(val.row, known_before)
        validation = self.out / "increments" / f"validation{step}.csv"
        pd.DataFrame({"user": [self.user_ids[u] for u in val.row[keep]],
                      "item": [self.item_ids[i] for i in val.col[keep]]}
                     ).to_csv(validation, index=False)
        return increment, validation

    def _step(self, step: int, store: Path, model, params: dict) -> dict:
        known_before = np.flatnonzero(np.diff(self.train_until(step - 1).indptr) > 0)
        increment, validation = self._increment_files(step, known_before)
        started = time.perf_counter()
        result = update_bundle(store, increment, validation=validation)
        update_seconds = time.perf_counter() - started
        self.held_back = [] if result.made_current else [*self.held_back, step]
        train = self.train_until(step)
        started = time.perf_counter()
        retrained = self._retrained(model, params, dataclasses.replace(self.dataset, train=train))
        retrain_seconds = time.perf_counter() - started
        bundle = Bundle(store)  # the served version: the update, or its parent if held back
        return self._row(step, train, bundle, retrained, update_seconds, retrain_seconds,
                         result.made_current, result.report["validation"])

    def _retrained(self, model, params: dict, data):
        """The same model with the same hyperparameters fitted from scratch on `data`;
        GraphSAGE with its text features fitted on `data` too (as `run` would)."""
        if isinstance(model, GraphSAGE):
            return self.models(data).get(self.variant)
        return type(model)(**params).fit(data)

    def _row(self, step: int, train: sp.csr_matrix, bundle: Bundle, full, update_seconds: float,
             retrain_seconds: float, made_current: bool, verdict: str) -> dict:
        """Both models on the test items of the users known at this step."""
        known = np.flatnonzero(np.diff(train.indptr) > 0)
        evaluator = self.evaluator.restricted(np.intersect1d(self.evaluator.users, known))
        full_top = evaluator.top_of_vectors(*full.embeddings())
        users, items, indexed = self._bundle_vectors(bundle)
        incremental_top = evaluator.top_of_vectors(users, items, items=indexed)
        full_frame, inc_frame = evaluator.per_user(full_top), evaluator.per_user(incremental_top)
        arrived_items = np.flatnonzero(np.asarray((train > 0).sum(axis=0)).ravel() > 0)
        new_items = np.setdiff1d(arrived_items, np.flatnonzero(np.asarray(
            (self.train_until(0) > 0).sum(axis=0)).ravel() > 0))
        row = {"step": step, "users": int(len(evaluator.users)),
               "training_pairs": int(train.nnz), "made_current": made_current,
               "validation": verdict, "new_items_so_far": int(len(new_items)),
               "new_items_retrievable": int(np.isin(new_items, indexed).sum()),
               "update_seconds": round(update_seconds, 3),
               "retrain_seconds": round(retrain_seconds, 3)}
        for metric in ("recall@20", "ndcg@20"):
            a, b = full_frame[metric].to_numpy(), inc_frame[metric].to_numpy()
            low, high = paired_bootstrap_ci(b - a, seed=self.seed)
            row[f"full_{metric}"], row[f"incremental_{metric}"] = float(a.mean()), float(b.mean())
            row[f"ratio_{metric}"] = float(b.mean() / a.mean()) if a.mean() else float("nan")
            row[f"ci95_{metric}"] = [float(low), float(high)]
        return row

    def _bundle_vectors(self, bundle: Bundle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The bundle's vectors placed in the data set's row space (absent rows: zero)."""
        user_row = {u: r for r, u in enumerate(self.user_ids)}
        item_row = {i: r for r, i in enumerate(self.item_ids)}
        users = np.zeros((self.dataset.n_users, bundle.users.shape[1]), np.float32)
        items = np.zeros((self.dataset.n_items, bundle.items.shape[1]), np.float32)
        users[[user_row[u] for u in bundle.user_ids]] = bundle.users
        items[[item_row[i] for i in bundle.item_ids]] = bundle.items
        indexed = np.array([item_row[bundle.item_ids[r]] for r in bundle.retriever.row_to_item])
        return users, items, np.sort(indexed)


def render_stream_report(report: dict) -> str:
    lines = [f"# Stream replay: {report['dataset']}, {report['variant']}, {report['steps']} steps",
             "", f"Arrival: {report['arrival']}. Hyperparameters (tuned on the base's "
             f"validation split): `{report['params']}`",
             "", "| step | users | R@20 full | R@20 incr. | ratio | 95% CI of diff | N@20 ratio "
             "| new items retrievable | update s | retrain s | cost | made current |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cost = r["update_seconds"] / r["retrain_seconds"] if r["retrain_seconds"] else 0.0
        low, high = r["ci95_recall@20"]
        lines.append(
            f"| {r['step']} | {r['users']:,} | {r['full_recall@20']:.4f} | "
            f"{r['incremental_recall@20']:.4f} | {r['ratio_recall@20']:.3f} | "
            f"[{low:+.4f}, {high:+.4f}] | {r['ratio_ndcg@20']:.3f} | "
            f"{r['new_items_retrievable']}/{r['new_items_so_far']} | {r['update_seconds']:.2f} | "
            f"{r['retrain_seconds']:.2f} | {cost:.1%} | {r['made_current']} |")
    return "\n".join(lines) + "\n"


def write_stream_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json_atomic(out / "stream.json", report)
    markdown = render_stream_report(report)
    write_text_atomic(out / "stream.md", markdown)
    steps = [r["step"] for r in report["rows"]]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for kind in ("full", "incremental"):
        axis.plot(steps, [r[f"{kind}_recall@20"] for r in report["rows"]], marker="o",
                  label=f"{kind} retrain" if kind == "full" else "incremental update")
    axis.set_xlabel("step")
    axis.set_ylabel("Recall@20 (test)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "stream.png", dpi=120)
    plt.close(figure)
    table = pd.DataFrame(report["rows"]).drop(columns=["validation"]).to_html(index=False)
    write_text_atomic(out / "stream.html", f"<html><body><h1>Stream replay</h1><pre>"
                      f"{json.dumps(report['params'])}</pre>{table}"
                      f"<img src='stream.png'></body></html>")
