"""Graph recall models on the training interaction graph: DeepWalk (random walks + gensim
skip-gram), GraphSAGE (PyG SAGEConv over text features and id embeddings, inductive for
new nodes), LightGCN (PyG) and SimGCL (LightGCN with a contrastive term). Trained models
stop early on validation Recall@20."""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from gensim.models import Word2Vec
from gensim.models.callbacks import CallbackAny2Vec
from torch_geometric.nn import LightGCN as PygLightGCN
from torch_geometric.nn import SAGEConv
from tqdm import tqdm

from coreMethod import (BestState, bipartite_graph, bpr_epoch, epoch_batch, info_nce,
                        sample_neighbours, train_until_no_improvement, walk_blocks)
from evaluation import Evaluator
from model.base import Recommender, register, require_validation
from model.adjacency import SymmetricLGConv, graph_adjacency
from model.config import TrainConfig
from model.text import ENCODER_DIR, save_encoder
from utils import (data_parallel, deterministic_torch, log, mean_over_ranks, pick_device,
                   rank0_value)

STATE_FILE = "state.pt"
LAYER0_FILE = "graph_layer0.npy"  # a LightGCN bundle's layer-0 embeddings
SAGE_FILE = "graph_sage.pt"  # a GraphSAGE bundle's network (id rows: the bundle's)
FEATURES_FILE = "graph_features.npy"  # ... and its nodes' input features, users first


@register
class DeepWalk(Recommender):
    """Weighted random walks on the training graph (edge weight = visit count), fed to
    gensim's skip-gram. Users and items share one vector space."""

    _name = "deepwalk"

    def __init__(self, dim: int = 64, walks_per_node: int = 10, walk_length: int = 20,
                 window: int = 5, epochs: int = 5, workers: int = 1, seed: int = 2023) -> None:
        super().__init__()
        self.dim, self.walks_per_node, self.walk_length = dim, walks_per_node, walk_length
        self.window, self.epochs, self.workers, self.seed = window, epochs, workers, seed

    def params(self) -> dict:
        return {"dim": self.dim, "walks_per_node": self.walks_per_node,
                "walk_length": self.walk_length, "window": self.window, "epochs": self.epochs,
                "workers": self.workers, "seed": self.seed}

    def fit(self, dataset) -> "DeepWalk":
        graph = bipartite_graph(dataset.train)
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "walks.txt"
            count = write_walks(corpus, walk_blocks(graph, self.walks_per_node,
                                                    self.walk_length, self.seed))
            log(f"deepwalk: {count:,} walks x {self.walk_length} steps")
            skipgram = Word2Vec(corpus_file=str(corpus), vector_size=self.dim, window=self.window,
                                sg=1, negative=5, min_count=1, workers=self.workers,
                                epochs=self.epochs, seed=self.seed,
                                callbacks=[_EpochBar("deepwalk skip-gram", self.epochs)])
        vectors = np.zeros((graph.shape[0], self.dim), dtype=np.float32)
        keys = np.array([int(k) for k in skipgram.wv.index_to_key])
        vectors[keys] = skipgram.wv.vectors
        self.user_vectors, self.item_vectors = vectors[:dataset.n_users], vectors[dataset.n_users:]
        self._fitted_on(dataset)
        return self


def write_walks(path: Path, blocks) -> int:
    """Walks, block by block (never all in memory), one per line of space-separated node
    ids: gensim's `corpus_file` format. Returns how many were written."""
    count = 0
    with path.open("w") as out:
        for walks in blocks:
            pd.DataFrame(walks).to_csv(out, sep=" ", header=False, index=False)
            count += len(walks)
    return count


class _EpochBar(CallbackAny2Vec):
    """A progress bar over gensim's epochs (total and time estimate)."""

    def __init__(self, desc: str, epochs: int) -> None:
        self.bar = tqdm(total=epochs, desc=desc, unit="epoch", disable=None)

    def on_epoch_end(self, model) -> None:
        self.bar.update(1)

    def on_train_end(self, model) -> None:
        self.bar.close()


