"""Shared computations over the interaction data: aggregation, random walks, samplers,
losses, the one training loop with early stopping, and the fusion-weight search.

A leaf: it imports numpy, scipy, torch and `utils` only. What a loop optimises and how it
is validated come in as callbacks, so models and evaluation stay out of here."""
from __future__ import annotations

import copy
import time
from typing import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import (average_gradients, data_parallel, log, mean_over_ranks, pair_values,
                   rows_contain)

WALK_BLOCK = 1 << 20  # random walks generated (and held) at once


def mean_of_items(train: sp.csr_matrix, item_vectors: np.ndarray,
                  item_usable: np.ndarray | None = None) -> np.ndarray:
    """Per user, the L2-normalised mean of the vectors of their training items.

    Only items flagged in `item_usable` count; users with no usable item get a zero row.
    Interaction counts are not used as weights: a repeat visit is not twice the taste.
    """
    binary = (train > 0).astype(np.float32)
    if item_usable is not None:
        binary = binary @ sp.diags(item_usable.astype(np.float32))
    summed = np.asarray(binary @ item_vectors, dtype=np.float32)
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return np.divide(summed, norms, out=summed, where=norms > 0)  # in place: one user matrix


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors, dtype=np.float32),
                     where=norms > 0).astype(np.float32)


