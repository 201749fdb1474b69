"""Contrastive fine-tuning of the shrunken encoder: InfoNCE between a user's written profile
and their training items' profiles (plus co-visited item pairs), early-stopped on a
validation probe. The method (full, BitFit, LoRA, adapters, prompt, prefix) is chosen in
`model.finetune`."""
from __future__ import annotations

import numpy as np
import torch

from coreMethod import (BestState, distinct_pairs, gathered_info_nce, mean_of_items,
                        mixed_precision, profile_pairs, sample_item_pairs,
                        train_until_no_improvement)
from evaluation import Evaluator
from model.config import FinetuneConfig
from model.finetune import count_parameters, finished, prepare
from model.text import TextEncoder, embed_tokens
from utils import (average_gradients, data_parallel, deterministic_torch, log, mean_over_ranks,
                   rank0_value)


class ValidationProbe:
    """Validation Recall@20 over a fixed item pool (the probe users' validation items plus
    random items), training items excluded, for two kinds of users as the text model serves
    them: users with a written profile (encoded) and users without one (mean of their
    encoded training items). Cheap enough to run during fine-tuning; never reads the test
    split."""

    def __init__(self, dataset, max_users: int = 500, max_mean_users: int = 200,
                 extra_items: int = 1500, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        has_text = np.array([p is not None for p in dataset.item_profiles])
        with_val = np.diff(dataset.val.indptr) > 0
        written = dataset.user_profile_source == "written"
        has_text_train = np.asarray((dataset.train > 0) @ has_text.astype(np.float32)).ravel() > 0
        self.users = np.sort(rng.permutation(np.flatnonzero(with_val & written))[:max_users])
        self.mean_users = np.sort(rng.permutation(
            np.flatnonzero(with_val & ~written & has_text_train))[:max_mean_users])
        probe_users = np.concatenate([self.users, self.mean_users])
        pool = set(dataset.val[probe_users].indices.tolist())
        pool |= set(rng.choice(np.flatnonzero(has_text), min(extra_items, int(has_text.sum())),
                               replace=False).tolist())
        self.items = np.array(sorted(i for i in pool if has_text[i]), dtype=np.int64)
        self.encoded_items = np.union1d(self.items, np.flatnonzero(
            has_text & (np.asarray(dataset.train[self.mean_users].sum(0)).ravel() > 0)))
        self.evaluator = Evaluator(dataset.val, dataset.train, (20,), probe_users)
        self.dataset = dataset

    def recall(self, encoder: TextEncoder) -> float:
        data = self.dataset
        if len(self.evaluator.users) == 0:
            return float("nan")
        item_vectors = np.zeros((data.n_items, encoder.dim), dtype=np.float32)
        item_vectors[self.encoded_items] = encoder.encode(
            [data.item_profiles[i] for i in self.encoded_items], show_progress=False)
        usable = np.zeros(data.n_items, dtype=bool)
        usable[self.encoded_items] = True
        user_vectors = np.zeros((data.n_users, encoder.dim), dtype=np.float32)
        user_vectors[self.mean_users] = mean_of_items(data.train[self.mean_users], item_vectors,
                                                      usable)
        user_vectors[self.users] = encoder.encode([data.user_profiles[u] for u in self.users],
                                                  show_progress=False)
        top = self.evaluator.top_of_vectors(user_vectors, item_vectors, 20, items=self.items)
        return self.evaluator.mean(top, "recall", 20)


def finetune_encoder(encoder: TextEncoder, dataset, method: str, config: FinetuneConfig,
                     seed: int = 2023) -> tuple[TextEncoder, dict]:
    """Contrastive fine-tuning of `encoder` on (written user profile, item profile) pairs,
    plus (item, item) pairs from the same user's training items when `ft_item_weight` > 0.

    Returns a new TextEncoder (LoRA merged) and a log with trainable parameter counts and
    the validation Recall@20 history; the best checkpoint by that metric is kept (the
    zero-shot weights when no step beats them).

    In a process group (`model.ddp.finetune_on_ray`), every rank draws the same global batch,
    encodes its share, and takes the InfoNCE negatives from all ranks (`gathered_info_nce`);
    gradients are averaged over the ranks and rank 0's validation probe decides for all.
    """
    rank, world = data_parallel()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = profile_pairs(dataset, rng)
    has_text = np.array([p is not None for p in dataset.item_profiles])
    if len(pairs) == 0:
        raise ValueError("no training pairs: fine-tuning needs users with written profiles")
    trainable = prepare(encoder.model, method)
    parameters = count_parameters(trainable)
    learning_rate = config.learning_rate(method)
    optimiser = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad],
                                  lr=learning_rate)
    settings = dict(pooling=encoder.pooling, max_length=encoder.max_length,
                    batch_size=encoder.batch_size, device=encoder.device)
    probe = ValidationProbe(dataset, seed=seed)
    log(f"fine-tune ({method}): {len(pairs):,} pairs, {parameters['trainable']:,} of "
        f"{parameters['total']:,} parameters trainable")

    def embed(texts: list[str]) -> torch.Tensor:
        if not texts:  # a rank without rows this step still joins the collectives,
            # backward's included (hence a tensor that requires a gradient)
            return torch.zeros((0, encoder.dim), device=encoder.device, requires_grad=True)
        tokens = encoder.tokenizer(texts, padding=True, truncation=True,
                                   max_length=config.ft_max_length, return_tensors="pt")
        tokens = {k: v.to(encoder.device) for k, v in tokens.items()}
        return torch.nn.functional.normalize(embed_tokens(trainable, tokens, encoder.pooling),
                                             dim=-1)

    def item_texts(items: np.ndarray) -> list[str]:
        return [dataset.item_profiles[i] for i in items]

    autocast, scaler = mixed_precision(encoder.device, config.ft_amp)

    def one_step() -> float:
        rows = np.array_split(distinct_pairs(pairs[rng.integers(len(pairs),
                                                               size=config.ft_batch)]), world)[rank]
        with autocast:
            users = embed([dataset.user_profiles[u] for u in rows[:, 0]])
            loss = gathered_info_nce(users, embed(item_texts(rows[:, 1])), config.ft_temperature)
            if config.ft_item_weight > 0:
                items = np.array_split(distinct_pairs(sample_item_pairs(
                    dataset.train, has_text, config.ft_batch, rng), shared_space=True), world)[rank]
                item_loss = gathered_info_nce(embed(item_texts(items[:, 0])),
                                              embed(item_texts(items[:, 1])),
                                              config.ft_temperature)
                loss = loss + config.ft_item_weight * item_loss
        optimiser.zero_grad()
        scaler.scale(loss).backward()
        average_gradients(trainable.parameters())
        scaler.step(optimiser)
        scaler.update()
        return mean_over_ranks(loss.item())  # the global batch's loss

    def run_steps(round_: int) -> dict:
        trainable.train()
        last = min(round_ * config.ft_eval_every, config.ft_steps)
        loss = [one_step() for _ in range((round_ - 1) * config.ft_eval_every, last)][-1]
        return {"step": last, "loss": loss}

    def probe_recall() -> float:  # rank 0 measures; every rank gets its figure
        recall = probe.recall(TextEncoder(trainable, encoder.tokenizer, **settings)) \
            if rank == 0 else 0.0
        trainable.train()
        return rank0_value(recall)

    rounds = -(-config.ft_steps // config.ft_eval_every)
    with deterministic_torch():
        log_ = train_until_no_improvement(run_steps, probe_recall, BestState(trainable), rounds,
                                          score_first=True, label=f"fine-tune ({method})")
    model = finished(trainable, method).eval()
    for parameter in model.parameters():
        parameter.requires_grad = False
    tuned = TextEncoder(model, encoder.tokenizer, quantize=encoder.quantize,
                        name=f"{encoder.name}+{method}", **settings)
    history = [{"step": h.get("step", 0), **{k: v for k, v in h.items() if k != "round"}}
               for h in log_["history"]]
    best_step = history[[h["round"] for h in log_["history"]].index(log_["best_round"])]["step"]
    return tuned, {"method": method, "learning_rate": learning_rate,
                   "trainable_parameters": parameters["trainable"],
                   "total_parameters": parameters["total"], "pairs": int(len(pairs)),
                   "best_step": best_step, "best_val_recall@20": log_["best_val_recall@20"],
                   "history": history}
