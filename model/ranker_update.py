"""The ranker's part of a daily update: its features grown to the new version's rows, and
one warm-started epoch on the day's new positives, kept only if validation agrees.

Features: history, activity and popularity come from the version's interactions (activity
and popularity buckets keep their trained edges); the primary channel is the version's own
vectors (what its recall serves) where the update moved or added a row, the trained ones
elsewhere; every other channel keeps its trained rows and places a new item at the mean of
its users' vectors, then a new user at the mean of its items' (a fold-in with no training);
a new row joins the segment whose centre (the mean of its trained members) is nearest;
item-item weights know no new item (zero weight, as for an item no one had co-visited).

The epoch: each network of the ensemble takes one pass, from its trained weights, over the
day's new pairs of users known the day before that its candidates held (positives) against
the users' other candidates and random items (negatives), with the features of the day
before (so a pair's own interaction is not already in its history), the training loss,
batches and learning rate. With validation pairs the networks' ranked NDCG@20 on them
decides between the trained and the updated weights.
"""
from __future__ import annotations

import copy

import numpy as np
import scipy.sparse as sp
import torch

from coreMethod import grouped_softmax_loss, ranking_pairs, unit_rows, user_batches
from evaluation import per_user_metrics
from model.foldin import grown_by_neighbours
from model.ranking import WideDeepRanker, on_device
from model.ranking_features import N_BUCKETS, RankingFeatures
from utils import deterministic_torch


def grown_features(features: RankingFeatures, seen: sp.csr_matrix,
                   primary: tuple[np.ndarray, np.ndarray] | None) -> RankingFeatures:
    """`features` over the rows of `seen` (the parent's rows first, new rows appended);
    `primary`: the primary channel's vectors (None: grown like the other channels)."""
    n_items = seen.shape[1]
    grown = RankingFeatures(None, {}, "")
    grown.history = sp.csr_matrix(seen > 0, dtype=np.float32)
    grown.item_item, grown.item_item_channels = {}, features.item_item_channels
    for name, weights in features.item_item.items():
        weights = weights.copy()
        weights.resize((n_items, n_items))
        grown.item_item[name] = weights
    grown.activity = np.log1p(np.diff(grown.history.indptr)).astype(np.float32)
    grown.popularity = np.log1p(np.bincount(grown.history.indices, minlength=n_items)
                                ).astype(np.float32)
    grown.activity_bucket = _buckets_like(features.activity, features.activity_bucket,
                                          grown.activity)
    grown.popularity_bucket = _buckets_like(features.popularity, features.popularity_bucket,
                                            grown.popularity)
    channels = features.channels()
    first = next(iter(channels))
    raw = {name: primary if name == first and primary is not None else
           grown_by_neighbours(u, i, grown.history) for name, (u, i) in channels.items()}
    grown.signals = {name: (unit_rows(u), unit_rows(i)) for name, (u, i) in raw.items()}
    grown.norms = {name: (np.linalg.norm(u, axis=1).astype(np.float32),
                          np.linalg.norm(i, axis=1).astype(np.float32))
                   for name, (u, i) in raw.items()}
    grown.user_vectors, grown.item_vectors = grown.signals[first]
    grown.n_segments = features.n_segments
    grown.user_segment = _grown_segments(features.user_segment, features.user_vectors,
                                         grown.user_vectors, features.n_segments)
    grown.item_segment = _grown_segments(features.item_segment, features.item_vectors,
                                         grown.item_vectors, features.n_segments)
    return grown


