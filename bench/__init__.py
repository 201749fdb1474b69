"""Benchmarks that print figures (never timed assertions): encoder throughput for each speed
lever, FAISS queries per second, peak memory. Run with `python main.py bench --dataset NAME`."""
from __future__ import annotations

import time

import numpy as np

from coreMethod import bipartite_graph, epoch_batch, random_walks
from evaluation import Evaluator
from model.config import ExperimentConfig, TrainConfig
from model.graph import GraphSAGE, LightGCN
from model.pipeline import load_data
from model.retrieval import FaissRetriever
from model.text import TextEncoder, TextRecall
from utils import log, peak_memory_mb, pick_device

# (label, layers kept, int8, length-sorted batches)
ENCODER_SETTINGS = [
    ("6 layers fp32 (full MiniLM)", 6, False, True),
    ("6 layers int8", 6, True, True),
    ("3 layers fp32 unsorted", 3, False, False),
    ("3 layers fp32", 3, False, True),
    ("3 layers int8", 3, True, True),
    ("2 layers fp32", 2, False, True),
    ("2 layers int8", 2, True, True),
]


def run_benchmarks(config: ExperimentConfig, profiles: int, with_recall: bool) -> None:
    dataset = load_data(config)
    texts = [p for p in dataset.item_profiles if p is not None][:profiles]
    device = pick_device(config.run.device)
    rows = []
    if texts:
        rows = [bench_encoder(label, layers, int8, sort, texts, dataset, config, device,
                              with_recall) for label, layers, int8, sort in ENCODER_SETTINGS]
        print(f"\nEncoder throughput on {len(texts)} {dataset.name} item profiles, "
              f"max_length {config.encoder.max_length}, batch {config.encoder.batch_size}, "
              f"{device}:")
        print("| setting | profiles/s | vs 3 layers fp32 unsorted | text val R@20 |")
        print("|---|---|---|---|")
        base = next(r["rate"] for r in rows if r["label"] == "3 layers fp32 unsorted")
        for row in rows:
            print(f"| {row['label']} | {row['rate']:.0f} | {row['rate'] / base:.2f}x | "
                  f"{row['recall'] if row['recall'] is not None else '-'} |")
    bench_faiss(dataset)
    bench_graph(dataset)
    print(f"\npeak memory: {peak_memory_mb():.0f} MB")


def bench_encoder(label: str, layers: int, int8: bool, sort: bool, texts: list[str], dataset,
                  config: ExperimentConfig, device: str, with_recall: bool) -> dict:
    enc = config.encoder
    encoder = TextEncoder.from_pretrained(
        enc.base_model, layers=layers, strategy=enc.layer_strategy, pooling=enc.pooling,
        max_length=enc.max_length, batch_size=enc.batch_size, quantize=int8, device=device,
        sort_by_length=sort)
    encoder.encode(texts[: enc.batch_size], show_progress=False)  # warm-up
    started = time.perf_counter()
    encoder.encode(texts, show_progress=False)
    rate = len(texts) / (time.perf_counter() - started)
    log(f"{label}: {rate:.0f} profiles/s")
    recall = text_recall_at_20(encoder, dataset, config.run.cache_dir) \
        if with_recall and sort else None
    return {"label": label, "rate": rate, "recall": recall, "encoder": encoder}


def text_recall_at_20(encoder: TextEncoder, dataset, cache_dir: str) -> str:
    """Validation Recall@20 (these figures choose layers and int8: never the test split)."""
    model = TextRecall(encoder, cache_dir).fit(dataset)
    evaluator = Evaluator.on_validation(dataset, (20,), max_users=None)
    return f"{evaluator.metrics(evaluator.top_of(model))['recall@20']:.4f}"


def bench_faiss(dataset) -> None:
    dim = 384
    rng = np.random.default_rng(0)
    items = rng.normal(size=(dataset.n_items, dim)).astype(np.float32)
    users = rng.normal(size=(dataset.n_users, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    print(f"\nFAISS top-50 for all {dataset.n_users:,} users over {dataset.n_items:,} items "
          f"(dim {dim}, training items excluded):")
    print("| index | build s | search s | queries/s |")
    print("|---|---|---|---|")
    for kind in ("flat", "ivf", "hnsw"):
        started = time.perf_counter()
        retriever = FaissRetriever(kind, nprobe=16).fit(items)
        built = time.perf_counter() - started
        started = time.perf_counter()
        retriever.search(users, 50, dataset.train)
        seconds = time.perf_counter() - started
        print(f"| {kind} | {built:.2f} | {seconds:.2f} | {dataset.n_users / seconds:,.0f} |")


def bench_graph(dataset) -> None:
    """Random-walk generation rate and one training epoch of each GNN (id features only)."""
    graph = bipartite_graph(dataset.train)
    started = time.perf_counter()
    walks = random_walks(graph, walks_per_node=10, walk_length=20, seed=0)
    seconds = time.perf_counter() - started
    print(f"\nRandom walks on {graph.shape[0]:,} nodes / {graph.nnz // 2:,} edges: "
          f"{walks.size:,} steps in {seconds:.2f} s = {walks.size / seconds:,.0f} steps/s")
    one_epoch = TrainConfig(epochs=1, eval_every=1, patience=1)
    batch = epoch_batch(one_epoch.batch, dataset.train.nnz)  # as the models' epochs cut it
    steps = max(1, dataset.train.nnz // batch)  # as bpr_epoch counts them
    for label, model in (("GraphSAGE (2 layers, id features)", GraphSAGE(train=one_epoch)),
                         ("LightGCN (3 layers)", LightGCN(train=one_epoch))):
        started = time.perf_counter()
        model.fit(dataset)
        print(f"{label}: one epoch incl. validation {time.perf_counter() - started:.1f} s "
              f"({steps} steps of {batch} triples)")
