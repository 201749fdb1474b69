"""Shared computations over the interaction data: aggregation, losses, sampling and
training loops used by the model components."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from utils import pair_values, rows_contain

if TYPE_CHECKING:
    import torch


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
    return np.divide(summed, norms, out=np.zeros_like(summed), where=norms > 0)


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
    """Weighted random walks, all advanced together one step at a time.

    Returns (walks, walk_length) node ids. A step from v picks neighbour u with probability
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
    walks = np.empty((len(starts), walk_length), dtype=np.int64)
    walks[:, 0] = current = starts
    for step in range(1, walk_length):
        target = before_row[current] + rng.random(len(current)) * row_weight[current]
        position = np.searchsorted(cumulative, target, side="right")
        position = np.clip(position, graph.indptr[current], graph.indptr[current + 1] - 1)
        walks[:, step] = current = graph.indices[position]
    return walks


# ---------------------------------------------------------------- sampling and losses


def sample_bpr_triples(train: sp.csr_matrix, size: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, positive items, negative items): positives uniform over training pairs,
    negatives uniform over items and redrawn once where they hit a training item."""
    coo_rows = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    picks = rng.integers(train.nnz, size=size)
    users, positives = coo_rows[picks], train.indices[picks]
    negatives = rng.integers(train.shape[1], size=size)
    clash = pair_values(train, users, negatives) != 0
    negatives[clash] = rng.integers(train.shape[1], size=int(clash.sum()))
    return users, positives, negatives


def bpr_loss(user: "torch.Tensor", positive: "torch.Tensor", negative: "torch.Tensor",
             weight_decay: float = 0.0) -> "torch.Tensor":
    import torch.nn.functional as F

    margin = (user * positive).sum(-1) - (user * negative).sum(-1)
    loss = F.softplus(-margin).mean()
    if weight_decay:
        loss = loss + weight_decay * (user.pow(2).sum() + positive.pow(2).sum()
                                      + negative.pow(2).sum()) / (2 * len(user))
    return loss


def validation_recall(user_vectors: np.ndarray, item_vectors: np.ndarray,
                      train: sp.csr_matrix, val: sp.csr_matrix, k: int = 20,
                      max_users: int = 4000, seed: int = 0) -> float:
    """Recall@k on (a fixed sample of) validation users; training items excluded."""
    from evaluation import per_user_metrics, users_with_test_items
    from model import FaissRetriever

    users = users_with_test_items(val)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    top, _ = FaissRetriever("flat", use_gpu=False).fit(item_vectors).search(
        user_vectors, k, train, users)
    return float(per_user_metrics(top, users, val, (k,))[f"recall@{k}"].mean())


def train_with_early_stopping(model, embed, train: sp.csr_matrix, val: sp.csr_matrix,
                              opts: dict, label: str) -> dict:
    """Generic BPR loop: `embed()` returns (user, item) tensors for all nodes (full batch).

    Evaluates validation Recall@20 every `eval_every` epochs, keeps the best weights, stops
    after `patience` evaluations without improvement. Never reads the test split.
    """
    import torch
    from tqdm import tqdm

    from utils import log

    rng = np.random.default_rng(opts["seed"])
    optimiser = torch.optim.Adam(model.parameters(), lr=opts["lr"])
    steps = max(1, train.nnz // opts["train_batch"])
    best = {"recall": -1.0, "epoch": 0, "state": None}
    history, waited = [], 0
    for epoch in range(1, opts["epochs"] + 1):
        model.train()
        total = 0.0
        for _ in tqdm(range(steps), desc=f"{label} epoch {epoch}", leave=False,
                      disable=None if opts.get("progress", True) else True):
            users, positives, negatives = (torch.as_tensor(a) for a in sample_bpr_triples(
                train, opts["train_batch"], rng))
            user_vectors, item_vectors = embed()
            loss = bpr_loss(user_vectors[users], item_vectors[positives],
                            item_vectors[negatives], opts["weight_decay"])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        if epoch % opts["eval_every"] and epoch != opts["epochs"]:
            continue
        model.eval()
        with torch.no_grad():
            user_vectors, item_vectors = (t.cpu().numpy() for t in embed())
        recall = validation_recall(user_vectors, item_vectors, train, val)
        history.append({"epoch": epoch, "loss": round(total / steps, 5),
                        "val_recall@20": round(recall, 5)})
        log(f"{label} epoch {epoch}: loss {total / steps:.4f}  val R@20 {recall:.4f}")
        if recall > best["recall"]:
            best = {"recall": recall, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            waited = 0
        else:
            waited += 1
            if waited >= opts["patience"]:
                break
    model.load_state_dict(best["state"])
    model.eval()
    return {"best_epoch": best["epoch"], "best_val_recall@20": round(best["recall"], 5),
            "history": history}


# ---------------------------------------------------------------- fusion


def weighted_concat(parts: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Concatenate parts, each divided by its mean row norm and scaled by sqrt(weight).

    A global scale (not a per-row one) keeps what each model learnt in its vector norms:
    LightGCN and GraphSAGE score by inner product, and their norms carry popularity. The
    inner product of a fused user and item is sum_p w_p <u_p, i_p> / (|u_p| |i_p|)_mean.
    """
    scaled = []
    for part, weight in zip(parts, weights):
        norms = np.linalg.norm(part, axis=1)
        mean_norm = norms[norms > 0].mean() if (norms > 0).any() else 1.0
        scaled.append(part / mean_norm * np.sqrt(weight))
    return np.hstack(scaled).astype(np.float32)


