"""One user and one item vector from several fitted recall models (text, DeepWalk,
GraphSAGE, LightGCN): weighted concatenation with weights tuned on validation, or a learned
linear projection on top of it."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from coreMethod import (BestState, apply_content_map, bpr_epoch, fit_content_map,
                        train_until_no_improvement)
from evaluation import Evaluator
from model.base import Recommender, register, require_validation
from model.config import TrainConfig
from model.text import ENCODER_DIR, save_encoder
from utils import deterministic_torch, pick_device

STATE_FILE = "state.pt"


class ProjectionFusion(torch.nn.Module):
    """Learned fusion: one linear map for users and one for items over the concatenated,
    normalised parts, trained with BPR on training edges."""

    def __init__(self, user_parts: np.ndarray, item_parts: np.ndarray, dim: int) -> None:
        super().__init__()
        self.register_buffer("users", torch.as_tensor(user_parts))
        self.register_buffer("items", torch.as_tensor(item_parts))
        self.user_map = torch.nn.Linear(user_parts.shape[1], dim, bias=False)
        self.item_map = torch.nn.Linear(item_parts.shape[1], dim, bias=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_map(self.users), self.item_map(self.items)


@register
class Fusion(Recommender):
    """'concat': weighted concatenation of the parts (each scaled by its mean row norm),
    weights picked by coordinate ascent on validation Recall@20. 'projection': a learned
    linear map of that concatenation, trained with BPR."""

    _name = "fused"

    def __init__(self, method: str = "concat", dim: int = 64,
                 train: TrainConfig | dict | None = None, seed: int = 2023,
                 device: str = "auto", cold_path: bool = True) -> None:
        super().__init__()
        if method not in ("concat", "projection"):
            raise ValueError(f"unknown fusion '{method}' (concat or projection)")
        self.method, self.dim, self.train_config = method, dim, TrainConfig.coerce(train)
        self.seed, self.device, self.cold_path = seed, device, cold_path
        self.content_parts: list[str] = []
        self.text_projections: dict[str, np.ndarray | None] = {}
        self.cold_maps: dict[str, np.ndarray] = {}  # "part side" -> ridge map from text
        self.weights: dict[str, float] = {}
        self.part_signals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.text_block: list | None = None
        self.text_encoder = None

    def params(self) -> dict:
        return {"method": self.method, "dim": self.dim, "train": vars(self.train_config),
                "seed": self.seed, "device": self.device, "cold_path": self.cold_path}

    @property
    def places_cold_start(self) -> bool:
        return bool(self.content_parts)

    def fit(self, dataset, parts: dict[str, Recommender]) -> "Fusion":
        """`parts`: fitted recall models with vectors, by name, in concatenation order."""
        names = list(parts)
        self.content_parts = [n for n in names if parts[n].places_cold_start]
        user_parts = [parts[n].embeddings()[0] for n in names]
        item_parts = [parts[n].embeddings()[1] for n in names]
        self.training_log, self.cold_maps = {}, {}
        if self.cold_path:
            user_parts, item_parts = self._cold_start_rows(dataset, names, user_parts,
                                                           item_parts)
        validation = Evaluator.on_validation(dataset)
        require_validation(validation)
        # the search scores the validation users' rows only (never an all-users matrix),
        # scaled by each part's mean row norm over all users
        user_norms, item_norms = mean_row_norms(user_parts), mean_row_norms(item_parts)
        user_rows = [part[validation.users] for part in user_parts]
        compact = validation.compacted()

        def score(weights: list[float]) -> float:
            return compact.vector_recall(weighted_concat(user_rows, weights, user_norms),
                                         weighted_concat(item_parts, weights, item_norms))

        weights, val_recall = search_fusion_weights(len(names), score)
        self.weights = dict(zip(names, weights))
        self.part_signals = {n: (user_parts[p], item_parts[p])  # cold rows as placed
                             for p, n in enumerate(names)}
        self.text_encoder = getattr(parts.get("text"), "encoder", None)
        self.training_log.update({"parts": names, "method": self.method,
                                  "fusion_weights": self.weights,
                                  "best_val_recall@20": round(val_recall, 5)})
        self.user_vectors = weighted_concat(user_parts, weights)
        self.item_vectors = weighted_concat(item_parts, weights)
        self.text_block = self._text_block()
        self.text_projections = {side: self._text_projection(names, parts_, side)
                                 for side, parts_ in (("users", user_parts),
                                                      ("items", item_parts))}
        if self.method == "projection":
            self._fit_projection(dataset, validation)
        self._fitted_on(dataset)
        return self

    def _cold_start_rows(self, dataset, names, user_parts, item_parts):
        """The cold-start path. An ID-based part has no trained vector for a user or item
        without training interactions (zeros, or its random initial vector). Where the fused
        model has a text part, such a row of every other part is predicted from its text
        vector by a ridge map fitted on the rows that have both (`fit_content_map`), GraphSAGE
        included, so that a row is placed the same way here and when a bundle places a new
        profile or item (`text_projections`). Without a text part, the ID parts' rows are
        zeroed and the content parts (GraphSAGE's inductive path) alone place it."""
        text = names.index("text") if "text" in names else None
        sides = (("users", user_parts, np.diff(dataset.train.indptr) == 0),
                 ("items", item_parts, np.diff(dataset.train.tocsc().indptr) == 0))
        for side, parts, untrained in sides:
            has_text = np.zeros_like(untrained) if text is None else \
                np.linalg.norm(parts[text], axis=1) > 0
            for position, name in enumerate(names):
                if name == "text" or (text is None and name in self.content_parts):
                    continue
                part = parts[position].copy()
                part[untrained] = 0
                placed, known = untrained & has_text, ~untrained & has_text
                if known.sum() >= 10:
                    weights, strength = fit_content_map(parts[text][known], part[known],
                                                        self.seed)
                    part[placed] = apply_content_map(parts[text][placed], weights)
                    self.cold_maps[f"{name} {side}"] = weights
                    self.training_log.setdefault("cold_start_maps", {})[f"{name} {side}"] = {
                        "rows_placed": int(placed.sum()), "ridge_strength": strength}
                parts[position] = part
        return user_parts, item_parts

    def _text_projection(self, names: list[str], parts: list[np.ndarray],
                         side: str) -> np.ndarray | None:
        """One matrix that takes [text vector, 1] of a new user (profile) or item to its
        whole fused vector: the text block, and each ID part's block through its cold-start
        map, each scaled as `weighted_concat` scaled it. None when there is no text part
        (or a learned projection fusion)."""
        if self.method != "concat" or "text" not in names:
            return None
        text_dim = parts[names.index("text")].shape[1]
        scales = dict(zip(names, concat_scales(parts, [self.weights[n] for n in names])))
        blocks = part_blocks(self.weights, [part.shape[1] for part in parts])
        projection = np.zeros((text_dim + 1, max(end for _, end in blocks.values())),
                              dtype=np.float32)
        for name, (start, end) in blocks.items():
            if name == "text":
                projection[:text_dim, start:end] = np.eye(text_dim) * scales[name]
            elif f"{name} {side}" in self.cold_maps:
                projection[:, start:end] = self.cold_maps[f"{name} {side}"] * scales[name]
        return projection

    def _fit_projection(self, dataset, validation: Evaluator) -> None:
        device = pick_device(self.device)
        torch.manual_seed(self.seed)
        self.net = ProjectionFusion(self.user_vectors, self.item_vectors, self.dim).to(device)
        config, rng = self.train_config, np.random.default_rng(self.seed)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=config.lr)

        def step(round_: int) -> dict:
            last = min(round_ * config.eval_every, config.epochs)
            for epoch in range((round_ - 1) * config.eval_every + 1, last + 1):
                loss = bpr_epoch(self.net, self.net, optimiser, dataset.train, config.batch,
                                 config.weight_decay, rng, device,
                                 f"fusion epoch {epoch}/{config.epochs}")
            return {"epoch": f"{last}/{config.epochs}", "loss": round(loss, 5)}

        def score() -> float:
            with torch.no_grad():
                users, items = (t.cpu().numpy() for t in self.net())
            return validation.vector_recall(users, items)

        rounds = -(-config.epochs // config.eval_every)
        with deterministic_torch():
            log_ = train_until_no_improvement(step, score, BestState(self.net), rounds,
                                              config.patience, label="fusion")
        self.training_log["projection"] = log_
        with torch.no_grad():
            self.user_vectors, self.item_vectors = (t.cpu().numpy() for t in self.net())

    def signals(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The fused vectors and each part's, for a ranker's features."""
        return {self.name: self.embeddings(), **self.part_signals}

    def _text_block(self) -> list | None:
        """[start, end, scale] of the text part inside the fused vectors, when a new
        profile's text vector can be placed there (concat fusion, text weight > 0)."""
        if self.method != "concat" or self.weights.get("text", 0) <= 0:
            return None
        widths = [self.part_signals[n][0].shape[1] for n in self.weights]
        start, end = part_blocks(self.weights, widths)["text"]
        [scale] = concat_scales([self.part_signals["text"][0]], [self.weights["text"]])
        return [start, end, scale]

    def _state(self) -> dict:
        return {"weights": self.weights, "text_block": self.text_block,
                "parts": list(self.part_signals), "content_parts": self.content_parts,
                "cold_maps": list(self.cold_maps)}

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for position, (users, items) in enumerate(self.part_signals.values()):
            arrays[f"part{position}_users"], arrays[f"part{position}_items"] = users, items
        for position, weights in enumerate(self.cold_maps.values()):
            arrays[f"cold_map{position}"] = weights
        for side, projection in self.text_projections.items():
            if projection is not None:
                arrays[f"text_projection_{side}"] = projection
        return arrays

    def _save_extra(self, folder: Path) -> None:
        """The text part's encoder, so a new profile can be placed in the text block."""
        if self.text_block and self.text_encoder is not None:
            save_encoder(self.text_encoder, folder / ENCODER_DIR)
        if self.method == "projection":
            torch.save({k: v.cpu() for k, v in self.net.state_dict().items()
                        if k.endswith("_map.weight")}, folder / STATE_FILE)

    def _restore(self, state: dict, arrays: dict, folder: Path) -> None:
        self.weights = state.get("weights", {})
        self.text_block = state.get("text_block")
        self.content_parts = state.get("content_parts", [])
        self.cold_maps = {name: arrays[f"cold_map{p}"]
                          for p, name in enumerate(state.get("cold_maps", []))}
        self.text_projections = {side: arrays.get(f"text_projection_{side}")
                                 for side in ("users", "items")}
        self.part_signals = {name: (arrays[f"part{p}_users"], arrays[f"part{p}_items"])
                             for p, name in enumerate(state.get("parts", []))}


def mean_row_norms(parts: list[np.ndarray]) -> list[float]:
    """Per part, the mean norm of its non-zero rows (1 when every row is zero)."""
    means = []
    for part in parts:
        norms = np.linalg.norm(part, axis=1)
        means.append(float(norms[norms > 0].mean()) if (norms > 0).any() else 1.0)
    return means


def concat_scales(parts: list[np.ndarray], weights: list[float],
                  norms: list[float] | None = None) -> list[float]:
    """Per part, sqrt(weight) / its mean (non-zero) row norm (`norms`, when the parts are
    some rows of the whole): the factor `weighted_concat` applies to it (and a bundle to a
    new row's block)."""
    norms = mean_row_norms(parts) if norms is None else norms
    return [float(np.sqrt(weight) / norm) for weight, norm in zip(weights, norms)]


def part_blocks(weights: dict[str, float], widths: list[int]) -> dict[str, tuple[int, int]]:
    """Each part's (start, end) columns in the vectors `weighted_concat` builds from parts of
    these `widths`, in the order of `weights`; a part of weight 0 has no block."""
    blocks, start = {}, 0
    for (name, weight), width in zip(weights.items(), widths):
        if weight > 0:
            blocks[name], start = (start, start + width), start + width
    return blocks


def weighted_concat(parts: list[np.ndarray], weights: list[float],
                    norms: list[float] | None = None) -> np.ndarray:
    """Concatenate parts, each divided by its mean row norm and scaled by sqrt(weight); a
    part of weight 0 is left out (it would add columns of zeros to every vector).

    A global scale (not a per-row one) keeps what each model learnt in its vector norms:
    LightGCN and GraphSAGE score by inner product, and their norms carry popularity. The
    inner product of a fused user and item is sum_p w_p <u_p, i_p> / (|u_p| |i_p|)_mean.
    """
    scales = concat_scales(parts, weights, norms)
    kept = [part * scale for part, scale, weight in zip(parts, scales, weights) if weight > 0]
    if not kept:
        raise ValueError("every fusion weight is 0: no part to concatenate")
    return np.hstack(kept).astype(np.float32)


def search_fusion_weights(n_parts: int, score: Callable[[list[float]], float],
                          grid: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0),
                          rounds: int = 2) -> tuple[list[float], float]:
    """Weights per part by a validation score of the weighted parts: start from the best
    single part (weight 1, others 0), then coordinate ascent over `grid` for the others.
    The result is never worse on validation than the best part alone."""
    singles = [score([1.0 if p == q else 0.0 for q in range(n_parts)]) for p in range(n_parts)]
    anchor = int(np.argmax(singles))
    weights = [1.0 if p == anchor else 0.0 for p in range(n_parts)]
    best = singles[anchor]
    for _ in range(rounds):
        improved = False
        for part in range(n_parts):
            if part == anchor:
                continue
            for value in grid:
                candidate = weights.copy()
                candidate[part] = value
                if candidate == weights:
                    continue
                result = score(candidate)
                if result > best + 1e-6:
                    best, weights, improved = result, candidate, True
        if not improved:
            break
    return weights, best
