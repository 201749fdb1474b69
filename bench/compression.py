"""The encoder compression table (`python main.py bench --compression`): the full-size
teacher, the shrunken student and the distilled student, each in fp32 and int8 (and the
12-layer mpnet shrunk to 6 and 3 layers with `--mpnet`), against text-only Recall@20 on the
cold-items split (held-out items ranked among themselves) and on the warm split, the
cold-item Recall@20 of the same text placed in ALS's space by the fused model's cold-start
map, profiles/s and model size. Users are the mean of their training items' text vectors,
so one encoding of the item profiles serves both splits. Test-split figures, reported only:
nothing here chooses a setting."""
from __future__ import annotations

import io
import time

import numpy as np
import torch

from coreMethod import apply_content_map, fit_content_map, mean_of_items
from evaluation import Evaluator
from model.classic import ALS
from model.config import ExperimentConfig
from model.pipeline import load_data
from model.splits import cold_evaluator
from model.text import TextEncoder, encode_cached
from utils import log, pick_device


def encoder_settings(config: ExperimentConfig, distilled: str | None, mpnet: bool) -> list:
    """(label, base or folder, layers kept or None for all, int8)."""
    base, keep = config.encoder.base_model, config.encoder.layers or 3
    rows = []
    for int8 in (False, True):
        precision = "int8" if int8 else "fp32"
        rows += [(f"teacher ({base}, all layers) {precision}", base, None, int8),
                 (f"shrunk ({keep} layers) {precision}", base, keep, int8)]
        if distilled:
            rows.append((f"shrunk + distilled {precision}", distilled, None, int8))
    if mpnet:
        rows += [(f"mpnet 12 -> {k} int8", "mpnet", k, True) for k in (6, 3)]
    return rows


def model_megabytes(encoder: TextEncoder) -> float:
    """Size of the weights as they run (the int8 copy where quantised)."""
    buffer = io.BytesIO()
    torch.save(encoder._runtime.state_dict(), buffer)
    return buffer.tell() / 2 ** 20


def run_compression(config: ExperimentConfig, distilled: str | None, mpnet: bool,
                    profiles: int = 2048) -> list[dict]:
    splits = {name: load_data(config.updated({"split": name}, "bench"))
              for name in ("cold-items", "warm")}
    cold = splits["cold-items"]
    texts = [p or "" for p in cold.item_profiles]
    has_text = np.array([p is not None for p in cold.item_profiles])
    evaluators = {"cold": cold_evaluator(cold, Evaluator.on_test(cold, (20,))),
                  "warm": Evaluator.on_test(splits["warm"], (20,))}
    als = ALS(seed=config.run.seed).fit(cold)  # the library's defaults; no test-set tuning
    device, rows = pick_device(config.run.device), []
    for label, source, layers, int8 in encoder_settings(config, distilled, mpnet):
        encoder = TextEncoder.from_pretrained(source, layers=layers, quantize=int8,
                                              device=device, max_length=config.encoder.max_length)
        sample = [t for t in texts if t][:profiles]
        encoder.encode(sample[:64], show_progress=False)
        started = time.perf_counter()
        encoder.encode(sample, show_progress=False)
        rate = len(sample) / (time.perf_counter() - started)
        items = encode_cached(encoder, texts, config.run.cache_dir, desc=label)
        items[~has_text] = 0
        row = {"setting": label, "profiles_per_s": round(rate), "size_mb":
               round(model_megabytes(encoder), 1), "layers": encoder.describe()["layers"]}
        for name, dataset in (("cold", cold), ("warm", splits["warm"])):
            users = mean_of_items(dataset.train, items, has_text)
            evaluator = evaluators[name]
            top = evaluator.top_of_vectors(users, items, 20, items=evaluator.items)
            row[f"{name}_recall@20"] = round(evaluator.mean(top, "recall", 20), 4)
        row["cold_recall@20_via_als"] = round(_via_als(als, items, cold, evaluators["cold"]), 4)
        log(f"{label}: {row}")
        rows.append(row)
    print(render_compression(rows, cold.name))
    return rows


def _via_als(als: ALS, items: np.ndarray, dataset, evaluator: Evaluator) -> float:
    """Cold items placed in ALS's item space from their text (ridge map fitted on the warm
    items), ranked for ALS's user vectors."""
    users, factors = als.embeddings()
    warm = (np.diff(dataset.train.tocsc().indptr) > 0) & (np.abs(items).sum(1) > 0)
    weights, _ = fit_content_map(items[warm], factors[warm])
    placed = factors.copy()
    placed[evaluator.items] = apply_content_map(items[evaluator.items], weights)
    top = evaluator.top_of_vectors(users, placed, 20, items=evaluator.items)
    return evaluator.mean(top, "recall", 20)


def render_compression(rows: list[dict], name: str) -> str:
    lines = [f"\nEncoder compression on {name} (test split; users = mean of their training "
             "items' text):", "",
             "| setting | layers | cold-item R@20 (text) | cold-item R@20 (text -> ALS map) "
             "| warm R@20 (text) | profiles/s | MB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['layers']} | {r['cold_recall@20']:.4f} | "
              f"{r['cold_recall@20_via_als']:.4f} | {r['warm_recall@20']:.4f} | "
              f"{r['profiles_per_s']} | {r['size_mb']} |" for r in rows]
    return "\n".join(lines)
