"""The ranking stage: the Wide&Deep network over the features of (user, candidate item)
pairs (`model.ranking_features`), and `WideDeepRanker` (fit on the recall channels'
candidates, recommend, save, load)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from coreMethod import (BestState, grouped_softmax_loss, ranking_pairs, rerank_with_scores,
                        train_until_no_improvement, user_batches)
from evaluation import Evaluator, users_with_test_items
from model.base import Unavailable
from model.candidates import ChannelCandidates, ItemItemChannel, channel_retrievers
from model.ranking_features import HASH_SIZE, RankingFeatures
from utils import (atomic_path, average_gradients, data_parallel, deterministic_torch, log,
                   pick_device, rank0_value, write_json_atomic)


class WideDeep(torch.nn.Module):
    """Wide: a linear model over hashed one-hot and crossed features (memorisation).
    Deep: an MLP over dense features, embeddings of segments and buckets, and projections
    of the user and item vectors with their element-wise product (generalisation).
    mode: 'widedeep' (joint), 'wide' or 'deep' (ablations). Output: logits."""

    def __init__(self, features: RankingFeatures, mode: str = "widedeep",
                 hidden: tuple[int, ...] = (128, 64), embedding_dim: int = 8,
                 projection_dim: int = 32) -> None:
        super().__init__()
        if mode not in ("widedeep", "wide", "deep"):
            raise ValueError(f"unknown ranker mode '{mode}' (widedeep, wide or deep)")
        self.mode = mode
        self.wide = torch.nn.EmbeddingBag(HASH_SIZE, 1, mode="sum")
        torch.nn.init.zeros_(self.wide.weight)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("user_vectors", torch.as_tensor(features.user_vectors))
        self.register_buffer("item_vectors", torch.as_tensor(features.item_vectors))
        self.register_buffer("dense_mean", torch.zeros(features.n_dense))
        self.register_buffer("dense_std", torch.ones(features.n_dense))
        self.categorical = torch.nn.ModuleList(
            torch.nn.Embedding(size, embedding_dim) for size in features.categorical_sizes())
        dim = features.user_vectors.shape[1]
        self.user_projection = torch.nn.Linear(dim, projection_dim)
        self.item_projection = torch.nn.Linear(dim, projection_dim)
        layers, width = [], features.n_dense + embedding_dim * len(self.categorical) \
            + 3 * projection_dim
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
            width = size
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def shift_parameters(self) -> list[torch.nn.Parameter]:
        """The output biases: they shift every logit alike, which a softmax over a user's
        candidates ignores (their gradient is float noise that Adam would turn into steps)."""
        return [self.bias, self.mlp[-1].bias]

    def set_dense_scaling(self, dense: torch.Tensor) -> None:
        self.dense_mean.copy_(dense.mean(0))
        self.dense_std.copy_(dense.std(0).clamp(min=1e-6))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logit = self.bias.expand(len(batch["dense"]))
        if self.mode in ("widedeep", "wide"):
            logit = logit + self.wide(batch["wide"]).squeeze(-1)
        if self.mode in ("widedeep", "deep"):
            user = self._projected(self.user_projection, self.user_vectors, batch["users"])
            item = self._projected(self.item_projection, self.item_vectors, batch["items"])
            parts = [(batch["dense"] - self.dense_mean) / self.dense_std, user, item, user * item]
            parts += [table(batch["categorical"][:, k]) for k, table in enumerate(self.categorical)]
            logit = logit + self.mlp(torch.cat(parts, dim=1)).squeeze(-1)
        return logit

    def _projected(self, projection: torch.nn.Linear, vectors: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        """projection(vectors[rows]); when scoring (no grad), each distinct row is projected
        once and then gathered: the same values up to float rounding, far less work (a
        user's candidates share one user row; the fused vectors are wide)."""
        if torch.is_grad_enabled():
            return projection(vectors[rows])
        distinct, position = torch.unique(rows, return_inverse=True)
        return projection(vectors[distinct])[position]

    def score(self, features: RankingFeatures, users: np.ndarray, items: np.ndarray,
              ranks: np.ndarray) -> np.ndarray:
        """Scores of pairs (users[r], items[r]) at recall rank ranks[r]; -inf where
        items[r] is -1 (padding)."""
        batches = pair_batches(features, users, items, ranks, self.bias.device)
        return ensemble_scores([self], batches, len(users))


def pair_batches(features: RankingFeatures, users: np.ndarray, items: np.ndarray,
                 ranks: np.ndarray, device, chunk: int = 65536):
    """(rows, feature tensors on `device`) of the pairs that are not padding (items[r] >= 0),
    `chunk` pairs at a time."""
    valid = np.flatnonzero(items >= 0)
    for start in range(0, len(valid), chunk):
        rows = valid[start:start + chunk]
        yield rows, on_device(features.build(users[rows], items[rows], ranks[rows]), device)


@torch.no_grad()
def ensemble_scores(nets: list[WideDeep], batches, n_pairs: int) -> np.ndarray:
    """The mean of the networks' logits for each pair of `batches` ((rows, tensors), built
    once for all networks); -inf for the other rows of `n_pairs`."""
    for net in nets:
        net.eval()
    out = np.full(n_pairs, -np.inf, dtype=np.float32)
    for rows, batch in batches:
        out[rows] = torch.stack([net(batch) for net in nets]).mean(0).float().cpu().numpy()
    return out


def on_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


RANKER_FILE = "ranker.json"
PAIR_USERS = 50_000  # users whose candidates are held at once while training pairs are drawn
MEMBER_LOG = ("seed", "best_epoch", "best_val_ndcg@20", "kept_recall_order", "training_pairs")
RANKER_FORMAT = 4  # 2: multi-channel candidates, per-channel score and rank features;
# 3: item-item model scores, the training history; 4: item-item models as channels


class WideDeepRanker:
    """The ranking stage: re-orders the union of several recall channels' candidates.

    The channels are the recall model's signals: a fused model and each of its parts (ALS,
    LightGCN, text, ...). The recall model's own top `candidates` come first; every other
    channel adds its top `channel_candidates`. Per channel, a pair's score and rank are
    features, so the ranker can trust each channel where it is strong.

    Score-only item-item models (RP3beta, EASE, item-kNN) given to `fit` add their score of
    each pair as a feature and, with `item_item_channels`, their own top
    `channel_candidates` to the union (and their rank as a feature).

    Trained without leakage: features from training interactions only; positives are the
    validation items among the candidates of half of the validation users (or training pairs
    with positives='train'); negatives are their other candidates (hard) and random items; the
    other half of the validation users checks NDCG@20 after every epoch. If no epoch beats
    the recall order on validation, the recall order is kept. loss='softmax' (listwise): each
    positive against its user's negatives, batches of whole users; 'bce': pointwise.
    """

    def __init__(self, mode: str = "widedeep", candidates: int = 200, positives: str = "val",
                 hard_negatives: int = 4, random_negatives: int = 2, epochs: int = 20,
                 lr: float = 3e-4, batch: int = 512, seed: int = 2023,
                 device: str = "auto", channel_candidates: int = 50,
                 loss: str = "softmax", patience: int | None = 4, members: int = 3,
                 item_item_channels: bool = True) -> None:
        if positives not in ("val", "train"):
            raise ValueError(f"positives must be 'val' or 'train', got {positives!r}")
        if loss not in ("softmax", "bce"):
            raise ValueError(f"loss must be 'softmax' or 'bce', got {loss!r}")
        if members < 1:
            raise ValueError(f"members must be at least 1, got {members}")
        self.loss, self.patience, self.members = loss, patience, members
        self.mode, self.candidates, self.positives = mode, candidates, positives
        self.channel_candidates, self.item_item_channels = channel_candidates, item_item_channels
        self.hard_negatives, self.random_negatives = hard_negatives, random_negatives
        self.epochs, self.lr, self.batch, self.seed, self.device = epochs, lr, batch, seed, device
        self.net: WideDeep | None = None  # the member being trained (the first, after fit)
        self.member_seed = seed  # the seed of the member being trained
        self.nets: list[WideDeep] = []
        self.features: RankingFeatures | None = None
        self.recall_name, self.kept_recall_order = "", False
        self.training_log: dict = {}
        self._retrievers: dict | None = None
        self.channel_index = ("flat", 0)  # a bundle may serve with HNSW channels

    def params(self) -> dict:
        return {"mode": self.mode, "candidates": self.candidates, "positives": self.positives,
                "hard_negatives": self.hard_negatives, "random_negatives": self.random_negatives,
                "epochs": self.epochs, "lr": self.lr, "batch": self.batch, "seed": self.seed,
                "device": self.device, "channel_candidates": self.channel_candidates,
                "loss": self.loss, "patience": self.patience, "members": self.members,
                "item_item_channels": self.item_item_channels}

    def __getstate__(self) -> dict:  # pickled for Ray Train workers: FAISS indexes rebuilt
        return {**self.__dict__, "_retrievers": None, "nets": []}  # workers train `net` only

    def fit(self, dataset, recall, train_loop=None,
            item_item: dict[str, sp.csr_matrix] | None = None) -> "WideDeepRanker":
        """Train on the candidates of `recall` (a fitted recall model) and its parts;
        `train_loop`: runs `WideDeepRanker.train_loop` elsewhere (`model.ddp`), same
        arguments; `item_item`: name -> item x item weights (`sparse_weights()` of a fitted
        RP3beta, EASE or ItemKNN) whose pair scores become features."""
        device = pick_device(self.device)
        self.recall_name = recall.name
        if self.positives == "train" and item_item:
            log("ranker: no item-item features with training positives (their scores "
                "count the pair itself)")
            item_item = None
        self.features = RankingFeatures(dataset.train, recall.signals(), recall.name,
                                        seed=self.seed, item_item=item_item,
                                        item_item_channels=self.item_item_channels)
        self._retrievers = None
        val_users = users_with_test_items(dataset.val)
        if len(val_users) < 2:
            raise Unavailable("the ranker needs validation interactions of at least two users")
        validation = Evaluator.on_validation(dataset, max_users=None)
        self.nets, logs = [], []
        for member in range(self.members):
            logs.append(self._fit_member(dataset, val_users, self.seed + member, validation,
                                         train_loop or WideDeepRanker.train_loop, device))
            if not self.kept_recall_order:  # a member that never beat recall adds nothing
                self.nets.append(self.net)
        self.kept_recall_order = not self.nets
        self.net = self.nets[0] if self.nets else self.net
        first = next((log_ for log_ in logs if not log_["kept_recall_order"]), logs[0])
        self.training_log = {**first, "kept_recall_order": self.kept_recall_order,
                             "members": [{key: member[key] for key in MEMBER_LOG}
                                         for member in logs]}
        self.training_log.update(
            recall_model=recall.name, channels=self.features.rank_channels, mode=self.mode,
            item_item_features=list(self.features.item_item), loss=self.loss,
            candidates=self.candidates, channel_candidates=self.channel_candidates,
            positives=self.positives, device=device)
        return self

    def _fit_member(self, dataset, val_users: np.ndarray, seed: int, validation: Evaluator,
                    train_loop, device: str) -> dict:
        """One network of the ensemble: its own split of the validation users into fitting
        and checking halves, its own pairs and initial weights (`seed`); leaves it in
        `self.net` and returns its training log."""
        rng = np.random.default_rng(seed)
        val_users = rng.permutation(val_users)
        check_users = np.sort(val_users[: min(3000, len(val_users) // 2)])
        if self.positives == "val":
            fit_users, positives = np.sort(val_users[len(check_users):]), dataset.val
        else:
            fit_users, positives = np.flatnonzero(np.diff(dataset.train.indptr) > 0), dataset.train
        users, items, ranks, labels = self._training_pairs(positives, fit_users,
                                                           dataset.train, rng)
        torch.manual_seed(seed)
        self.net, self.member_seed = WideDeep(self.features, self.mode).to(device), seed
        check = self.channel_candidates_of(check_users, dataset.train)
        log_ = train_loop(self, (users, items, ranks, labels), check, validation, device)
        return {**log_, "seed": seed, "training_pairs": int(len(labels)),
                "mean_union_size": round(float((check.candidates >= 0).sum(1).mean()), 1)}

    def _training_pairs(self, positives: sp.csr_matrix, fit_users: np.ndarray,
                        train: sp.csr_matrix, rng: np.random.Generator) -> tuple:
        """(users, items, channel ranks, labels) of the training pairs (`ranking_pairs`),
        built PAIR_USERS users at a time: only the sampled pairs are kept, never every
        user's candidates at once; shuffled together when there is more than one block."""
        blocks = []
        for start in range(0, len(fit_users), PAIR_USERS):
            block = fit_users[start:start + PAIR_USERS]
            channels = self.channel_candidates_of(block, train)
            users, items, _, labels = ranking_pairs(
                positives, block, channels.candidates, self.hard_negatives,
                self.random_negatives, rng, within_candidates=self.positives == "val")
            blocks.append((users, items, self._visible(channels.ranks(users, items)), labels))
        if len(blocks) == 1:
            return blocks[0]
        order = rng.permutation(sum(len(block[0]) for block in blocks))
        return tuple(np.concatenate(column)[order] for column in zip(*blocks))

    @property
    def union_size(self) -> int:
        """The most candidates a user's union holds (every channel's list, no overlap)."""
        return self.candidates + self.channel_candidates * (len(self.features.rank_channels) - 1)

    def channel_candidates_of(self, users: np.ndarray, exclude: sp.csr_matrix | None,
                              k: int = 0) -> ChannelCandidates:
        """The union of the channels' candidates for `users` (items of `exclude` removed);
        the primary channel gives at least `k`."""
        n_other = len(self.features.rank_channels) - 1
        widths = [max(self.candidates, k)] + [self.channel_candidates] * n_other
        if self._retrievers is None:  # built once: a served ranker answers one user at a time
            kind, width = self.channel_index
            self._retrievers = channel_retrievers(self.features.channels(), kind,
                                                  max(width, max(widths)))
            if self.features.item_item_channels:
                self._retrievers.update({
                    name: ItemItemChannel(self.features.history, weights)
                    for name, weights in self.features.item_item.items()})
        return ChannelCandidates(self._retrievers, users, exclude, max(widths), widths,
                                 len(self.features.popularity))

    def train_loop(self, pairs, check: ChannelCandidates, validation: Evaluator,
                   device: str) -> dict:
        """Epochs over the labelled pairs until validation NDCG@20 of the `check` users stops
        improving. In a process group every rank takes its share of each global batch,
        gradients are averaged (the global batch's mean loss) and rank 0's score decides."""
        rank, world = data_parallel()
        users, items, ranks, labels = pairs  # in random order (`ranking_pairs`)
        self.net.set_dense_scaling(self.features.build(users[:50000], items[:50000],
                                                       ranks[:50000])["dense"].to(device))
        if self.loss == "softmax":  # batches of whole users: the pairs sorted by user
            order = np.argsort(users, kind="stable")
            users, items, ranks, labels = users[order], items[order], ranks[order], labels[order]
        for parameter in self.net.shift_parameters() if self.loss == "softmax" else []:
            parameter.requires_grad_(False)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        shuffle = np.random.default_rng(self.member_seed)
        check_split = validation.restricted(check.users)
        check_batches = list(self._candidate_batches(check, device)) if rank == 0 else None
        log(f"ranker ({self.mode}, {self.loss}): {len(labels):,} pairs "
            f"({int(labels.sum()):,} positive), {len(self.features.rank_channels)} channels, "
            f"{len(self.features.item_item)} item-item features")

        def batches() -> list[np.ndarray]:
            if self.loss == "softmax":
                return user_batches(users, self.batch, shuffle)
            return [np.arange(start, min(start + self.batch, len(labels)))
                    for start in range(0, len(labels), self.batch)]

        def share(batch_rows: np.ndarray) -> np.ndarray:  # this rank's rows (whole users)
            if self.loss == "bce":
                return np.array_split(batch_rows, world)[rank]
            mine = np.array_split(np.unique(users[batch_rows]), world)[rank]
            return batch_rows[np.isin(users[batch_rows], mine)]

        def batch_loss(rows: np.ndarray, batch_rows: np.ndarray) -> torch.Tensor:
            """This rank's part of the global batch's mean loss, times the number of ranks
            (averaging the ranks' gradients then gives the global batch's gradient)."""
            logits = self.net(on_device(self.features.build(users[rows], items[rows],
                                                            ranks[rows]), device))
            target = torch.as_tensor(labels[rows], device=device)
            if self.loss == "bce":
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
                return loss * (len(rows) * world / len(batch_rows)) if world > 1 else loss
            groups = torch.as_tensor(np.unique(users[rows], return_inverse=True)[1],
                                     device=device)
            return grouped_softmax_loss(logits, target, groups) * (
                world / max(float(labels[batch_rows].sum()), 1.0))

        trained = []

        def epoch(round_: int) -> dict:
            trained.append(round_)
            self.net.train()
            for batch_rows in batches():
                rows = share(batch_rows)
                optimiser.zero_grad(set_to_none=True)
                if len(rows):  # (a rank without rows still joins the gradient average)
                    batch_loss(rows, batch_rows).backward()
                average_gradients(self.net.parameters())
                optimiser.step()
            return {"epoch": f"{round_}/{self.epochs}"}

        def score() -> float:  # before the first epoch: the recall order itself
            self.kept_recall_order = not trained
            if rank != 0:
                return rank0_value(0.0)
            order = self._order(check, [self.net], check_batches)[0]
            padding = np.full((len(order), max(0, 20 - order.shape[1])), -1, dtype=order.dtype)
            return rank0_value(check_split.mean(np.hstack([order, padding]), "ndcg", 20))

        with deterministic_torch():
            log_ = train_until_no_improvement(epoch, score, BestState(self.net), self.epochs,
                                              self.patience, score_first=True,
                                              metric="val_ndcg@20",
                                              label=f"ranker ({self.mode})")
        self.kept_recall_order = log_["best_round"] == 0
        return {"best_epoch": log_["best_round"], "best_val_ndcg@20": log_["best_val_ndcg@20"],
                "kept_recall_order": self.kept_recall_order, "history": log_["history"]}

    def _candidate_batches(self, channels: ChannelCandidates, device):
        """The feature tensors of every (user, union candidate) pair of `channels`, in the
        order `rerank_with_scores` scores them, a chunk at a time. Kept as a list for the
        checking users, whose candidates are scored after every epoch (3,000 users x a union
        of ~300 candidates: about 200 MB on the training device while one network trains)."""
        users = np.repeat(channels.users, channels.candidates.shape[1])
        items = channels.candidates.ravel()
        ranks = self._visible(channels.ranks(users, items))
        return pair_batches(self.features, users, items, ranks, device)

    def _visible(self, ranks: np.ndarray) -> np.ndarray:
        """The channel ranks as features, except with training positives: those are never
        among the candidates (training items are excluded), so their rank would give the
        label away."""
        return np.zeros_like(ranks) if self.positives == "train" else ranks

    def _order(self, channels: ChannelCandidates, nets: list[WideDeep] | None = None,
               batches: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(union candidates, their scores) in the order of `nets` (the ensemble by default),
        or in recall order with the recall model's scores if that order was kept; `batches`:
        the pairs' features from `_candidate_batches`, if built already."""
        if self.kept_recall_order:
            candidates = channels.candidates
            users = np.repeat(channels.users, candidates.shape[1])
            scores = self.features.primary_scores(users, np.maximum(candidates.ravel(), 0))
            return candidates, np.where(candidates >= 0, scores.reshape(candidates.shape),
                                        -np.inf)
        nets = self.nets if nets is None else nets
        if batches is None:
            batches = self._candidate_batches(channels, nets[0].bias.device)
        return rerank_with_scores(lambda u, i, _: ensemble_scores(nets, batches, len(u)),
                                  channels.users, channels.candidates)

    def recommend(self, users: np.ndarray, exclude: sp.csr_matrix | None, k: int,
                  chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """(items, scores) of shape (len(users), k): the two-stage top k, items of `exclude`
        never included; scores are the ranker's (the recall model's if its order was kept);
        -1 / -inf pad short lists."""
        users = np.asarray(users)
        top_items = np.full((len(users), k), -1, dtype=np.int64)
        top_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        for start in range(0, len(users), chunk):
            rows = slice(start, start + chunk)
            ordered, scores = self._order(self.channel_candidates_of(
                users[rows], exclude, k if k > self.union_size else 0))
            width = min(k, ordered.shape[1])
            top_items[rows, :width], top_scores[rows, :width] = \
                ordered[:, :width], scores[:, :width]
        return top_items, top_scores

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        folder = Path(folder)
        with atomic_path(folder, RANKER_FILE, overwrite) as tmp:
            tmp.mkdir(parents=True)
            np.savez(tmp / "features.npz", **self.features.arrays())
            torch.save({"members": [{k: v.cpu() for k, v in net.state_dict().items()}
                                    for net in self.nets or [self.net]]}, tmp / "state.pt")
            write_json_atomic(tmp / RANKER_FILE, {
                "format_version": RANKER_FORMAT, "params": self.params(),
                "recall_model": self.recall_name, "signals": list(self.features.signals),
                "item_item": list(self.features.item_item),
                "item_item_channels": self.features.item_item_channels,
                "n_segments": self.features.n_segments,
                "kept_recall_order": self.kept_recall_order, "training_log": self.training_log})
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> "WideDeepRanker":
        folder = Path(folder)
        if not (folder / RANKER_FILE).exists():
            raise ValueError(f"{folder}: not a saved ranker (no {RANKER_FILE})")
        description = json.loads((folder / RANKER_FILE).read_text())
        if description.get("format_version") not in (3, RANKER_FORMAT):
            raise ValueError(f"{folder}: a ranker of format {description.get('format_version', 1)}"
                             f"; this version reads formats 3 and {RANKER_FORMAT} (train it again: "
                             "`run --rank widedeep`, then export a new bundle)")
        ranker = cls(**{**description["params"], "device": device,  # format 3: no channels
                        "item_item_channels": description.get("item_item_channels", False)})
        with np.load(folder / "features.npz", allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
        ranker.recall_name = description["recall_model"]
        ranker.features = RankingFeatures.from_arrays(arrays, description["signals"],
                                                      ranker.recall_name,
                                                      description["n_segments"],
                                                      description["item_item"],
                                                      ranker.item_item_channels)
        ranker.nets = []
        for state in torch.load(folder / "state.pt", weights_only=True)["members"]:
            ranker.nets.append(WideDeep(ranker.features, ranker.mode))
            ranker.nets[-1].load_state_dict(state)
            ranker.nets[-1].to(pick_device(device)).eval()
        ranker.net = ranker.nets[0]
        ranker.kept_recall_order = description["kept_recall_order"]
        ranker.training_log = description.get("training_log", {})
        return ranker
