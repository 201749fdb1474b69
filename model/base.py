"""The one interface every recall model honours, modelled on `implicit`:
`fit(dataset)`, `embeddings()` (or `score(users)` where a model has no vectors),
`recommend(user_ids, k)`, `similar_items`, `similar_users`, `save(folder)` and
`Recommender.load(folder)`. A sparse user x item matrix of training interactions is what
`recommend` excludes; it is saved with the model."""
from __future__ import annotations

import importlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from coreMethod import top_k_rows, unit_rows
from model.engine import search
from model.retrieval import FaissRetriever
from utils import atomic_path, write_json_atomic

MODEL_FILE = "model.json"
ARRAYS_FILE = "arrays.npz"
SEEN_FILE = "seen.npz"
FORMAT_VERSION = 1
_REGISTRY: dict[str, type["Recommender"]] = {}


class Unavailable(Exception):
    """The data does not allow this model (no profiles, say); the message says why."""


class ModelError(ValueError):
    """A saved model folder that is missing, malformed, or of another model class."""


def register(cls: type["Recommender"]) -> type["Recommender"]:
    """Make a model class loadable by `Recommender.load` (keyed by its class name)."""
    _REGISTRY[cls.__name__] = cls
    return cls


class Recommender:
    """Base class. Vector models set `user_vectors` / `item_vectors` in `fit`; score-only
    models override `score`. `user_mask` / `item_mask` (optional) mark the users a model can
    score and the items it can recommend (a text model cannot place an item without text).

    Subclasses list their constructor arguments in `params()`, and extra state in
    `_state()` (JSON) and `_arrays()` (numpy); `save` / `load` round-trip both.

    `places_cold_start`: whether a user or item without training interactions gets a vector
    (or scores) from its content (profile text), so the model can serve it; ID-based models
    cannot.
    """

    places_cold_start = False

    def __init__(self) -> None:
        self.user_vectors: np.ndarray | None = None
        self.item_vectors: np.ndarray | None = None
        self.user_mask: np.ndarray | None = None
        self.item_mask: np.ndarray | None = None
        self.seen: sp.csr_matrix | None = None
        self.training_log: dict[str, Any] = {}
        self.index_kind, self.nprobe = "flat", 16
        self._retrievers: dict[str, FaissRetriever] = {}
        self._unit_vectors: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------ to implement
    def fit(self, dataset) -> "Recommender":
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON values) that rebuild an unfitted copy."""
        return {}

    def _state(self) -> dict[str, Any]:
        return {}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray],
                 folder: Path) -> None:
        """Inverse of `_state` / `_arrays` (and of any extra files written by `_save_extra`)."""

    def _save_extra(self, folder: Path) -> None:
        """Write files beyond model.json / arrays.npz / seen.npz (torch weights, say)."""

    # ------------------------------------------------------------ shared behaviour
    @property
    def n_users(self) -> int:
        self._check_fitted()
        return self.seen.shape[0]

    @property
    def n_items(self) -> int:
        self._check_fitted()
        return self.seen.shape[1]

    def _fitted_on(self, dataset) -> None:
        """Record what `recommend` excludes: the training interactions of the data."""
        self.seen = (dataset.train > 0).astype(np.float32).tocsr()
        self._retrievers.clear()

    def _check_fitted(self) -> None:
        if self.seen is None:
            raise ModelError(f"{type(self).__name__} is not fitted: call fit(dataset) or load")

    def with_index(self, kind: str = "flat", nprobe: int = 16) -> "Recommender":
        """Use a FAISS index of this kind (flat, ivf, hnsw) for `recommend`."""
        self.index_kind, self.nprobe = kind, nprobe
        self._retrievers.clear()
        return self

    def with_retriever(self, retriever: FaissRetriever) -> "Recommender":
        """Serve `recommend` from this prebuilt item index (e.g. a calibrated one)."""
        self._retrievers.clear()
        self._retrievers["items"] = retriever
        self.index_kind, self.nprobe = retriever.kind, retriever.nprobe
        return self

    def has_vectors(self) -> bool:
        return self.item_vectors is not None

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(user vectors, item vectors): the inner product ranks items for a user."""
        self._check_fitted()
        if not self.has_vectors():
            raise ModelError(f"{type(self).__name__} has no vectors; it scores with score()")
        return self.user_vectors, self.item_vectors

    def signals(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The vectors a ranker may use as features: this model's own (and a fused model's
        parts)."""
        return {self.name: self.embeddings()} if self.has_vectors() else {}

    @property
    def name(self) -> str:
        return getattr(self, "_name", type(self).__name__.lower())

    def score(self, users: np.ndarray) -> np.ndarray:
        """Dense (len(users), n_items) scores; vector models use the inner product."""
        user_vectors, item_vectors = self.embeddings()
        return user_vectors[users] @ item_vectors.T

    def recommend(self, user_ids, k: int = 20, exclude_seen: bool = True,
                  among: np.ndarray | None = None, engine=None) -> tuple[np.ndarray, np.ndarray]:
        """(item rows, scores), shape (len(user_ids), k), best first; training items are left
        out when `exclude_seen`, and only the item rows `among` are ranked when given (the
        cold-item protocol). Short lists and users the model cannot score are padded with
        -1 / -inf. A vector model's search is sharded over `engine`'s workers when given."""
        self._check_fitted()
        users = np.atleast_1d(np.asarray(user_ids, dtype=np.int64))
        self._check_rows(users, self.n_users, "user")
        exclude = self.seen if exclude_seen else None
        if self.has_vectors():
            retriever = self._retriever("items") if among is None else \
                FaissRetriever("flat").fit(self.item_vectors, self._usable(among))
            items, scores = search(engine, retriever, self.user_vectors, k, exclude, users)
        else:
            items, scores = self._top_by_score(users, k, exclude, among=among)
        if self.user_mask is not None:
            unknown = ~self.user_mask[users]
            items[unknown], scores[unknown] = -1, -np.inf
        return items, scores

    def _usable(self, among: np.ndarray | None = None) -> np.ndarray | None:
        """The item rows this model may recommend (its mask, cut to `among`), None for all."""
        usable = np.ones(self.n_items, dtype=bool) if self.item_mask is None \
            else self.item_mask.copy()
        if among is not None:
            wanted = np.zeros(self.n_items, dtype=bool)
            wanted[among] = True
            usable &= wanted
        return None if usable.all() else np.flatnonzero(usable)

    def _top_by_score(self, users: np.ndarray, k: int, exclude: sp.csr_matrix | None,
                      chunk: int = 1024, among: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        items = np.full((len(users), k), -1, dtype=np.int64)
        scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        width = min(k, self.n_items)
        allowed = np.zeros(self.n_items, dtype=bool)
        usable = self._usable(among)
        allowed[usable if usable is not None else slice(None)] = True
        for start in range(0, len(users), chunk):
            rows = users[start:start + chunk]
            block = np.asarray(self.score(rows), dtype=np.float32)
            if exclude is not None:
                seen = exclude[rows].tocoo()
                block[seen.row, seen.col] = -np.inf
            if self.item_mask is not None or among is not None:
                block[:, ~allowed] = -np.inf
            top, top_scores = top_k_rows(block, width)  # ties: the lower item id first
            items[start:start + len(rows), :width] = top
            scores[start:start + len(rows), :width] = top_scores
        return items, scores

    def similar_items(self, item_ids, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Most similar items by cosine of the item vectors (the item itself left out)."""
        self._check_fitted()
        items = np.atleast_1d(np.asarray(item_ids, dtype=np.int64))
        self._check_rows(items, self.n_items, "item")
        _, item_vectors = self.embeddings()
        return self._neighbours("similar-items", item_vectors, items, k, self.item_mask)

    def similar_users(self, user_ids, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Look-alike users by cosine of the user vectors (the user itself left out)."""
        self._check_fitted()
        users = np.atleast_1d(np.asarray(user_ids, dtype=np.int64))
        self._check_rows(users, self.n_users, "user")
        user_vectors, _ = self.embeddings()
        return self._neighbours("similar-users", user_vectors, users, k, self.user_mask)

    def _neighbours(self, key: str, vectors: np.ndarray, rows: np.ndarray, k: int,
                    mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._retrievers:
            usable = np.flatnonzero(mask) if mask is not None else None
            self._unit_vectors[key] = unit_rows(vectors)
            self._retrievers[key] = FaissRetriever("flat").fit(self._unit_vectors[key], usable)
        unit = self._unit_vectors[key]
        itself = sp.csr_matrix((np.ones(len(rows)), (np.arange(len(rows)), rows)),
                               shape=(len(rows), len(vectors)))
        return self._retrievers[key].search(unit[rows], k, itself, np.arange(len(rows)))

    def _retriever(self, key: str) -> FaissRetriever:
        if key not in self._retrievers:
            self._retrievers[key] = FaissRetriever(self.index_kind, nprobe=self.nprobe).fit(
                self.item_vectors, self._usable())
        return self._retrievers[key]

    @staticmethod
    def _check_rows(rows: np.ndarray, size: int, kind: str) -> None:
        bad = rows[(rows < 0) | (rows >= size)]
        if len(bad):
            raise ModelError(f"unknown {kind} row {int(bad[0])} (the model has {size:,} "
                             f"{kind}s, rows 0..{size - 1})")

    # ------------------------------------------------------------ persistence
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the fitted model to `folder` (atomically); `Recommender.load` reads it."""
        self._check_fitted()
        folder = Path(folder)
        with atomic_path(folder, MODEL_FILE, overwrite) as tmp:
            tmp.mkdir(parents=True)
            arrays = dict(self._arrays())
            for name in ("user_vectors", "item_vectors", "user_mask", "item_mask"):
                if getattr(self, name) is not None:
                    arrays[name] = getattr(self, name)
            np.savez(tmp / ARRAYS_FILE, **arrays)
            sp.save_npz(tmp / SEEN_FILE, self.seen)
            self._save_extra(tmp)
            write_json_atomic(tmp / MODEL_FILE, {
                "format_version": FORMAT_VERSION, "class": type(self).__name__,
                "module": type(self).__module__,
                "name": self.name, "params": self.params(), "state": self._state(),
                "training_log": self.training_log})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Recommender":
        """A fitted model from a folder written by `save`; `Recommender.load` picks the
        class recorded in the folder, `LightGCN.load` insists on that class."""
        folder = Path(folder)
        description = read_model_file(folder)
        module = description.get("module", "")
        if description["class"] not in _REGISTRY and module.startswith("model."):
            importlib.import_module(module)  # registers the class (modules load lazily)
        saved_class = _REGISTRY.get(description["class"])
        if saved_class is None:
            raise ModelError(f"{folder / MODEL_FILE}: unknown model class "
                             f"{description['class']!r} (known: {', '.join(sorted(_REGISTRY))})")
        if cls is not Recommender and not issubclass(saved_class, cls):
            raise ModelError(f"{folder}: holds a {description['class']}, not a {cls.__name__}")
        try:
            return saved_class._from_folder(folder, description)
        except (TypeError, KeyError, OSError, ValueError, zipfile.BadZipFile) as error:
            raise ModelError(f"{folder}: cannot load the saved {description['class']} "
                             f"({type(error).__name__}: {error})") from error

    @classmethod
    def _from_folder(cls, folder: Path, description: dict) -> "Recommender":
        model = cls(**description["params"])
        model._name = description.get("name", model.name)
        with np.load(folder / ARRAYS_FILE, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
        for name in ("user_vectors", "item_vectors", "user_mask", "item_mask"):
            setattr(model, name, arrays.pop(name, None))
        model.seen = sp.load_npz(folder / SEEN_FILE).tocsr()
        model.training_log = description.get("training_log", {})
        model._restore(description.get("state", {}), arrays, folder)
        return model


def require_validation(evaluator) -> None:
    """Early stopping and tuning read the validation split; without one they cannot run."""
    if len(evaluator.users) == 0:
        raise Unavailable("the validation split has no interactions (early stopping and "
                          "tuning need one)")


def read_model_file(folder: Path) -> dict:
    path = folder / MODEL_FILE
    if not path.exists():
        raise ModelError(f"{folder}: not a saved model (no {MODEL_FILE})")
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from error
    missing = {"format_version", "class", "params"} - set(description)
    if missing:
        raise ModelError(f"{path}: missing fields {sorted(missing)}")
    if description["format_version"] != FORMAT_VERSION:
        raise ModelError(f"{path}: unsupported format version {description['format_version']}")
    return description