def search_fusion_weights(user_parts: list[np.ndarray], item_parts: list[np.ndarray],
                          train: sp.csr_matrix, val: sp.csr_matrix,
                          grid: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0),
                          rounds: int = 2) -> tuple[list[float], float]:
    """Weights per part by validation Recall@20: start from the best single part (weight 1,
    others 0), then coordinate ascent over `grid` for the others. The result is never worse
    on validation than the best part alone."""
    def score(candidate: list[float]) -> float:
        return validation_recall(weighted_concat(user_parts, candidate),
                                 weighted_concat(item_parts, candidate), train, val)

    singles = [score([1.0 if p == q else 0.0 for q in range(len(user_parts))])
               for p in range(len(user_parts))]
    anchor = int(np.argmax(singles))
    weights = [1.0 if p == anchor else 0.0 for p in range(len(user_parts))]
    best = singles[anchor]
    for _ in range(rounds):
        improved = False
        for part in range(len(weights)):
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


# ---------------------------------------------------------------- ranking stage


def ranking_pairs(positives: sp.csr_matrix, users: np.ndarray, candidates: np.ndarray,
                  n_hard: int, n_random: int, rng: np.random.Generator,
                  within_candidates: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, recall ranks, labels) for training a ranker; row r of `candidates` is
    users[r]'s; items outside the candidates get rank len(candidates[r]).

    Positives: pairs of `positives` for `users`; with `within_candidates`, only those the
    recall stage retrieved, so the ranker learns on the distribution it will re-order.
    Per positive, `n_hard` negatives from the user's candidates that are not positives and
    `n_random` uniform items that are not positives.
    """
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


def rerank(ranker, features, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates of each user reordered by the ranker's score (padding stays last)."""
    ranks = np.tile(np.arange(candidates.shape[1]), len(users))
    scores = ranker.score(features, np.repeat(users, candidates.shape[1]), candidates.ravel(),
                          ranks)
    order = np.argsort(-scores.reshape(candidates.shape), axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def ndcg_at(top: np.ndarray, users: np.ndarray, truth: sp.csr_matrix, k: int = 20) -> float:
    from evaluation import per_user_metrics

    return float(per_user_metrics(top[:, :k], users, truth, (k,))[f"ndcg@{k}"].mean())


def train_ranker(ranker, features,
                 pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                 check_users: np.ndarray, check_candidates: np.ndarray,
                 check_truth: sp.csr_matrix, opts: dict, label: str = "ranker") -> dict:
    """Logistic loss with Adam; after each epoch, NDCG@20 of the re-ranked candidates of
    held-out check users against `check_truth` (validation items). The best epoch is kept;
    best_epoch 0 means no epoch beat the recall order, which the caller should then keep."""
    import torch
    from tqdm import tqdm

    from utils import log

    users, items, ranks, labels = pairs
    ranker.set_dense_scaling(features.build(users[:50000], items[:50000], ranks[:50000])["dense"])
    optimiser = torch.optim.Adam(ranker.parameters(), lr=opts["rank_lr"])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best = {"ndcg": ndcg_at(check_candidates, check_users, check_truth), "epoch": 0,
            "state": {k: v.clone() for k, v in ranker.state_dict().items()}}
    history = [{"epoch": 0, "val_ndcg@20": round(best["ndcg"], 5)}]
    log(f"{label}: {len(labels):,} pairs ({int(labels.sum()):,} positive); "
        f"recall-only val NDCG@20 {best['ndcg']:.4f}")
    batch = opts["rank_batch"]
    for epoch in range(1, opts["rank_epochs"] + 1):
        ranker.train()
        for start in tqdm(range(0, len(labels), batch), desc=f"{label} epoch {epoch}",
                          leave=False, disable=None):
            rows = slice(start, start + batch)
            logits = ranker(features.build(users[rows], items[rows], ranks[rows]))
            loss = loss_fn(logits, torch.as_tensor(labels[rows]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        ndcg = ndcg_at(rerank(ranker, features, check_users, check_candidates), check_users,
                       check_truth)
        history.append({"epoch": epoch, "val_ndcg@20": round(ndcg, 5)})
        log(f"{label} epoch {epoch}: val NDCG@20 {ndcg:.4f}")
        if ndcg > best["ndcg"]:
            best = {"ndcg": ndcg, "epoch": epoch,
                    "state": {k: v.clone() for k, v in ranker.state_dict().items()}}
    ranker.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "best_val_ndcg@20": round(best["ndcg"], 5),
            "history": history}


# ---------------------------------------------------------------- contrastive fine-tuning


def info_nce(users: "torch.Tensor", items: "torch.Tensor", temperature: float) -> "torch.Tensor":
    """Symmetric InfoNCE with in-batch negatives: row r of `users` matches row r of `items`."""
    import torch.nn.functional as F

    logits = users @ items.T / temperature
    target = torch_arange(len(users), logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def torch_arange(n: int, device) -> "torch.Tensor":
    import torch

    return torch.arange(n, device=device)


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

    Users without a written profile are represented by the mean of their items, so teaching
    the encoder which items are visited together helps them too (and carries what profiles
    do not say, such as the city)."""
    coo = train.tocoo()
    keep = has_text[coo.col]
    rows, anchors = coo.row[keep], coo.col[keep]
    pick = rng.integers(len(rows), size=size)
    users = rows[pick]
    start, degree = train.indptr[users], np.diff(train.indptr)[users]
    partners = train.indices[start + (rng.random(size) * degree).astype(np.int64)]
    pairs = np.stack([anchors[pick], partners], axis=1)
    return pairs[(pairs[:, 0] != pairs[:, 1]) & has_text[pairs[:, 1]]]


def one_pair_per_item(pairs: np.ndarray) -> np.ndarray:
    """Drop pairs whose item (second column) already occurs: a repeated item would be its own
    in-batch negative."""
    _, first = np.unique(pairs[:, 1], return_index=True)
    return pairs[np.sort(first)]


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
        self.items = np.array(sorted(i for i in pool if has_text[i]))
        self.encoded_items = np.union1d(self.items, np.flatnonzero(
            has_text & (np.asarray(dataset.train[self.mean_users].sum(0)).ravel() > 0)))
        self.dataset = dataset

    def recall(self, encoder) -> float:
        from evaluation import per_user_metrics
        from model import FaissRetriever

        data = self.dataset
        probe_users = np.concatenate([self.users, self.mean_users])
        if len(probe_users) == 0:
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
        top, _ = FaissRetriever("flat", use_gpu=False).fit(item_vectors, self.items).search(
            user_vectors, 20, data.train, probe_users)
        return float(per_user_metrics(top, probe_users, data.val, (20,))["recall@20"].mean())


def mixed_precision(device: str, enabled: bool):
    """(autocast context, gradient scaler) for a training step: bf16 autocast on GPUs that
    support it, fp16 with loss scaling on older ones, plain fp32 on CPU or when disabled."""
    import torch

    on_cuda = enabled and str(device).startswith("cuda") and torch.cuda.is_available()
    dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast("cuda", dtype=dtype, enabled=on_cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and dtype == torch.float16)
    return autocast, scaler


def finetune_encoder(encoder, dataset, method: str, opts: dict) -> tuple[object, dict]:
    """Contrastive fine-tuning of `encoder` on (written user profile, item profile) pairs,
    plus (item, item) pairs from the same user's training items when `ft_item_weight` > 0.

    Returns a new TextEncoder (LoRA merged) and a log with trainable parameter counts and
    the validation Recall@20 history; the best checkpoint by that metric is kept.
    """
    import torch
    from tqdm import tqdm

    from model.finetune import count_parameters, finished, prepare
    from model.text import TextEncoder, embed_tokens
    from utils import log

    torch.manual_seed(opts["seed"])
    rng = np.random.default_rng(opts["seed"])
    pairs = profile_pairs(dataset, rng)
    has_text = np.array([p is not None for p in dataset.item_profiles])
    if len(pairs) == 0:
        raise ValueError("no training pairs: fine-tuning needs users with written profiles")
    trainable = prepare(encoder.model, method)
    parameters = count_parameters(trainable)
    optimiser = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad],
                                  lr=opts["ft_lr"])
    settings = dict(pooling=encoder.pooling, max_length=encoder.max_length,
                    batch_size=encoder.batch_size, device=encoder.device)
    probe = ValidationProbe(dataset, seed=opts["seed"])

    def snapshot_recall() -> float:
        recall = probe.recall(TextEncoder(trainable, encoder.tokenizer, **settings))
        trainable.train()
        return recall

    best = {"recall": snapshot_recall(), "step": 0,
            "state": {k: v.detach().clone() for k, v in trainable.state_dict().items()}}
    history = [{"step": 0, "val_recall@20": round(best["recall"], 5)}]
    log(f"fine-tune ({method}): {len(pairs):,} pairs, {parameters['trainable']:,} of "
        f"{parameters['total']:,} parameters trainable; zero-shot probe R@20 {best['recall']:.4f}")
    def embed(texts: list[str]) -> torch.Tensor:
        tokens = encoder.tokenizer(texts, padding=True, truncation=True,
                                   max_length=opts["ft_max_length"], return_tensors="pt")
        tokens = {k: v.to(encoder.device) for k, v in tokens.items()}
        return torch.nn.functional.normalize(embed_tokens(trainable, tokens, encoder.pooling),
                                             dim=-1)

    def item_texts(items: np.ndarray) -> list[str]:
        return [dataset.item_profiles[i] for i in items]

    trainable.train()
    batch, item_weight = opts["ft_batch"], opts["ft_item_weight"]
    autocast, scaler = mixed_precision(encoder.device, opts["ft_amp"])
    for step in tqdm(range(1, opts["ft_steps"] + 1), desc=f"fine-tune {method}", disable=None):
        rows = one_pair_per_item(pairs[rng.integers(len(pairs), size=batch)])
        with autocast:
            users = embed([dataset.user_profiles[u] for u in rows[:, 0]])
            loss = info_nce(users, embed(item_texts(rows[:, 1])), opts["ft_temperature"])
            if item_weight > 0:
                items = one_pair_per_item(sample_item_pairs(dataset.train, has_text, batch, rng))
                item_loss = info_nce(embed(item_texts(items[:, 0])),
                                     embed(item_texts(items[:, 1])), opts["ft_temperature"])
                loss = loss + item_weight * item_loss
        optimiser.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        if step % opts["ft_eval_every"] == 0 or step == opts["ft_steps"]:
            recall = snapshot_recall()
            history.append({"step": step, "loss": round(loss.item(), 4),
                            "val_recall@20": round(recall, 5)})
            log(f"fine-tune ({method}) step {step}: loss {loss.item():.4f}  probe R@20 {recall:.4f}")
            if recall > best["recall"]:
                best = {"recall": recall, "step": step,
                        "state": {k: v.detach().clone() for k, v in trainable.state_dict().items()}}
    trainable.load_state_dict(best["state"])
    model = finished(trainable, method).eval()
    for parameter in model.parameters():
        parameter.requires_grad = False
    tuned = TextEncoder(model, encoder.tokenizer, quantize=encoder.quantize,
                        name=f"{encoder.name}+{method}", **settings)
    return tuned, {"method": method, "learning_rate": opts["ft_lr"],
                   "trainable_parameters": parameters["trainable"],
                   "total_parameters": parameters["total"], "pairs": int(len(pairs)),
                   "best_step": best["step"], "best_val_recall@20": round(best["recall"], 5),
                   "history": history}
