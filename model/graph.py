"""Graph recall models on the training interaction graph (DeepWalk, GraphSAGE, LightGCN)
and the fusion of several signals into one user and one item vector."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from utils import log


class DeepWalk:
    """Weighted random walks on the training graph (edge weight = visit count), fed to
    gensim's skip-gram. Users and items share one vector space."""

    def __init__(self, dim: int = 64, walks_per_node: int = 10, walk_length: int = 20,
                 window: int = 5, epochs: int = 5, workers: int = 1, seed: int = 2023) -> None:
        self.dim, self.walks_per_node, self.walk_length = dim, walks_per_node, walk_length
        self.window, self.epochs, self.workers, self.seed = window, epochs, workers, seed
        self.vectors = None
        self.n_users = 0

    def fit(self, dataset) -> "DeepWalk":
        import tempfile

        from gensim.models import Word2Vec

        from coreMethod import bipartite_graph, random_walks

        graph = bipartite_graph(dataset.train)
        walks = random_walks(graph, self.walks_per_node, self.walk_length, self.seed)
        log(f"deepwalk: {len(walks):,} walks x {self.walk_length} steps")
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "walks.txt"
            np.savetxt(corpus, walks, fmt="%d")
            skipgram = Word2Vec(corpus_file=str(corpus), vector_size=self.dim, window=self.window,
                                sg=1, negative=5, min_count=1, workers=self.workers,
                                epochs=self.epochs, seed=self.seed)
        self.vectors = np.zeros((graph.shape[0], self.dim), dtype=np.float32)
        keys = np.array([int(k) for k in skipgram.wv.index_to_key])
        self.vectors[keys] = skipgram.wv.vectors
        self.n_users = dataset.n_users
        return self

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self.vectors[: self.n_users], self.vectors[self.n_users:]


class SAGENet(torch.nn.Module):
    """Input projection of [text features, id embedding] then GraphSAGE layers.

    SAGEConv adds a transform of the mean of the neighbours to a transform of the node's
    own representation. Nodes without training edges get no id embedding (it would be
    untrained noise), so their vectors come from their text alone: the model is inductive.
    """

    def __init__(self, n_nodes: int, feature_dim: int, id_dim: int, hidden: int,
                 layers: int, has_edges: torch.Tensor) -> None:
        from torch_geometric.nn import SAGEConv

        super().__init__()
        if feature_dim + id_dim == 0:
            raise ValueError("GraphSAGE needs text features, id embeddings, or both")
        self.id_embedding = torch.nn.Embedding(n_nodes, id_dim) if id_dim else None
        if self.id_embedding is not None:
            torch.nn.init.normal_(self.id_embedding.weight, std=0.1)
        self.register_buffer("id_mask", has_edges.float().unsqueeze(1))
        self.project = torch.nn.Linear(feature_dim + id_dim, hidden)
        self.convs = torch.nn.ModuleList(SAGEConv(hidden, hidden) for _ in range(layers))

    def forward(self, features: torch.Tensor | None, adjacency: torch.Tensor,
                node_ids: torch.Tensor | None = None) -> torch.Tensor:
        parts = [] if features is None else [features]
        if self.id_embedding is not None:
            if node_ids is None:
                parts.append(self.id_embedding.weight * self.id_mask)
            else:  # new nodes beyond the table: no id vector
                parts.append(torch.zeros(len(features), self.id_embedding.embedding_dim))
        hidden = self.project(torch.cat(parts, dim=1))
        for position, conv in enumerate(self.convs):
            hidden = conv(hidden, adjacency)
            if position < len(self.convs) - 1:
                hidden = torch.relu(hidden)
        return hidden


class GraphSAGE:
    """GraphSAGE (full batch) trained on link prediction with BPR, early stopping on
    validation Recall@20. Input features: text embeddings and/or learned id embeddings."""

    def __init__(self, opts: dict) -> None:
        self.opts = opts
        self.net = None
        self.training_log: dict = {}

    def fit(self, dataset, user_text: np.ndarray | None = None,
            item_text: np.ndarray | None = None) -> "GraphSAGE":
        from coreMethod import train_with_early_stopping

        torch.manual_seed(self.opts["seed"])
        adjacency = graph_adjacency(dataset.train, normalize=False)
        self.n_users, n_nodes = dataset.n_users, dataset.n_users + dataset.n_items
        self.features = None if user_text is None else torch.as_tensor(
            np.vstack([user_text, item_text]), dtype=torch.float32)
        has_edges = torch.as_tensor(np.diff(dataset.train.indptr).tolist()
                                    + np.diff(dataset.train.tocsc().indptr).tolist()) > 0
        feature_dim = 0 if self.features is None else self.features.shape[1]
        self.net = SAGENet(n_nodes, feature_dim, self.opts["sage_id_dim"], self.opts["dim"],
                           self.opts["sage_layers"], has_edges)
        def embed():
            out = self.net(self.features, adjacency)
            return out[: self.n_users], out[self.n_users:]

        self.training_log = train_with_early_stopping(self.net, embed, dataset.train,
                                                      dataset.val, self.opts, "graphsage")
        with torch.no_grad():
            self.user_vectors, self.item_vectors = (t.numpy() for t in embed())
        return self

    def embed_new(self, features: np.ndarray) -> np.ndarray:
        """Vectors for unseen users or items from their text embeddings alone."""
        with torch.no_grad():
            tensor = torch.as_tensor(features, dtype=torch.float32)
            empty = torch.empty((2, 0), dtype=torch.long)
            return self.net(tensor, empty, node_ids=torch.arange(len(tensor))).numpy()

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self.user_vectors, self.item_vectors