class SAGENet(torch.nn.Module):
    """Input projection of [text features, id embedding] then GraphSAGE layers.

    SAGEConv adds a transform of the mean of the neighbours to a transform of the node's
    own representation. Nodes without training edges get no id embedding (it would be
    untrained noise), so their vectors come from their text alone: the model is inductive.
    """

    def __init__(self, n_nodes: int, feature_dim: int, id_dim: int, hidden: int,
                 layers: int) -> None:
        super().__init__()
        if feature_dim + id_dim == 0:
            raise ValueError("GraphSAGE needs text features, id embeddings, or both")
        self.id_embedding = torch.nn.Embedding(n_nodes, id_dim) if id_dim else None
        if self.id_embedding is not None:
            torch.nn.init.normal_(self.id_embedding.weight, std=0.1)
        self.register_buffer("id_mask", torch.ones(n_nodes, 1))
        self.project = torch.nn.Linear(feature_dim + id_dim, hidden)
        self.convs = torch.nn.ModuleList(SAGEConv(hidden, hidden) for _ in range(layers))

    def forward(self, features: torch.Tensor | None, adjacency: torch.Tensor,
                new_nodes: int | None = None, nodes: torch.Tensor | None = None
                ) -> torch.Tensor:
        """All nodes of the training graph; or its `nodes` (features and adjacency are
        theirs: a sampled neighbourhood); or (`new_nodes` rows of `features`) nodes that are
        not in it: those get no id vector."""
        parts = [] if features is None else [features]
        if self.id_embedding is not None:
            if nodes is not None:
                parts.append(self.id_embedding(nodes) * self.id_mask[nodes])
            elif new_nodes is None:
                parts.append(self.id_embedding.weight * self.id_mask)
            else:
                parts.append(features.new_zeros(new_nodes, self.id_embedding.embedding_dim))
        hidden = self.project(torch.cat(parts, dim=1))
        for position, conv in enumerate(self.convs):
            hidden = conv(hidden, adjacency)
            if position < len(self.convs) - 1:
                hidden = torch.relu(hidden)
        return hidden


    def bpr_views(self, features: torch.Tensor | None, adjacency: torch.Tensor | None,
                  graph: sp.csr_matrix, n_users: int, fanout: int, rng: np.random.Generator):
        """(embed, embed_triples) for `bpr_epoch`: every node's output over `adjacency` (full
        batch), and (None without a `fanout`) a batch's users, positives and negatives over
        their sampled neighbourhoods in `graph`."""
        def embed():
            out = self(features, adjacency)
            return out[:n_users], out[n_users:]

        def embed_triples(users, positives, negatives):
            seeds = torch.cat([users, positives + n_users, negatives + n_users])
            return self.sampled(features, graph, seeds, fanout, rng).split(len(users))
        return embed, embed_triples if fanout else None

    def alone(self, features: np.ndarray) -> np.ndarray:
        """Outputs of nodes outside the graph (no id embedding, no neighbours) from their
        features alone."""
        device = self.project.weight.device
        with torch.no_grad():
            tensor = torch.as_tensor(features, dtype=torch.float32, device=device)
            empty = torch.empty((2, 0), dtype=torch.long, device=device)
            return self(tensor, empty, new_nodes=len(tensor)).cpu().numpy()

    def sampled(self, features: torch.Tensor | None, graph: sp.csr_matrix,
                seeds: torch.Tensor, fanout: int, rng: np.random.Generator) -> torch.Tensor:
        """The outputs of `seeds` (node ids, repeats allowed) over their sampled
        neighbourhoods in `graph` (`sample_neighbours`, `fanout` per node and layer)."""
        distinct, inverse = np.unique(seeds.cpu().numpy(), return_inverse=True)
        nodes, edges = sample_neighbours(graph, distinct, [fanout] * len(self.convs), rng)
        device = self.project.weight.device
        nodes = torch.as_tensor(nodes, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            local = torch.sparse_coo_tensor(torch.as_tensor(edges, device=device),
                                            torch.ones(edges.shape[1], device=device),
                                            (len(nodes), len(nodes))).to_sparse_csr()
        out = self(None if features is None else features[nodes], local, nodes=nodes)
        return out[torch.as_tensor(inverse, device=device)]


class _BPRGraphModel(Recommender):
    """Shared by GraphSAGE and LightGCN: a torch network over the training graph, trained
    with BPR full batch, early-stopped on validation Recall@20, saved as a state dict."""

    warmup_epochs = 0  # epochs whose validation checks do not count towards --patience

    def __init__(self, dim: int = 64, train: TrainConfig | dict | None = None,
                 seed: int = 2023, device: str = "auto") -> None:
        super().__init__()
        self.dim, self.train_config = dim, TrainConfig.coerce(train)
        self.seed, self.device = seed, device
        self.net: torch.nn.Module | None = None

    def params(self) -> dict:
        return {"dim": self.dim, "train": vars(self.train_config), "seed": self.seed,
                "device": self.device}

    def _loss_fn(self, n_users: int):
        return None  # the default: BPR with an L2 penalty on the output vectors

    def _batch_term(self, n_users: int):
        """A loss term over each whole global batch (`bpr_epoch`'s batch_term), or None."""
        return None

    def _train(self, dataset, embed, device: str, embed_triples=None) -> None:
        config = self.train_config
        rng = np.random.default_rng(self.seed)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        validation = Evaluator.on_validation(dataset)
        require_validation(validation)

        def step(round_: int) -> dict:
            first = (round_ - 1) * config.eval_every + 1
            last = min(round_ * config.eval_every, config.epochs)
            for epoch in range(first, last + 1):
                loss = bpr_epoch(self.net, embed, optimiser, dataset.train,
                                 epoch_batch(config.batch, dataset.train.nnz),
                                 config.weight_decay, rng, device,
                                 f"{self.name} epoch {epoch}/{config.epochs}",
                                 self._loss_fn(dataset.n_users), embed_triples,
                                 self._batch_term(dataset.n_users))
            return {"epoch": f"{last}/{config.epochs}", "loss": round(loss, 5)}

        def score() -> float:  # rank 0's, in a process group
            if data_parallel()[0] != 0:
                return rank0_value(0.0)
            self.net.eval()
            with torch.no_grad():
                users, items = (t.float().cpu().numpy() for t in embed())
            return rank0_value(validation.vector_recall(users, items))

        rounds = -(-config.epochs // config.eval_every)
        with deterministic_torch():
            log_ = train_until_no_improvement(step, score, BestState(self.net), rounds,
                                              config.patience, label=self.name,
                                              warmup=self.warmup_epochs // config.eval_every)
        best = next(h for h in log_["history"] if h["round"] == log_["best_round"])
        best_epoch = int(str(best["epoch"]).split("/")[0])
        at_cap = not log_["stopped_early"]  # the epoch cap ended it, not early stopping
        if at_cap:
            log(f"{self.name}: stopped by the epoch cap ({config.epochs}), not by early "
                f"stopping (best epoch {best_epoch}); validation was still rising: more "
                "--epochs may help")
        self.training_log = {"best_epoch": best_epoch, "stopped_at_epoch_cap": at_cap,
                             "best_val_recall@20": log_["best_val_recall@20"],
                             "history": log_["history"], "device": device}
        with torch.no_grad():
            self.user_vectors, self.item_vectors = (t.cpu().numpy() for t in embed())

    def _network(self, n_nodes: int, state: dict) -> torch.nn.Module:
        """An untrained network over `n_nodes` nodes, as `_state()` describes it."""
        raise NotImplementedError

    def _save_extra(self, folder: Path) -> None:
        torch.save({k: v.cpu() for k, v in self.net.state_dict().items()}, folder / STATE_FILE)

    def _restore(self, state: dict, arrays: dict, folder: Path) -> None:
        self._load_net(self.n_users + self.n_items, state,
                       torch.load(folder / STATE_FILE, weights_only=True))

    def _load_net(self, n_nodes: int, state: dict, weights: dict) -> None:
        self.net = self._network(n_nodes, state)
        self.net.load_state_dict(weights)
        self.net.eval()

    def fitted_state(self) -> dict:
        """What `adopt` needs to take this fit over (handed back by a Ray Train worker)."""
        return {"net": {k: v.cpu() for k, v in self.net.state_dict().items()},
                "state": self._state(), "training_log": self.training_log,
                "vectors": (self.user_vectors, self.item_vectors)}

    def adopt(self, fitted: dict, dataset) -> "_BPRGraphModel":
        self._load_net(dataset.n_users + dataset.n_items, fitted["state"], fitted["net"])
        self.net.to(pick_device(self.device))
        self.user_vectors, self.item_vectors = fitted["vectors"]
        self.training_log = fitted["training_log"]
        self._fitted_on(dataset)
        return self


@register
class GraphSAGE(_BPRGraphModel):
    """GraphSAGE trained on link prediction with BPR, full batch or (`fanout` > 0) in
    mini-batches: each BPR batch runs over its nodes' sampled neighbourhoods (`fanout`
    neighbours per node and layer), so a step's memory does not grow with the graph.
    Input features: text embeddings (pass a fitted text model to `fit`) and/or learned id
    embeddings."""

    _name = "graphsage"

    def __init__(self, dim: int = 64, layers: int = 2, id_dim: int = 64,
                 train: TrainConfig | dict | None = None, seed: int = 2023,
                 device: str = "auto", fanout: int = 0) -> None:
        super().__init__(dim, train, seed, device)
        self.layers, self.id_dim, self.fanout = layers, id_dim, fanout
        self.feature_dim = 0
        self.features: tuple[np.ndarray, np.ndarray] | None = None  # (users, items) inputs
        self.text_encoder = None  # embeds a new node's profile (a Path once loaded)

    def params(self) -> dict:
        return {**super().params(), "layers": self.layers, "id_dim": self.id_dim,
                "fanout": self.fanout}

    def fit(self, dataset, text: Recommender | tuple[np.ndarray, np.ndarray] | None = None,
            train_loop=None) -> "GraphSAGE":
        """`text`: a fitted text model, or its (user, item) vectors, as input features;
        `train_loop(model, dataset, text vectors)`: fits elsewhere (`model.ddp`)."""
        self.features = None if text is None else \
            (text if isinstance(text, tuple) else text.embeddings())  # held, not copied
        self.text_encoder = getattr(text, "encoder", None)
        if train_loop is not None:
            return train_loop(self, dataset, self.features)
        device = pick_device(self.device)
        torch.manual_seed(self.seed)
        adjacency = graph_adjacency(dataset.train, normalize=False).to(device)
        features = None
        if self.features is not None:
            features = torch.as_tensor(np.vstack(self.features), dtype=torch.float32,
                                       device=device)
        self.feature_dim = 0 if features is None else features.shape[1]
        n_users, n_nodes = dataset.n_users, dataset.n_users + dataset.n_items
        self.net = SAGENet(n_nodes, self.feature_dim, self.id_dim, self.dim, self.layers)
        graph, rng = bipartite_graph(dataset.train), np.random.default_rng(self.seed + 1)
        degree = np.diff(graph.indptr)
        self.net.id_mask.copy_(torch.as_tensor(degree > 0, dtype=torch.float32).unsqueeze(1))
        self.net.to(device)
        embed, embed_triples = self.net.bpr_views(features, adjacency, graph, n_users,
                                                  self.fanout, rng)
        self._train(dataset, embed, device, embed_triples)
        self._fitted_on(dataset)
        return self

    @property
    def places_cold_start(self) -> bool:
        return self.feature_dim > 0  # through the text features of the new node

    def embed_new(self, features: np.ndarray) -> np.ndarray:
        """Vectors for users or items outside the training graph, from their text alone."""
        return self.net.alone(features)

    def save_graph(self, folder: Path, users: np.ndarray | None = None,
                   items: np.ndarray | None = None) -> dict:
        """Write what an update's inductive pass needs for rows `users` and `items` (all by
        default) to `folder`: the network with those rows' id embeddings (SAGE_FILE) and
        their input features (FEATURES_FILE); returns the settings a manifest records, or
        None when the features are not at hand (a model saved before they were kept: its
        updates fall back to the fold-in rule)."""
        if self.feature_dim and self.features is None:
            return None
        n_users, n_items = self.n_users, self.n_items
        users = np.arange(n_users) if users is None else np.asarray(users)
        items = np.arange(n_items) if items is None else np.asarray(items)
        rows = torch.as_tensor(np.concatenate([users, n_users + items]))
        state = {k: v.cpu() for k, v in self.net.state_dict().items()}
        for key in ("id_embedding.weight", "id_mask"):
            if key in state:
                state[key] = state[key][rows].clone()
        torch.save(state, folder / SAGE_FILE)
        if self.features is not None:
            np.save(folder / FEATURES_FILE, np.vstack([
                self.features[0][users], self.features[1][items]]).astype(np.float32))
        return {"model": "graphsage", "file": SAGE_FILE,
                "features": FEATURES_FILE if self.features is not None else None,
                "dim": self.dim, "layers": self.layers, "id_dim": self.id_dim,
                "feature_dim": self.feature_dim, "fanout": self.fanout,
                "train": vars(self.train_config), "seed": self.seed}

    @classmethod
    def network(cls, state: dict, settings: dict) -> SAGENet:
        """The network of a bundle's SAGE_FILE state (as many id rows as it holds)."""
        rows = len(state["id_mask"])
        net = SAGENet(rows, settings["feature_dim"], settings["id_dim"], settings["dim"],
                      settings["layers"])
        net.load_state_dict(state)
        return net.eval()

    def _state(self) -> dict:
        return {"feature_dim": self.feature_dim}

    def _save_extra(self, folder: Path) -> None:
        super()._save_extra(folder)
        if self.features is not None:  # what an export needs for updates of new nodes
            np.save(folder / "user_features.npy", self.features[0])
            np.save(folder / "item_features.npy", self.features[1])
        if isinstance(self.text_encoder, Path):  # loaded, never used here: copied as it is
            shutil.copytree(self.text_encoder, folder / ENCODER_DIR)
        elif self.text_encoder is not None:
            save_encoder(self.text_encoder, folder / ENCODER_DIR)

    def _restore(self, state: dict, arrays: dict, folder: Path) -> None:
        super()._restore(state, arrays, folder)
        if (folder / "user_features.npy").exists():
            self.features = (np.load(folder / "user_features.npy", mmap_mode="r"),
                             np.load(folder / "item_features.npy", mmap_mode="r"))
        if (folder / ENCODER_DIR).is_dir():
            self.text_encoder = folder / ENCODER_DIR

    def _network(self, n_nodes: int, state: dict) -> SAGENet:
        self.feature_dim = state["feature_dim"]
        return SAGENet(n_nodes, self.feature_dim, self.id_dim, self.dim, self.layers)


@register
class LightGCN(_BPRGraphModel):
    """PyG's LightGCN on the binary training graph, BPR loss, early stopping."""

    _name = "lightgcn"
    _adjacency = None  # the normalised graph while `fit` trains (a loss may propagate)

    def __init__(self, dim: int = 64, layers: int = 3, train: TrainConfig | dict | None = None,
                 seed: int = 2023, device: str = "auto") -> None:
        super().__init__(dim, train, seed, device)
        self.layers = layers

    def params(self) -> dict:
        return {**super().params(), "layers": self.layers}

    def _network(self, n_nodes: int, state: dict | None = None) -> PygLightGCN:
        net = PygLightGCN(n_nodes, self.dim, self.layers)
        # the adjacency is normalised once, in graph_adjacency (no parameters: same state)
        net.convs = torch.nn.ModuleList(SymmetricLGConv() for _ in range(self.layers))
        return net

    def _loss_fn(self, n_users: int):
        """PyG's LightGCN loss: BPR on the propagated vectors, L2 on the layer-0 embeddings
        of the batch's nodes (as in the paper), not on the propagated ones."""
        def loss(user, positive, negative, users, positives, negatives):
            nodes = torch.cat([users, positives + n_users, negatives + n_users])
            return self.net.recommendation_loss((user * positive).sum(-1),
                                                (user * negative).sum(-1), node_id=nodes,
                                                lambda_reg=self.train_config.weight_decay)
        return loss

    def fit(self, dataset, train_loop=None) -> "LightGCN":
        """`train_loop(model, dataset)`: fits elsewhere (`model.ddp`)."""
        if train_loop is not None:
            return train_loop(self, dataset)
        device = pick_device(self.device)
        torch.manual_seed(self.seed)
        adjacency = graph_adjacency(dataset.train, normalize=True).to(device)
        n_users = dataset.n_users
        self.net = self._network(n_users + dataset.n_items).to(device)

        def embed():
            out = self.net.get_embedding(adjacency)
            return out[:n_users], out[n_users:]

        self._adjacency = adjacency  # for a loss that propagates itself (SimGCL)
        try:
            self._train(dataset, embed, device)
        finally:
            self._adjacency = None
        self._fitted_on(dataset)
        return self

    def save_graph(self, folder: Path, users: np.ndarray | None = None,
                   items: np.ndarray | None = None) -> dict:
        """Write the layer-0 embeddings of rows `users` and `items` (all by default), users
        first, to `folder`/LAYER0_FILE, what an update warm-starts from; returns the
        settings a bundle's manifest records for that."""
        weight = self.net.embedding.weight.detach().cpu().numpy()
        n_users = len(self.user_vectors)
        user_rows, item_rows = weight[:n_users], weight[n_users:]
        np.save(folder / LAYER0_FILE, np.vstack([
            user_rows if users is None else user_rows[users],
            item_rows if items is None else item_rows[items]]).astype(np.float32))
        return {"model": "lightgcn", "file": LAYER0_FILE, "dim": self.dim,
                "layers": self.layers, "train": vars(self.train_config), "seed": self.seed}

    @classmethod
    def from_layer0(cls, layer0: np.ndarray, settings: dict) -> "LightGCN":
        """A LightGCN network whose layer-0 embeddings are `layer0` (users, then items)."""
        model = cls(settings["dim"], settings["layers"], settings["train"], settings["seed"])
        model.net = model._network(len(layer0))
        with torch.no_grad():
            model.net.embedding.weight.copy_(torch.as_tensor(layer0))
        return model

    def continue_training(self, graph: sp.csr_matrix, edges: sp.csr_matrix,
                          epochs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`epochs` BPR passes over the pairs of `edges` (e.g. a day's new pairs and a replayed
        sample of old ones), propagating over `graph` (all interactions), from the current
        embeddings. Returns the propagated (user, item) vectors and the layer-0 embeddings."""
        device = pick_device(self.device)
        torch.manual_seed(self.seed)
        adjacency = graph_adjacency(graph, normalize=True).to(device)
        self.net.to(device)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=self.train_config.lr)
        rng, n_users = np.random.default_rng(self.seed), graph.shape[0]

        def embed():
            out = self.net.get_embedding(adjacency)
            return out[:n_users], out[n_users:]
        with deterministic_torch():
            for epoch in range(1, epochs + 1):
                bpr_epoch(self.net, embed, optimiser, edges,
                          epoch_batch(self.train_config.batch, edges.nnz),
                          self.train_config.weight_decay, rng, device,
                          f"lightgcn warm start {epoch}/{epochs}",
                          LightGCN._loss_fn(self, n_users))
        self.net.eval()
        with torch.no_grad():
            users, items = (t.cpu().numpy() for t in embed())
        return users, items, self.net.embedding.weight.detach().cpu().numpy()


@register
class SimGCL(LightGCN):
    """LightGCN trained with SimGCL's contrastive term (Yu et al., SIGIR 2022). Besides BPR,
    each step propagates two noisy views (every layer's output moved by a random vector of
    length `eps` into its own orthant) and adds `cl_weight` x InfoNCE (`temperature`)
    between the two views of (at most `cl_nodes` of) the batch's users and of its positive
    items, the others as negatives. That spreads the vectors more evenly over the sphere (less
    popularity bias) and converges in fewer epochs; each step costs three propagations
    instead of one. The network and its vectors at inference are LightGCN's (layer 0
    included, as in RLMRec's SimGCL); a bundle's daily update warm-starts it as LightGCN
    (BPR only). On Ray Train every rank takes its share of the BPR batch and computes the
    contrastive term over the whole batch with the same noise (same torch seed): the
    averaged gradients are one process's."""

    _name = "simgcl"
    # validation dips in the first epochs (the views spread the vectors) before it climbs
    warmup_epochs = 10

    def __init__(self, dim: int = 64, layers: int = 3, train: TrainConfig | dict | None = None,
                 seed: int = 2023, device: str = "auto", cl_weight: float = 0.02,
                 eps: float = 0.1, temperature: float = 0.2, cl_nodes: int = 2048) -> None:
        super().__init__(dim, layers, train, seed, device)
        self.cl_weight, self.eps, self.temperature = cl_weight, eps, temperature
        self.cl_nodes = cl_nodes

    def params(self) -> dict:
        return {**super().params(), "cl_weight": self.cl_weight, "eps": self.eps,
                "temperature": self.temperature, "cl_nodes": self.cl_nodes}

    def _noisy_view(self) -> torch.Tensor:
        """LightGCN's propagation with each layer's output perturbed (all nodes)."""
        net = self.net
        x = net.embedding.weight
        out = x * net.alpha[0]
        for layer, conv in enumerate(net.convs):
            x = conv(x, self._adjacency)
            x = x + torch.sign(x) * F.normalize(torch.rand_like(x), dim=-1) * self.eps
            out = out + x * net.alpha[layer + 1]
        return out

    def _some(self, nodes: torch.Tensor) -> torch.Tensor:
        """At most `cl_nodes` of the distinct `nodes`, at random: the InfoNCE's cost grows
        with the square of their number (the batch's nodes are a sample anyway)."""
        distinct = torch.unique(nodes)
        if len(distinct) <= self.cl_nodes:
            return distinct
        return distinct[torch.randperm(len(distinct), device=distinct.device)[:self.cl_nodes]]

    def _batch_term(self, n_users: int):
        if not self.cl_weight:
            return None

        def contrast(users: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
            one, two = self._noisy_view(), self._noisy_view()
            term = self.cl_weight * sum(
                info_nce(F.normalize(one[nodes], dim=-1), F.normalize(two[nodes], dim=-1),
                         self.temperature)
                for nodes in (self._some(users), self._some(positives) + n_users))
            _require_same_on_every_rank(term)
            return term
        return contrast


def _require_same_on_every_rank(term: torch.Tensor) -> None:
    """In a process group, fail unless every rank computed the same `term` (the ranks
    drew different noise: GPUs of different models, or a random draw on one rank only);
    a step costs two scalar collectives more. Nothing to check in one process."""
    if data_parallel()[1] == 1:
        return
    mine = float(term.detach())
    if mean_over_ranks(float(rank0_value(mine) != mine)) > 0:
        raise RuntimeError("simgcl: the ranks computed different contrastive terms (different "
                           "noise); train it in one process (without --lgn-ray)")
