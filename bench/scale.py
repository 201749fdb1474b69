"""Scale benchmark (`main.py bench --scale --dataset FOLDER [--engine ray --workers N]`):
the pipeline's own steps on a (synthetic) data set, each timed, with the driver's and every
worker's memory; the result is appended to RESULTS, and the table of every result so far is
printed, with how time and memory grow with the interactions and a labelled projection for
more workers.

Steps: load (CSV -> sparse matrices, profiles), text (encode item and written user profiles
on the engine; other users are the mean of their items), ALS (`implicit`, fixed settings: a
scale measurement, not a quality one; in the driver process, multithreaded), retrieval +
evaluation (Recall/NDCG@20 over every test user, sharded over the engine's workers; IVF
when the catalogue is large, its overlap with exact search checked on a sample)."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from evaluation import Evaluator, summarise
from model.classic import ALS
from model.config import ExperimentConfig
from model.engine import make_engine, process_memory
from model.pipeline import build_encoder, load_data
from model.retrieval import OVERLAP_TARGET, calibrated_retriever, calibration_users
from model.text import TextRecall
from utils import log

RESULTS = Path("runs") / "scale" / "results.jsonl"
IVF_FROM_ITEMS = 50_000  # exact search below this catalogue size


class PeakSampler:
    """Largest resident memory of this process while a step runs (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    @contextmanager
    def watch(self):
        self.peak, self._stop = self.process.memory_info().rss, threading.Event()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)


def run_scale(config: ExperimentConfig) -> dict:
    run = config.run
    engine = make_engine(run.engine, run.workers, run.ray_address)
    sampler, steps = PeakSampler(), {}

    @contextmanager
    def step(name: str, unit: str):
        """Times a step; the block sets done['count'], the units it got through."""
        log(f"scale: {name}")
        started, done = time.perf_counter(), {"count": 0}
        with sampler.watch():
            yield done
        seconds = time.perf_counter() - started
        steps[name] = {"seconds": round(seconds, 1), unit: done["count"],
                       f"{unit}_per_s": round(done["count"] / max(seconds, 1e-9)),
                       "driver_peak_mb": round(sampler.peak / 2**20)}
    try:
        with step("load", "interactions") as done:
            dataset = load_data(config)
            done["count"] = n_train = int(dataset.train.nnz)
        profiles = sum(p is not None for p in dataset.item_profiles) + int(
            (dataset.user_profile_source == "written").sum())
        with step("text", "profiles") as done:
            done["count"] = profiles
            text = TextRecall(build_encoder(config), None, "written", engine).fit(dataset)
        with step("als", "interactions") as done:
            done["count"] = n_train
            als = ALS(factors=64, iterations=10).fit(dataset)
        evaluator = Evaluator.on_test(dataset, (20,), engine)
        metrics = {}
        for name, model in (("als", als), ("text", text)):
            checked = choose_index(model, evaluator, run.nprobe, run.seed) \
                if dataset.n_items >= IVF_FROM_ITEMS else {"index": model.index_kind}
            with step(f"retrieve+evaluate {name}", "users") as done:
                done["count"] = len(evaluator.users)
                metrics[name] = summarise(evaluator.per_user(evaluator.top_of(model)), (20,))
            steps[f"retrieve+evaluate {name}"].update(checked)
        result = {"dataset": dataset.name, "users": dataset.n_users, "items": dataset.n_items,
                  "train_interactions": n_train, "test_users": int(len(evaluator.users)),
                  "engine": engine.name, "workers": engine.workers, "steps": steps,
                  "metrics": metrics, "driver": process_memory(),
                  "worker_memory": engine.worker_memory() if engine.name == "ray" else []}
    finally:
        engine.close()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    print(render_scale(read_results()))
    return result


def choose_index(model, evaluator: Evaluator, nprobe: int, seed: int) -> dict:
    """IVF where it keeps OVERLAP_TARGET of the exact top 20 on a sample of test users,
    else exact search (`calibrated_retriever`); sets the choice on `model`."""
    users = calibration_users(evaluator.users, seed)  # test users: the ones evaluated
    retriever, report = calibrated_retriever(model.item_vectors, model._usable(),
                                             model.user_vectors, model.seen, users, "ivf",
                                             nprobe, OVERLAP_TARGET)
    model.with_retriever(retriever)
    return {"index": retriever.kind, **report}


def read_results() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def render_scale(results: list[dict]) -> str:
    lines = ["| data | train pairs | engine x workers | step | s | rate | driver peak MB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for name, s in r["steps"].items():
            rate = next(f"{v:,}/s {k[:-6]}" for k, v in s.items() if k.endswith("_per_s"))
            lines.append(f"| {r['dataset']} | {r['train_interactions']:,} | {r['engine']} x "
                         f"{r['workers']} | {name} | {s['seconds']} | {rate} | "
                         f"{s['driver_peak_mb']:,} |")
    lines += ["", "| data | engine x workers | worker | peak RSS MB | unique (USS) MB |",
              "|---|---|---|---|---|"]
    for r in results:
        for w in r["worker_memory"] or [r["driver"]]:
            lines.append(f"| {r['dataset']} | {r['engine']} x {r['workers']} | {w['worker']} | "
                         f"{w['peak_rss_mb']:,.0f} | {w['uss_mb']:,.0f} |")
    lines += ["", growth(results), "", projection(results)]
    return "\n".join(lines)


def growth(results: list[dict]) -> str:
    """Driver peak memory across sizes of the same engine, and what each added user costs
    over the smallest size (the fixed cost of Python, torch and faiss left out): a constant
    cost per added user means memory grows linearly."""
    rows = ["| engine x workers | users | train pairs | driver peak MB | KB per added user | "
            "largest worker peak MB |", "|---|---|---|---|---|---|"]
    smallest: dict[tuple, tuple[int, float]] = {}
    for r in sorted(results, key=lambda r: (r["engine"], r["workers"], r["users"])):
        peak = max(s["driver_peak_mb"] for s in r["steps"].values())
        users0, peak0 = smallest.setdefault((r["engine"], r["workers"]), (r["users"], peak))
        added = f"{1024 * (peak - peak0) / (r['users'] - users0):.2f}" \
            if r["users"] > users0 else "(base)"
        worker = max((w["peak_rss_mb"] for w in r["worker_memory"]), default=None)
        rows.append(f"| {r['engine']} x {r['workers']} | {r['users']:,} | "
                    f"{r['train_interactions']:,} | {peak:,} | {added} | "
                    f"{'-' if worker is None else f'{worker:,.0f}'} |")
    return "\n".join(rows)


def projection(results: list[dict]) -> str:
    """PROJECTION, not a measurement: the largest Ray run's sharded steps at N workers, as
    (work per worker / measured rate per worker) + start-up; this 2-core machine cannot
    show a speed-up from more workers than cores."""
    ray_runs = [r for r in results if r["engine"] == "ray"]
    if not ray_runs:
        return "(no Ray result yet: no projection)"
    r = max(ray_runs, key=lambda r: r["train_interactions"])
    lines = [f"PROJECTION (not measured) from {r['dataset']} on {r['workers']} workers: "
             "sharded steps at N workers = measured seconds x workers / N, + 10 s start-up",
             "| step | measured s | N=8 | N=32 |", "|---|---|---|---|"]
    for name, s in r["steps"].items():
        if name == "text" or name.startswith("retrieve"):
            work = s["seconds"] * r["workers"]
            lines.append(f"| {name} | {s['seconds']} | {work / 8 + 10:.0f} | "
                         f"{work / 32 + 10:.0f} |")
    return "\n".join(lines)