def _buckets_like(known: np.ndarray, buckets: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`values` in the buckets that `known` values were put in: edge k is the least known
    value above bucket k (the trained edges, whatever updates came in between)."""
    edges = [known[buckets > k].min() if (buckets > k).any() else np.inf
             for k in range(N_BUCKETS - 1)]
    return np.searchsorted(edges, values, side="right").astype(np.int64)


def _grown_segments(segments: np.ndarray, trained: np.ndarray, vectors: np.ndarray,
                    n_segments: int) -> np.ndarray:
    """Trained rows keep their segment; a new row joins the one whose centre (the mean of
    its members) is nearest."""
    centres = np.zeros((n_segments, trained.shape[1]), np.float32)
    np.add.at(centres, segments, trained)
    centres /= np.maximum(np.bincount(segments, minlength=n_segments), 1)[:, None]
    new = vectors[len(segments):]
    nearest = np.argmax(new @ centres.T - 0.5 * (centres ** 2).sum(1), axis=1)
    return np.concatenate([segments, nearest]).astype(np.int64)


def served_primary(ranker: WideDeepRanker, parent: tuple[np.ndarray, np.ndarray],
                   version: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The primary channel over the version's rows: the version's vectors where the update
    moved them or added the row, else the ranker's own trained ones (exact float32, where
    a bundle may store them quantised)."""
    trained = next(iter(ranker.features.channels().values()))
    out = []
    for own, before, now in zip(trained, parent, version):
        merged, rows = now.astype(np.float32).copy(), len(own)
        same = np.all(now[:rows] == before[:rows], axis=1)
        merged[:rows][same] = own[same]
        out.append(merged)
    return out[0], out[1]


def warm_epoch(ranker: WideDeepRanker, before: sp.csr_matrix, added: sp.csr_matrix,
               primary: tuple[np.ndarray, np.ndarray],
               check: tuple[np.ndarray, sp.csr_matrix] | None,
               removed: np.ndarray = np.empty(0, np.int64),
               seed: int = 0) -> tuple[WideDeepRanker, dict]:
    """(the updated ranker, what it did). `before`/`added`: the parent's interactions and the
    day's, both in the new version's row space; `primary`: the primary channel's vectors
    (`served_primary`); `check`: (validation users, their held-out items) or None;
    `removed`: item rows taken out of the catalogue."""
    served = copy.copy(ranker)  # the trained networks over the version's features
    served.features = grown_features(ranker.features, before + added, primary)
    served._retrievers = None
    served.nets = [_on_features(net, served.features) for net in ranker.nets]
    served.net = served.nets[0]
    users = np.flatnonzero((np.diff(added.indptr) > 0) & (np.diff(before.indptr) > 0))
    report = {"users": int(len(users)), "positives": 0}
    if ranker.kept_recall_order or not len(users):
        return served, {**report, "epoch": "none (the ranker keeps the recall order)"
                        if ranker.kept_recall_order else "none (no new pairs of known users)"}
    day_before = copy.copy(ranker)
    day_before.features = grown_features(ranker.features, before, None)
    day_before._retrievers = None
    rng = np.random.default_rng(seed)
    channels = day_before.channel_candidates_of(users, before)
    pair_users, items, _, labels = ranking_pairs(added, users, channels.candidates,
                                                 ranker.hard_negatives, ranker.random_negatives,
                                                 rng, within_candidates=True)
    pairs = (pair_users, items, ranker._visible(channels.ranks(pair_users, items)), labels)
    trained_nets = served.nets
    served.nets = [_on_features(_one_epoch(ranker, day_before.features, net, pairs, rng),
                                served.features) for net in ranker.nets]
    report["positives"] = int(labels.sum())
    served.net = served.nets[0]
    if check is None:
        return served, {**report, "epoch": "kept (no validation pairs to check it)"}
    rows, truth = check
    exclude = before + added
    if len(removed):  # taken out of the catalogue: never in an answer
        exclude = exclude + sp.csr_matrix(
            (np.ones(len(rows) * len(removed), np.float32),
             (np.repeat(rows, len(removed)), np.tile(removed, len(rows)))), shape=exclude.shape)
    channels = served.channel_candidates_of(rows, exclude, 20)  # one search for both
    scores = [_ranked_ndcg(served, channels, nets, truth) for nets in (trained_nets, served.nets)]
    report.update(val_ndcg_trained=round(scores[0], 5), val_ndcg_updated=round(scores[1], 5))
    if scores[1] < scores[0]:
        served.nets, served.net = trained_nets, trained_nets[0]
        return served, {**report, "epoch": "dropped (validation NDCG@20 fell)"}
    return served, {**report, "epoch": "kept"}


def _one_epoch(ranker: WideDeepRanker, features: RankingFeatures, trained: torch.nn.Module,
               pairs, rng: np.random.Generator) -> torch.nn.Module:
    """A copy of `trained` after one pass over `pairs` (the training loop's loss, batches
    and learning rate; the input scaling and frozen biases stay as trained)."""
    users, items, ranks, labels = pairs
    if ranker.loss == "softmax":  # batches of whole users, as in training
        order = np.argsort(users, kind="stable")
        users, items, ranks, labels = users[order], items[order], ranks[order], labels[order]
        batches = user_batches(users, ranker.batch, rng)
    else:
        order = rng.permutation(len(labels))
        batches = [order[start:start + ranker.batch] for start in range(0, len(order),
                                                                          ranker.batch)]
    net = _on_features(trained, features)
    device = next(net.parameters()).device
    frozen = {id(p) for p in net.shift_parameters()} if ranker.loss == "softmax" else set()
    optimiser = torch.optim.Adam([p for p in net.parameters() if id(p) not in frozen],
                                 lr=ranker.lr)
    net.train()
    with deterministic_torch():
        for rows in batches:
            logits = net(on_device(features.build(users[rows], items[rows], ranks[rows]),
                                   device))
            target = torch.as_tensor(labels[rows], device=device)
            if ranker.loss == "bce":
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            else:
                groups = torch.as_tensor(np.unique(users[rows], return_inverse=True)[1],
                                         device=device)
                loss = grouped_softmax_loss(logits, target, groups) / max(
                    float(labels[rows].sum()), 1.0)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return net.eval()


def _on_features(net: torch.nn.Module, features: RankingFeatures) -> torch.nn.Module:
    """A copy of `net` whose primary user and item vectors (buffers) are `features`'."""
    copied = copy.deepcopy(net)
    device = copied.user_vectors.device
    copied.user_vectors = torch.as_tensor(features.user_vectors, device=device)
    copied.item_vectors = torch.as_tensor(features.item_vectors, device=device)
    return copied


def _ranked_ndcg(ranker: WideDeepRanker, channels, nets: list, truth: sp.csr_matrix) -> float:
    """NDCG@20 of `nets`' order of the candidates `channels` against `truth`."""
    order = ranker._order(channels, nets)[0][:, :20]
    top = np.full((len(order), 20), -1, dtype=np.int64)
    top[:, :order.shape[1]] = order
    return float(per_user_metrics(top, channels.users, truth, (20,))["ndcg@20"].mean())