class LightGCNRecall:
    """torch-geometric's LightGCN on the binary training graph, BPR loss, early stopping."""

    def __init__(self, opts: dict) -> None:
        self.opts = opts
        self.training_log: dict = {}

    def fit(self, dataset) -> "LightGCNRecall":
        from torch_geometric.nn import LightGCN

        from coreMethod import train_with_early_stopping

        torch.manual_seed(self.opts["seed"])
        adjacency = graph_adjacency(dataset.train, normalize=True)
        n_users = dataset.n_users
        self.net = LightGCN(n_users + dataset.n_items, self.opts["dim"], self.opts["lgn_layers"])
        for conv in self.net.convs:
            conv.normalize = False  # the adjacency is normalised once, above

        def embed():
            out = self.net.get_embedding(adjacency)
            return out[:n_users], out[n_users:]

        self.training_log = train_with_early_stopping(self.net, embed, dataset.train,
                                                      dataset.val, self.opts, "lightgcn")
        with torch.no_grad():
            self.user_vectors, self.item_vectors = (t.numpy() for t in embed())
        return self

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self.user_vectors, self.item_vectors


def graph_adjacency(train: sp.csr_matrix, normalize: bool) -> torch.Tensor:
    """The symmetric user+item adjacency as a torch sparse CSR tensor (items offset by the
    number of users). One sparse matrix product per layer is several times faster on CPU
    than edge-list message passing. `normalize`: D^-1/2 A D^-1/2, as LightGCN uses."""
    from coreMethod import bipartite_graph

    graph = bipartite_graph((train > 0).astype(np.float32))
    if normalize:
        degree = np.asarray(graph.sum(axis=1)).ravel()
        scale = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
        graph = sp.diags(scale) @ graph @ sp.diags(scale)
    graph = graph.tocsr().astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.as_tensor(graph.indptr, dtype=torch.long),
                                       torch.as_tensor(graph.indices, dtype=torch.long),
                                       torch.as_tensor(graph.data), size=graph.shape,
                                       check_invariants=True)


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


class Fusion:
    """One user and one item vector from several signals (text, DeepWalk, GraphSAGE).

    'concat': weighted concatenation of the L2-normalised parts, weights picked by
    coordinate ascent on validation Recall@20. 'projection': a learned linear map.
    """

    def __init__(self, method: str, opts: dict) -> None:
        if method not in ("concat", "projection"):
            raise ValueError(f"unknown fusion '{method}' (concat or projection)")
        self.method, self.opts = method, opts
        self.weights: dict[str, float] = {}
        self.training_log: dict = {}

    def fit(self, dataset, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> "Fusion":
        from coreMethod import search_fusion_weights, train_with_early_stopping, weighted_concat

        names = list(parts)
        user_parts = [parts[n][0] for n in names]
        item_parts = [parts[n][1] for n in names]
        weights, val_recall = search_fusion_weights(user_parts, item_parts, dataset.train,
                                                    dataset.val)
        self.weights = dict(zip(names, weights))
        self.training_log = {"fusion_weights": self.weights,
                             "best_val_recall@20": round(val_recall, 5)}
        self.user_vectors = weighted_concat(user_parts, weights)
        self.item_vectors = weighted_concat(item_parts, weights)
        if self.method == "projection":
            torch.manual_seed(self.opts["seed"])
            net = ProjectionFusion(self.user_vectors, self.item_vectors, self.opts["dim"])
            self.training_log.update(train_with_early_stopping(
                net, net, dataset.train, dataset.val, self.opts, "fusion"))
            with torch.no_grad():
                self.user_vectors, self.item_vectors = (t.numpy() for t in net())
        return self

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self.user_vectors, self.item_vectors
