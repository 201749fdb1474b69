"""Distillation of the shrunken encoder from its full-size teacher (`--distill`): the student
(a subset of the teacher's layers) learns to reproduce the teacher's pooled, L2-normalised
embeddings of the data set's profile texts. Unlabeled text only: no interaction, no split.
A held-out sample of the texts measures the student-teacher cosine distance before, during
and after; the best state on it is kept."""
from __future__ import annotations

import time

import numpy as np
import torch

from coreMethod import BestState, cosine_distillation_loss, train_until_no_improvement
from model.text import TextEncoder, embed_tokens, encode_cached
from utils import deterministic_torch, log


def distillation_texts(dataset) -> list[str]:
    """Distinct item and user profile texts, in a fixed order."""
    texts = [t for t in (*dataset.item_profiles, *dataset.user_profiles) if t]
    return sorted(set(texts))


def distill_encoder(student: TextEncoder, teacher: TextEncoder, texts: list[str],
                    steps: int = 600, batch: int = 32, lr: float = 1e-4,
                    eval_every: int = 100, held_out: float = 0.05, seed: int = 2023,
                    cache_dir: str | None = None) -> tuple[TextEncoder, dict]:
    """Train `student` so its embeddings match `teacher`'s on `texts`; returns a new encoder
    (the student's weights trained, its settings kept) and a log of the held-out cosine
    distance. The two must embed into the same width (the student is the shrunk teacher)."""
    if student.dim != teacher.dim:
        raise ValueError(f"the student embeds into {student.dim} dims, the teacher into "
                         f"{teacher.dim}: distillation needs the student to be a shrunk copy "
                         "of the teacher")
    if len(texts) < 20:
        raise ValueError(f"distillation needs at least 20 profile texts ({len(texts)} here)")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    n_held = int(min(1000, max(10, round(held_out * len(texts)))))
    held, train = order[:n_held], order[n_held:]
    targets = encode_cached(teacher, texts, cache_dir, desc="teacher")
    held_texts, held_targets = [texts[i] for i in held], targets[held]
    torch.manual_seed(seed)
    model = student.model.float().train()
    for parameter in model.parameters():
        parameter.requires_grad = True
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)

    def embed(rows: list[str]) -> torch.Tensor:
        tokens = student.tokenizer(rows, padding=True, truncation=True,
                                   max_length=student.max_length, return_tensors="pt")
        tokens = {k: v.to(student.device) for k, v in tokens.items()}
        return embed_tokens(model, tokens, student.pooling)

    def run_steps(round_: int) -> dict:
        model.train()
        last = min(round_ * eval_every, steps)
        losses = []
        for _ in range((round_ - 1) * eval_every, last):
            rows = train[rng.integers(len(train), size=batch)]
            target = torch.as_tensor(targets[rows], device=student.device)
            loss = cosine_distillation_loss(embed([texts[i] for i in rows]), target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        return {"step": last, "loss": float(np.mean(losses))}

    def held_out_distance() -> float:
        model.eval()
        probe = TextEncoder(model, student.tokenizer, pooling=student.pooling,
                            max_length=student.max_length, batch_size=student.batch_size,
                            device=student.device)
        vectors = probe.encode(held_texts, show_progress=False)
        return float(1.0 - (vectors * held_targets).sum(1).mean())

    before = held_out_distance()
    rounds = -(-steps // eval_every)
    with deterministic_torch():
        history = train_until_no_improvement(
            run_steps, lambda: -held_out_distance(), BestState(model), rounds,
            score_first=True, metric="neg_heldout_distance", label="distill")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad = False
    distilled = TextEncoder(model, student.tokenizer, pooling=student.pooling,
                            max_length=student.max_length, batch_size=student.batch_size,
                            device=student.device, quantize=student.quantize,
                            name=f"{student.name}+distilled")
    after = -history["best_neg_heldout_distance"]  # the kept state's score, not re-measured
    log(f"distill: held-out cosine distance to the teacher {before:.4f} -> {after:.4f}")
    return distilled, {"teacher": teacher.describe(), "texts": len(texts),
                       "held_out_texts": n_held, "steps": steps, "batch": batch, "lr": lr,
                       "heldout_distance_before": round(before, 5),
                       "heldout_distance_after": round(after, 5),
                       "best_step": min(history["best_round"] * eval_every, steps),
                       "seconds": round(time.perf_counter() - started, 1)}
