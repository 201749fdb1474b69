"""Benchmarks that print figures (never timed assertions): encoder throughput for each speed
lever, FAISS queries per second, peak memory. Run with `python main.py bench --dataset NAME`."""
from __future__ import annotations

import time

import numpy as np

from dataHandler import load_dataset, prepare_dataset
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


def run_benchmarks(opts: dict) -> None:
    folder = prepare_dataset(opts["dataset"], opts["data_root"], opts["data_source"],
                             opts["data_url"])
    dataset = load_dataset(folder, opts["dataset"])
    texts = [p for p in dataset.item_profiles if p is not None][: opts["profiles"]]
    device = pick_device(opts["device"])
    rows = []
    if texts:
        rows = [bench_encoder(label, layers, int8, sort, texts, dataset, opts, device)
                for label, layers, int8, sort in ENCODER_SETTINGS]
        print(f"\nEncoder throughput on {len(texts)} {dataset.name} item profiles, "
              f"max_length {opts['max_length']}, batch {opts['batch_size']}, {device}:")
        print("| setting | profiles/s | vs 3 layers fp32 unsorted | text R@20 |")
        print("|---|---|---|---|")
        base = next(r["rate"] for r in rows if r["label"] == "3 layers fp32 unsorted")
        for row in rows:
            print(f"| {row['label']} | {row['rate']:.0f} | {row['rate'] / base:.2f}x | "
                  f"{row['recall'] if row['recall'] is not None else '-'} |")
    bench_faiss(dataset, rows, opts)
    bench_graph(dataset, opts)
    print(f"\npeak memory: {peak_memory_mb():.0f} MB")


def bench_encoder(label: str, layers: int, int8: bool, sort: bool, texts: list[str], dataset,
                  opts: dict, device: str) -> dict:
    from model import TextEncoder

    encoder = TextEncoder.from_pretrained(
        opts["base_model"], layers=layers, strategy=opts["layer_strategy"],
        pooling=opts["pooling"], max_length=opts["max_length"], batch_size=opts["batch_size"],
        quantize=int8, device=device, sort_by_length=sort)
    encoder.encode(texts[: opts["batch_size"]], show_progress=False)  # warm-up
    started = time.perf_counter()
    encoder.encode(texts, show_progress=False)
    rate = len(texts) / (time.perf_counter() - started)
    log(f"{label}: {rate:.0f} profiles/s")
    recall = text_recall_at_20(encoder, dataset, opts) if opts["with_recall"] and sort else None
    return {"label": label, "rate": rate, "recall": recall, "encoder": encoder}


def text_recall_at_20(encoder, dataset, opts: dict) -> str:
    from evaluation import per_user_metrics, users_with_test_items
    from model import FaissRetriever, TextRecall

    recall = TextRecall(encoder, opts["cache_dir"]).fit(dataset)
    users = users_with_test_items(dataset.test)
    user_vectors, item_vectors = recall.embeddings()
    top, _ = FaissRetriever("flat").fit(item_vectors, np.flatnonzero(recall.item_has_text)) \
        .search(user_vectors, 20, dataset.train, users)
    return f"{per_user_metrics(top, users, dataset.test, (20,))['recall@20'].mean():.4f}"


def bench_faiss(dataset, rows: list[dict], opts: dict) -> None:
    from model import FaissRetriever

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


def bench_graph(dataset, opts: dict) -> None:
    """Random-walk generation rate and one training epoch of each GNN (id features only)."""
    from coreMethod import bipartite_graph, random_walks
    from model import GraphSAGE, LightGCNRecall

    graph = bipartite_graph(dataset.train)
    started = time.perf_counter()
    walks = random_walks(graph, walks_per_node=10, walk_length=20, seed=0)
    seconds = time.perf_counter() - started
    print(f"\nRandom walks on {graph.shape[0]:,} nodes / {graph.nnz // 2:,} edges: "
          f"{walks.size:,} steps in {seconds:.2f} s = {walks.size / seconds:,.0f} steps/s")
    train_opts = {"seed": 0, "dim": 64, "sage_id_dim": 64, "sage_layers": 2, "lgn_layers": 3,
                  "lr": 0.005, "epochs": 1, "train_batch": 8192, "weight_decay": 1e-4,
                  "eval_every": 1, "patience": 1, "progress": False}
    for label, model in (("GraphSAGE (2 layers, id features)", GraphSAGE(train_opts)),
                         ("LightGCN (3 layers)", LightGCNRecall(train_opts))):
        started = time.perf_counter()
        model.fit(dataset)
        print(f"{label}: one epoch incl. validation {time.perf_counter() - started:.1f} s "
              f"({dataset.train.nnz // 8192} steps of 8192 triples)")