def top_k_rows(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best columns of each row by score, best first, ties broken by the lower
    column (exactly, also at the cut-off); -inf entries come back as -1 / -inf."""
    items = np.full((len(block), k), -1, dtype=np.int64)
    scores = np.full((len(block), k), -np.inf, dtype=np.float32)
    width = min(k, block.shape[1])
    if width == 0 or len(block) == 0:
        return items, scores
    negative = -np.asarray(block, dtype=np.float32)
    cut = np.partition(negative, width - 1, axis=1)[:, width - 1:width]
    above, tied = negative < cut, negative == cut
    room = width - above.sum(1, keepdims=True)
    take = above | (tied & (np.cumsum(tied, axis=1) <= room))
    columns = np.nonzero(take)[1].reshape(len(block), width)  # ascending column per row
    order = np.argsort(np.take_along_axis(negative, columns, 1), axis=1, kind="stable")
    top = np.take_along_axis(columns, order, 1)
    top_scores = -np.take_along_axis(negative, top, 1)
    valid = np.isfinite(top_scores)
    items[:, :width] = np.where(valid, top, -1)
    scores[:, :width] = np.where(valid, top_scores, -np.inf)
    return items, scores


# ---------------------------------------------------------------- graph and random walks


def bipartite_graph(train: sp.csr_matrix) -> sp.csr_matrix:
    """Symmetric (users + items) square adjacency; nodes 0..U-1 are users, U.. are items;
    edge weight = interaction count."""
    n_users, n_items = train.shape
    graph = sp.bmat([[None, train], [train.T, None]], format="csr",
                    dtype=np.float64)
    graph.resize((n_users + n_items, n_users + n_items))
    graph.sort_indices()
    return graph


def random_walks(graph: sp.csr_matrix, walks_per_node: int, walk_length: int,
                 seed: int = 0) -> np.ndarray:
    """Weighted random walks (`walk_blocks`) as one (walks, walk_length) array of node ids."""
    return np.vstack([np.empty((0, walk_length), np.int64),
                      *walk_blocks(graph, walks_per_node, walk_length, seed)])


def walk_blocks(graph: sp.csr_matrix, walks_per_node: int, walk_length: int, seed: int = 0,
                block: int = WALK_BLOCK) -> Iterator[np.ndarray]:
    """Weighted random walks, `block` walks at a time, all of a block advanced together one
    step at a time (so the walks of a large graph are never all in memory).

    Yields (walks, walk_length) node ids. A step from v picks neighbour u with probability
    w(v, u) / sum_u' w(v, u'), by inverse-CDF search over the graph's cumulative weights.
    Walks start from every node that has an edge; they never leave `graph`'s edges.
    """
    rng = np.random.default_rng(seed)
    degree = np.diff(graph.indptr)
    starts = np.repeat(np.flatnonzero(degree > 0), walks_per_node)
    rng.shuffle(starts)
    cumulative = np.cumsum(graph.data)
    before_row = np.concatenate([[0.0], cumulative])[graph.indptr[:-1]]
    row_weight = np.asarray(graph.sum(axis=1)).ravel()
    for first in range(0, len(starts), block):
        walks = np.empty((min(block, len(starts) - first), walk_length), dtype=np.int64)
        walks[:, 0] = current = starts[first:first + block]
        for step in range(1, walk_length):
            target = before_row[current] + rng.random(len(current)) * row_weight[current]
            position = np.searchsorted(cumulative, target, side="right")
            position = np.clip(position, graph.indptr[current], graph.indptr[current + 1] - 1)
            walks[:, step] = current = graph.indices[position]
        yield walks


def sample_neighbours(graph: sp.csr_matrix, seeds: np.ndarray, fanouts: list[int],
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """GraphSAGE's neighbour sampling over a CSR adjacency: (nodes, edges). `nodes`: the
    `seeds` (distinct node ids), then the nodes each hop reached first; at hop h every node
    reached at hop h - 1 takes all its neighbours when it has at most fanouts[h], else draws
    fanouts[h] (with replacement; repeats kept once). `edges`: (2, E) positions in `nodes`,
    row 0 the node that drew, row 1 the neighbour it drew."""
    nodes = frontier = np.asarray(seeds, dtype=np.int64)
    drawers, drawn_all = [], []
    for fanout in fanouts:
        frontier = frontier[graph.indptr[frontier + 1] > graph.indptr[frontier]]
        degree = graph.indptr[frontier + 1] - graph.indptr[frontier]
        offsets = np.where(degree[:, None] <= fanout, np.arange(fanout),
                           (rng.random((len(frontier), fanout)) * degree[:, None]).astype(int))
        inside = offsets < degree[:, None]
        drawn = graph.indices[(graph.indptr[frontier][:, None] + offsets)[inside]]
        pairs = np.unique(np.stack([np.repeat(frontier, inside.sum(1)),
                                    drawn.astype(np.int64)]), axis=1)
        frontier = np.setdiff1d(pairs[1], nodes)  # reached first at this hop
        nodes = np.concatenate([nodes, frontier])
        drawers.append(pairs[0])
        drawn_all.append(pairs[1])
    ends = [np.concatenate(part) if part else np.empty(0, np.int64)
            for part in (drawers, drawn_all)]
    order = np.argsort(nodes)
    edges = np.stack([order[np.searchsorted(nodes[order], end)] for end in ends])
    return nodes, edges


# ---------------------------------------------------------------- sampling and losses


def pair_rows(train: sp.csr_matrix) -> np.ndarray:
    """The user of each stored training pair (the COO row index), built once per epoch."""
    return np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))


def sample_bpr_triples(train: sp.csr_matrix, size: int, rng: np.random.Generator,
                       coo_rows: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, positive items, negative items): positives uniform over training pairs,
    negatives uniform over items and redrawn once where they hit a training item.
    `coo_rows`: `pair_rows(train)`, when the caller samples many times."""
    coo_rows = pair_rows(train) if coo_rows is None else coo_rows
    picks = rng.integers(train.nnz, size=size)
    users, positives = coo_rows[picks], train.indices[picks]
    negatives = rng.integers(train.shape[1], size=size)
    clash = pair_values(train, users, negatives) != 0
    negatives[clash] = rng.integers(train.shape[1], size=int(clash.sum()))
    return users, positives, negatives


def bpr_loss(user: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
             weight_decay: float = 0.0) -> torch.Tensor:
    margin = (user * positive).sum(-1) - (user * negative).sum(-1)
    loss = F.softplus(-margin).mean()
    if weight_decay:
        loss = loss + weight_decay * (user.pow(2).sum() + positive.pow(2).sum()
                                      + negative.pow(2).sum()) / (2 * len(user))
    return loss



