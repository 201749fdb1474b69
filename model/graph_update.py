"""Graph bundles in a daily update (`model/update.py`), each from the state its bundle keeps
(the manifest's "graph" entry):

- LightGCN: the layer-0 embeddings grow by the new rows (their neighbours' mean), a few BPR
  passes run over the new pairs and GRAPH_REPLAY times as many replayed old ones, and every
  vector is propagated again over the updated graph.
- GraphSAGE: the inductive path. A new node enters the updated graph with its profile's
  encoded text as features when the update brings one (else the plain mean of its
  neighbours' features, which a refit would compute differently: the text model's normalised
  item mean for a user, zero for an item without text) and no id embedding, as the network
  treats every node it was not trained on; known nodes keep their id embeddings and see
  their new neighbours. The network then takes SAGE_EPOCHS passes of its own training (BPR
  over every pair, sampled neighbourhoods when it was trained so) from the trained weights,
  kept if validation Recall@20 does not fall (the same pairs then gate the version, which
  favours passing), and runs over the updated graph.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from coreMethod import bipartite_graph, bpr_epoch, epoch_batch
from model.config import TrainConfig
from model.foldin import grown_by_neighbours
from model.graph import GraphSAGE, LightGCN, graph_adjacency
from utils import deterministic_torch

GRAPH_EPOCHS = 5  # LightGCN bundle: BPR passes over the new pairs and replayed old ones
GRAPH_REPLAY = 4  # ... old pairs replayed per new pair (more: less forgetting)
SAGE_EPOCHS = 2  # GraphSAGE bundle: training passes over every pair after new nodes join


def lightgcn_warm_start(folder: Path, entry: dict, seen: sp.csr_matrix, added: sp.csr_matrix,
                        old_seen: sp.csr_matrix, n_old_users: int
                        ) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """(users, items, the version's files {name: array}, what was touched) of a LightGCN
    bundle after the day's pairs `added` (`seen`: all of them, `old_seen`: the parent's)."""
    layer0 = np.load(folder / entry["file"])
    grown = np.vstack(grown_by_neighbours(*np.split(layer0, [n_old_users]), seen))
    model = LightGCN.from_layer0(grown, entry)
    edges, replayed = with_replay(added, old_seen, seed=seen.shape[0])
    users, items, layer0 = model.continue_training((seen > 0).astype(np.float32).tocsr(),
                                                   edges, GRAPH_EPOCHS)
    return users, items, {entry["file"]: layer0}, {
        "epochs": GRAPH_EPOCHS, "new_pairs": int(added.nnz), "replayed_pairs": replayed}


def with_replay(added: sp.csr_matrix, old: sp.csr_matrix, seed: int
                ) -> tuple[sp.csr_matrix, int]:
    """(`added` and GRAPH_REPLAY times as many pairs drawn from `old` (seeded), as one
    binary matrix; how many were drawn)."""
    old = old.tocoo()
    picks = np.random.default_rng(seed).choice(
        old.nnz, min(old.nnz, GRAPH_REPLAY * added.nnz), replace=False)
    replay = sp.csr_matrix((np.ones(len(picks), np.float32), (old.row[picks], old.col[picks])),
                           shape=added.shape)
    return ((added + replay) > 0).astype(np.float32).tocsr(), len(picks)


def sage_pass(folder: Path, entry: dict, seen: sp.csr_matrix, n_old_users: int,
              n_old_items: int, encoded: dict[str, dict[int, np.ndarray]],
              score: Callable[[np.ndarray, np.ndarray], float] | None = None
              ) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """(users, items, the version's files {name: state or array}, what was touched) of a
    GraphSAGE bundle over the updated graph `seen`; `encoded`: {"users"/"items": {row:
    text features}} of new rows with a profile; `score(users, items)`: a validation figure
    that decides whether the training passes are kept."""
    state = torch.load(folder / entry["file"], weights_only=True)
    n_users, n_items = seen.shape
    new_rows = np.r_[n_old_users:n_users, n_users + n_old_items:n_users + n_items]
    old_rows = np.r_[:n_old_users, n_users:n_users + n_old_items]
    for key in ("id_embedding.weight", "id_mask"):  # new nodes: no id embedding
        if key in state:
            grown = state[key].new_zeros((n_users + n_items, state[key].shape[1]))
            grown[torch.as_tensor(old_rows)] = state[key]
            state[key] = grown
    features, from_text = None, 0
    if entry.get("features"):
        old = np.load(folder / entry["features"])
        users, items = grown_by_neighbours(old[:n_old_users], old[n_old_users:], seen)
        for side, block in (("users", users), ("items", items)):
            for row, vector in encoded.get(side, {}).items():
                block[row], from_text = vector, from_text + 1
        features = np.vstack([users, items])
    net = GraphSAGE.network(state, entry)
    tensor = None if features is None else torch.as_tensor(features)
    adjacency = graph_adjacency(seen, normalize=False)
    with torch.no_grad():
        out = net(tensor, adjacency).numpy()  # the inductive pass alone
    touched = {"nodes": n_users + n_items, "new_nodes": len(new_rows),
               "features_from_text": from_text}
    epochs = SAGE_EPOCHS if "train" in entry else 0  # (a bundle without its settings)
    if epochs:
        continue_sage(net, tensor, seen, adjacency, entry, epochs)
        with torch.no_grad():
            trained = net(tensor, adjacency).numpy()
        touched["epochs"] = f"{epochs}: kept (no validation pairs to check them)"
        if score is not None:  # GraphSAGE's training is noisy: validation decides
            before, after = (score(vectors[:n_users], vectors[n_users:])
                             for vectors in (out, trained))
            kept = after >= before
            touched["epochs"] = f"{epochs}: {'kept' if kept else 'dropped'} (validation " \
                f"Recall@20 {after:.4f} trained vs {before:.4f} without)"
        if score is None or kept:
            out = trained
            state = {key: value.detach().clone() for key, value in net.state_dict().items()}
    files = {entry["file"]: state}
    if features is not None:
        files[entry["features"]] = features
    return out[:n_users], out[n_users:], files, touched


def continue_sage(net: torch.nn.Module, features: torch.Tensor | None, seen: sp.csr_matrix,
                  adjacency: torch.Tensor, entry: dict, epochs: int) -> None:
    """`epochs` passes of the network's own training (`entry`'s settings: BPR over every
    pair of `seen`, over sampled neighbourhoods when it was trained in mini-batches, else
    over `adjacency`, the graph of `seen`) from its current weights; new nodes stay without
    id embeddings."""
    settings, n_users = TrainConfig.coerce(entry["train"]), seen.shape[0]
    binary = (seen > 0).astype(np.float32).tocsr()
    rng = np.random.default_rng(entry.get("seed", 0))
    torch.manual_seed(entry.get("seed", 0))
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr)
    fanout = entry.get("fanout", 0)
    embed, embed_triples = net.bpr_views(features, adjacency,
                                         bipartite_graph(binary) if fanout else None,
                                         n_users, fanout, rng)
    with deterministic_torch():
        for epoch in range(1, epochs + 1):
            bpr_epoch(net, embed, optimiser, binary, epoch_batch(settings.batch, binary.nnz),
                      settings.weight_decay, rng, "cpu", f"graphsage update {epoch}/{epochs}",
                      None, embed_triples)
    net.eval()


def save_graph_files(folder: Path, files: dict) -> None:
    for name, content in files.items():
        if isinstance(content, np.ndarray):
            np.save(folder / name, content.astype(np.float32))
        else:
            torch.save(content, folder / name)


def sage_cold_start_network(folder: Path, entry: dict) -> torch.nn.Module:
    """A bundle's network for nodes outside its graph: the shared weights only (one empty
    id row instead of the id table, which such a node never reads)."""
    state = torch.load(folder / entry["file"], weights_only=True)
    for key in ("id_embedding.weight", "id_mask"):
        if key in state:
            state[key] = state[key].new_zeros((1, state[key].shape[1]))
    return GraphSAGE.network(state, entry)


def sage_cold_start(net: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """Vectors of nodes with no interactions from their text features alone: the network's
    inductive path with no neighbours (a new user's profile, a new item's)."""
    return net.alone(features)