MIN_STEPS_PER_EPOCH = 10


def epoch_batch(batch: int, n_pairs: int, min_steps: int = MIN_STEPS_PER_EPOCH) -> int:
    """`batch`, cut so that an epoch over `n_pairs` takes at least `min_steps` steps. On
    small data a single batch per epoch leaves too few updates before early stopping,
    which counts epochs (SimGCL on a few thousand pairs stopped at a tenth of LightGCN's
    recall); data with enough pairs keeps its batch as given, and no batch is cut below
    64 pairs (every rank of a process group gets a share)."""
    return min(batch, max(64, n_pairs // min_steps))


def bpr_epoch(module: torch.nn.Module, embed: Callable[[], tuple[torch.Tensor, torch.Tensor]],
              optimiser: torch.optim.Optimizer, train: sp.csr_matrix, batch: int,
              weight_decay: float, rng: np.random.Generator, device: str = "cpu",
              desc: str = "bpr", loss_fn: Callable | None = None,
              embed_triples: Callable | None = None,
              batch_term: Callable | None = None) -> float:
    """One pass of BPR steps over about `train.nnz` sampled triples; `embed()` returns the
    (user, item) vectors of all nodes (full batch), or `embed_triples(users, positives,
    negatives)` only theirs (mini-batch: sampled neighbourhoods). `loss_fn(user, positive,
    negative vectors, user, positive, negative ids)` replaces BPR with an L2 penalty on the
    output vectors (LightGCN penalises its layer-0 embeddings instead); both are means over
    the batch; `batch_term(user ids, positive ids)` adds a term (SimGCL's contrast). In a
    process group every rank draws the same global batch, takes its share of the BPR loss
    and computes `batch_term` over the whole batch (alike on every rank: same torch seed);
    gradients are averaged (the global batch's gradient). Returns the mean loss."""
    module.train()
    rank, world = data_parallel()
    steps, total, coo_rows = max(1, train.nnz // batch), 0.0, pair_rows(train)
    share = slice(rank * batch // world, (rank + 1) * batch // world)  # all of it alone
    share_size = share.stop - share.start
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=None):
        triples = [torch.as_tensor(a, device=device)
                   for a in sample_bpr_triples(train, batch, rng, coo_rows)]
        users, positives, negatives = (a[share] for a in triples)
        optimiser.zero_grad()
        if share_size:  # (a rank without rows still joins the gradient average)
            if embed_triples is not None:
                vectors = embed_triples(users, positives, negatives)
            else:
                user_vectors, item_vectors = embed()
                vectors = (user_vectors[users], item_vectors[positives],
                           item_vectors[negatives])
        # the term before the BPR loss: earlier versions' order (their results bit-identical)
        loss = batch_term(*triples[:2]) if batch_term is not None else torch.zeros(())
        if share_size:
            loss = loss + (loss_fn(*vectors, users, positives, negatives) if loss_fn is not None
                           else bpr_loss(*vectors, weight_decay)) * (share_size * world / batch)
        if share_size or batch_term is not None:
            loss.backward()
        average_gradients(module.parameters())
        optimiser.step()
        total += mean_over_ranks(loss.item())
    return total / steps


class BestState:
    """The best weights of `module` seen so far, by a score where higher is better."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.score, self.round, self.state = -np.inf, None, None

    def offer(self, score: float, round_: int) -> bool:
        """Keep a copy of the weights if `score` beats the best; True when it did."""
        if not score > self.score:
            return False
        self.score, self.round = score, round_
        self.state = copy.deepcopy({k: v.detach() for k, v in self.module.state_dict().items()})
        return True

    def restore(self) -> None:
        if self.state is not None:
            self.module.load_state_dict(self.state)


def train_until_no_improvement(step: Callable[[int], dict], score: Callable[[], float],
                               best: BestState, rounds: int, patience: int | None = None,
                               score_first: bool = False, metric: str = "val_recall@20",
                               label: str = "train", warmup: int = 0) -> dict:
    """Run `step(round)` (one round of training; returns what to log, e.g. epoch and loss)
    then `score()` (validation, higher is better) for up to `rounds` rounds; stop after
    `patience` rounds without improvement, not counting the first `warmup` rounds (a loss
    whose validation dips before it climbs); restore the best weights.

    With `score_first`, the untrained state is scored as round 0 and kept if nothing beats
    it (a ranker that never beats the recall order, a fine-tune that never beats zero-shot).
    """
    history = []
    if score_first:
        value = score()
        best.offer(value, 0)
        history.append({"round": 0, metric: round(value, 5)})
        log(f"{label}: before training {metric} {value:.4f}")
    waited, started, stopped_early = 0, time.perf_counter(), False
    for round_ in range(1, rounds + 1):
        logged = step(round_)
        value = score()
        history.append({"round": round_, **logged, metric: round(value, 5)})
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in logged.items())
        log(f"{label} {shown}  {metric} {value:.4f}  "
            f"[{_time_estimate(time.perf_counter() - started, round_, rounds)}]")
        if best.offer(value, round_):
            waited = 0
        else:
            waited += round_ > warmup
            stopped_early = patience is not None and waited >= patience
            if stopped_early:
                break
    best.restore()
    best.module.eval()
    return {"best_round": best.round, f"best_{metric}": round(float(best.score), 5),
            "stopped_early": stopped_early, "history": history}


def _time_estimate(elapsed: float, done: int, total: int) -> str:
    """'12s elapsed, at most 1m40s left' (early stopping may end sooner)."""
    def clock(seconds: float) -> str:
        minutes, seconds = divmod(int(round(seconds)), 60)
        return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
    left = elapsed / done * (total - done)
    return f"{clock(elapsed)} elapsed, at most {clock(left)} left"


# ---------------------------------------------------------------- fusion


def fit_content_map(content: np.ndarray, target: np.ndarray, seed: int = 0,
                    strengths: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0),
                    max_rows: int = 200_000) -> tuple[np.ndarray, float]:
    """Ridge regression (with a bias) from content vectors to a collaborative model's
    vectors, fitted on the rows that have both: how a cold item or user, known only by its
    text, is placed in an ID-based model's space (attribute-to-factor mapping). The
    strength (relative to the mean feature energy, so scale-free) is the one with the least
    error on a seeded 10% of the rows; the map is then refitted on all of them (a seeded
    sample of `max_rows` where there are more)."""
    rng = np.random.default_rng(seed)
    if len(content) > max_rows:
        rows = np.sort(rng.choice(len(content), max_rows, replace=False))
        content, target = content[rows], target[rows]
    features = np.hstack([content, np.ones((len(content), 1), dtype=content.dtype)])
    features, target = features.astype(np.float64), target.astype(np.float64)
    held = rng.random(len(features)) < 0.1
    energy = float((features ** 2).sum(1).mean())

    def solve(rows: np.ndarray, strength: float) -> np.ndarray:
        gram = features[rows].T @ features[rows]
        gram[np.diag_indices_from(gram)] += strength * energy
        return np.linalg.solve(gram, features[rows].T @ target[rows])

    if held.sum() and (~held).sum():
        errors = [float(((features[held] @ solve(~held, s) - target[held]) ** 2).mean())
                  for s in strengths]
        strength = strengths[int(np.argmin(errors))]
    else:
        strength = strengths[-1]
    return solve(np.ones(len(features), dtype=bool), strength).astype(np.float32), strength


def apply_content_map(content: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return (content @ weights[:-1] + weights[-1]).astype(np.float32)


def coordinate_search(grid: dict[str, list], score: Callable[[dict], float], start: dict,
                      rounds: int = 2, budget_seconds: float | None = None,
                      extend: int = 2, extend_gain: float = 0.005
                      ) -> tuple[dict, float, list[dict]]:
    """Hyperparameters by coordinate ascent over `grid` from `start`: each parameter in turn
    takes the grid value with the best score, the others held; repeated until a round
    changes nothing (or `rounds`). Where the best value is a numeric grid's edge, the grid
    grows past it by the step it takes there, while that improves the score by a share of
    at least `extend_gain` (at most `extend` values per parameter): a grid is a guess, and on
    a new data set the optimum may lie outside it; the share keeps the search from paying
    for noise (a larger model, say) past the grid.
    Every setting is scored once; with `budget_seconds`, no new setting is started once that
    much time has passed (the best so far is kept). Returns (best, its score, every scored
    setting)."""
    scored: dict[tuple, float] = {}
    deadline = None if budget_seconds is None else time.perf_counter() + budget_seconds
    grid = {name: list(values) for name, values in grid.items()}
    extensions = dict.fromkeys(grid, 0)

    def value_of(candidate: dict) -> float:
        key = tuple(sorted(candidate.items()))
        if key not in scored:
            if scored and deadline is not None and time.perf_counter() > deadline:
                return float("-inf")
            scored[key] = score(candidate)
        return scored[key]

    best, best_score = dict(start), value_of(start)
    for _ in range(rounds):
        changed = False
        for name, values in grid.items():
            for value in values:
                candidate = {**best, name: value}
                result = value_of(candidate)
                if result > best_score + 1e-6:
                    best, best_score, changed = candidate, result, True
            while extensions[name] < extend:
                beyond = beyond_edge(values, best[name])
                if beyond is None:
                    break
                extensions[name] += 1
                candidate = {**best, name: beyond}
                result = value_of(candidate)
                if not result > best_score + max(1e-6, extend_gain * abs(best_score)):
                    break  # (not in the grid: a later round must not take it for less)
                values.append(beyond)
                best, best_score, changed = candidate, result, True
        if not changed:
            break
    table = [{**dict(key), "score": value} for key, value in scored.items()]
    return best, best_score, table


def beyond_edge(values: list, value):
    """The next value past `value` if it is the smallest or the largest of the numeric grid
    `values`, one step on: the ratio of the two edge values for a positive grid (64, 128,
    256 -> 512), else their difference; None inside the grid, for a non-numeric grid, where
    a non-negative grid would go below zero, or where an integer step rounds to nothing."""
    if len(values) < 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                              for v in values):
        return None
    ordered = sorted(values)
    if value not in (ordered[0], ordered[-1]):
        return None
    edge, inner = (ordered[-1], ordered[-2]) if value == ordered[-1] else (ordered[0], ordered[1])
    if edge == inner:
        return None
    step = edge * edge / inner if edge > 0 and inner > 0 else 2 * edge - inner
    step = int(round(step)) if all(isinstance(v, int) for v in values) else round(step, 6)
    return None if step == edge or (ordered[0] >= 0 and step <= 0) else step


# ---------------------------------------------------------------- ranking stage


def ranking_pairs(positives: sp.csr_matrix, users: np.ndarray, candidates: np.ndarray,
                  n_hard: int, n_random: int, rng: np.random.Generator,
                  within_candidates: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, recall ranks, labels) for training a ranker; row r of `candidates` is
    users[r]'s; items outside the candidates get rank len(candidates[r]). Positives: pairs
    of `positives` for `users`; with `within_candidates`, only those the recall stage
    retrieved, so the ranker learns on the distribution it will re-order. Per positive,
    `n_hard` negatives from the user's candidates and `n_random` uniform items (neither
    among the positives)."""
    if within_candidates:
        hit_rows, hit_cols = np.nonzero(rows_contain(positives, users, candidates))
        pos_users, pos_items = users[hit_rows], candidates[hit_rows, hit_cols]
        pos_rows, pos_ranks = hit_rows, hit_cols
    else:
        chosen = positives[users].tocoo()
        pos_users, pos_items, pos_rows = users[chosen.row], chosen.col.astype(np.int64), chosen.row
        pos_ranks = np.full(len(pos_users), candidates.shape[1])
    hard_rows = np.repeat(pos_rows, n_hard)
    hard_users = users[hard_rows]
    hard_ranks = rng.integers(candidates.shape[1], size=len(hard_rows))
    picks = candidates[hard_rows, hard_ranks]
    keep = (picks >= 0) & (pair_values(positives, hard_users, np.maximum(picks, 0)) == 0)
    random_users = np.repeat(pos_users, n_random)
    random_items = rng.integers(positives.shape[1], size=len(random_users))
    keep_random = pair_values(positives, random_users, random_items) == 0
    all_users = np.concatenate([pos_users, hard_users[keep], random_users[keep_random]])
    all_items = np.concatenate([pos_items, picks[keep], random_items[keep_random]])
    ranks = np.concatenate([pos_ranks, hard_ranks[keep],
                            np.full(int(keep_random.sum()), candidates.shape[1])])
    labels = np.concatenate([np.ones(len(pos_users)), np.zeros(int(keep.sum())),
                             np.zeros(int(keep_random.sum()))]).astype(np.float32)
    order = rng.permutation(len(all_users))
    return all_users[order], all_items[order], ranks[order], labels[order]


def user_batches(users: np.ndarray, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows of pairs sorted by user, in batches of whole users (a shuffled user order, a new
    batch once `batch` pairs are reached), so a user's positives meet their negatives."""
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    sizes = np.diff(np.append(starts, len(users)))
    order = rng.permutation(len(starts))
    offsets = np.cumsum(sizes[order]) - sizes[order]
    rows = np.repeat(starts[order] - offsets, sizes[order]) + np.arange(len(users))
    cuts = np.flatnonzero(np.diff(offsets // batch)) + 1
    return np.split(rows, offsets[cuts]) if len(users) else []


def grouped_softmax_loss(logits: torch.Tensor, labels: torch.Tensor,
                         groups: torch.Tensor) -> torch.Tensor:
    """Summed over positives: -log of the positive's softmax against the negatives of its
    group (its user), the listwise loss of the ranker. groups: 0..G-1 per row."""
    negative = labels == 0
    neg_groups = groups[negative]
    order = torch.argsort(neg_groups, stable=True)
    counts = torch.bincount(neg_groups, minlength=int(groups.max()) + 1)
    slots = torch.arange(len(order), device=logits.device) \
        - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    # a finite floor for padding: a group without negatives adds nothing, and no NaN
    padded = logits.new_full((len(counts), max(1, int(counts.max()))), -1e4)
    padded[neg_groups[order], slots] = logits[negative][order]
    positive = ~negative
    return F.softplus(torch.logsumexp(padded, 1)[groups[positive]] - logits[positive]).sum()


def rerank(score: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
           users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates of each user (row r is users[r]'s) reordered by
    `score(users, items, recall ranks)`; padding (-1) stays last."""
    return rerank_with_scores(score, users, candidates)[0]


def rerank_with_scores(score: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                       users: np.ndarray, candidates: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """`rerank`, with each reordered candidate's score (-inf for padding)."""
    ranks = np.tile(np.arange(candidates.shape[1]), len(users))
    scores = score(np.repeat(users, candidates.shape[1]), candidates.ravel(), ranks)
    scores = np.where(candidates.ravel() >= 0, scores, -np.inf).reshape(candidates.shape)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(scores, order, 1)


# ---------------------------------------------------------------- contrastive fine-tuning


def info_nce(users: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives: row r of `users` matches row r of `items`."""
    logits = users @ items.T / temperature
    target = torch.arange(len(users), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def gathered_info_nce(users: torch.Tensor, items: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """`info_nce` over the global batch of every rank (rank r holding rows r of it, sizes may
    differ): each rank scores its own rows against all ranks' rows, gathered with gradients,
    its loss scaled by world / global rows, so the averaged gradients are one process's on
    the whole batch (negatives independent of the number of workers). Alone: `info_nce`."""
    rank, world = data_parallel()
    if world == 1:
        return info_nce(users, items, temperature)
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros(1, dtype=torch.long, device=users.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([len(users)], device=users.device))
    sizes = [int(size) for size in sizes]
    padding = max(sizes) - len(users)

    def gathered(local: torch.Tensor) -> torch.Tensor:  # equal shapes for the collective
        padded = F.pad(local, (0, 0, 0, padding))
        return torch.cat([part[:size] for part, size in zip(all_gather(padded), sizes)])
    all_users, all_items = gathered(users), gathered(items)
    target = torch.arange(len(users), device=users.device) + sum(sizes[:rank])
    both = F.cross_entropy(users @ all_items.T / temperature, target, reduction="sum") + \
        F.cross_entropy(items @ all_users.T / temperature, target, reduction="sum")
    return both / 2 * world / sum(sizes)


def cosine_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between the student's pooled vectors and the teacher's
    (normalised) ones: what the student's L2-normalised embeddings will be compared by."""
    return (1 - F.cosine_similarity(student, teacher.to(student.dtype), dim=-1)).mean()


def profile_pairs(dataset, rng: np.random.Generator) -> np.ndarray:
    """(user, item) training pairs where the user has a *written* profile and the item has
    text. Built user profiles are left out: they quote their own training items."""
    coo = dataset.train.tocoo()
    written = dataset.user_profile_source[coo.row] == "written"
    has_text = np.array([p is not None for p in dataset.item_profiles])[coo.col]
    pairs = np.stack([coo.row[written & has_text], coo.col[written & has_text]], axis=1)
    return pairs[rng.permutation(len(pairs))]


def sample_item_pairs(train: sp.csr_matrix, has_text: np.ndarray, size: int,
                      rng: np.random.Generator) -> np.ndarray:
    """(item, item) pairs from the same user's training items, both with text, distinct.
    Users without a written profile are the mean of their items, so teaching the encoder
    which items are visited together helps them too (and carries what profiles do not say,
    such as the city)."""
    coo = train.tocoo()
    keep = has_text[coo.col]
    rows, anchors = coo.row[keep], coo.col[keep]
    pick = rng.integers(len(rows), size=size)
    users = rows[pick]
    start, degree = train.indptr[users], np.diff(train.indptr)[users]
    partners = train.indices[start + (rng.random(size) * degree).astype(np.int64)]
    pairs = np.stack([anchors[pick], partners], axis=1)
    return pairs[(pairs[:, 0] != pairs[:, 1]) & has_text[pairs[:, 1]]]


def distinct_pairs(pairs: np.ndarray, shared_space: bool = False) -> np.ndarray:
    """Drop pairs that repeat an id of an earlier pair of the batch (with in-batch negatives
    it would be its own false negative). User-item pairs: users distinct and items distinct;
    item-item pairs (`shared_space`): every id distinct across both columns."""
    used_left, used_right, kept = set(), set(), []
    for row, (left, right) in enumerate(pairs.tolist()):
        if shared_space:
            if left in used_left or right in used_left or left == right:
                continue
            used_left.update((left, right))
        else:
            if left in used_left or right in used_right:
                continue
            used_left.add(left)
            used_right.add(right)
        kept.append(row)
    return pairs[kept]


def mixed_precision(device: str, enabled: bool):
    """(autocast, gradient scaler) of a training step: bf16 on GPUs that support it, fp16
    with loss scaling on older ones, fp32 on CPU or when disabled."""
    on_cuda = enabled and str(device).startswith("cuda") and torch.cuda.is_available()
    dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast("cuda", dtype=dtype, enabled=on_cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and dtype == torch.float16)
    return autocast, scaler
