"""Daily incremental update of a bundle, without retraining: the day's interactions, new
users and new items are folded into the current version's vectors and written as a new
version of the store (made current unless its validation figures fall too far).

- Users: a new user's vector is a fold-in of their items' vectors; a changed user keeps what
  training gave them and moves by the fold-in's change, u + f(all items) - f(old items).
  The fold-in is the implicit-ALS closed form (as `implicit`'s `recalculate_user`:
  (YᵀY + Yᵀ(C - I)Y + λI)⁻¹ YᵀCp) or the mean of the item vectors, with the form, α and λ
  chosen automatically: whichever best reproduces the top-20 lists of existing users from
  their training items alone.
- Items: a new item is folded in from its users' vectors, and one with a profile gets its
  text vector from the bundle's encoder in the text block (only new profiles are encoded);
  an existing item with new interactions moves by the fold-in's change over its users, as
  a changed user does. New items are added to the FAISS index; `remove_items` are taken out of it.
- The Wide&Deep ranker is kept as trained: users who joined after it are answered by recall.
"""
from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dataHandler import DataError, iter_json_lines
from model.bundle import Bundle, BundleError, seal_manifest
from model.retrieval import FaissRetriever
from utils import sha256_file

SAMPLE_USERS = 300
CG_STEPS = 30  # conjugate-gradient iterations at most (stops early when converged)
CG_CELLS = 1 << 16  # rows x padded width per batch (bounds the (rows, width, dim) array)
ALPHAS = (1.0, 10.0, 40.0)
RIDGES = (0.01, 0.1, 1.0)  # times the mean squared norm of an item vector's coordinates


@dataclass
class FoldIn:
    """Vectors for rows of an interaction matrix from the other side's vectors: the mean of
    those vectors, or implicit ALS's closed form with confidence `alpha` on observed pairs
    and 1 elsewhere, and L2 weight `regularization`."""
    method: str = "mean"  # 'mean' or 'als'
    alpha: float = 1.0
    regularization: float = 0.1
    reproduction_overlap: float = 0.0

    def vectors(self, interactions: sp.csr_matrix, other: np.ndarray,
                start: np.ndarray | None = None) -> np.ndarray:
        """One vector per row of `interactions` (rows without interactions: zero, or their
        `start`). ALS rows are solved by conjugate gradient, warm-started from `start`."""
        observed = (interactions > 0).astype(np.float32).tocsr()
        counts = np.diff(observed.indptr)
        out = np.zeros((observed.shape[0], other.shape[1]), dtype=np.float32) if start is None \
            else start.astype(np.float32).copy()
        rows = np.flatnonzero(counts > 0)
        if self.method == "mean":
            out[rows] = (observed[rows] @ other) / counts[rows, None]
            return out
        gram = other.T @ other + self.regularization * np.eye(other.shape[1], dtype=np.float32)
        order = rows[np.argsort(counts[rows], kind="stable")]  # similar lengths pad little
        position = 0
        while position < len(order):
            widths = counts[order[position:]]  # ascending: a chunk is as wide as its last row
            cells = np.arange(1, len(widths) + 1) * widths
            size = max(1, int(np.searchsorted(cells, CG_CELLS, side="right")))
            chunk = order[position:position + size]
            out[chunk] = self._solve(observed[chunk], other, gram, out[chunk])
            position += size
        return out

    def _solve(self, rows: sp.csr_matrix, other: np.ndarray, gram: np.ndarray,
               start: np.ndarray) -> np.ndarray:
        """Batched conjugate gradient on (G + (α-1)Y_uᵀY_u) x = αY_uᵀ1 for each row u."""
        counts = np.diff(rows.indptr)
        width = int(counts.max())
        slots = np.arange(width)[None, :] < counts[:, None]
        padded = np.zeros((len(counts), width), dtype=np.int64)
        padded[slots] = rows.indices
        vectors = other[padded] * slots[..., None]  # (rows, width, dim), padding zero

        def apply(x: np.ndarray) -> np.ndarray:
            inner = np.einsum("nld,nd->nl", vectors, x)
            return x @ gram + (self.alpha - 1.0) * np.einsum("nld,nl->nd", vectors, inner)

        x = start.astype(np.float32)
        residual = self.alpha * vectors.sum(axis=1) - apply(x)
        direction, norm = residual.copy(), np.einsum("nd,nd->n", residual, residual)
        for _ in range(CG_STEPS):
            if norm.max() < 1e-10:
                break
            product = apply(direction)
            step = norm / np.maximum(np.einsum("nd,nd->n", direction, product), 1e-30)
            x += step[:, None] * direction
            residual -= step[:, None] * product
            new_norm = np.einsum("nd,nd->n", residual, residual)
            direction = residual + (new_norm / np.maximum(norm, 1e-30))[:, None] * direction
            norm = new_norm
        return x

    def describe(self) -> dict:
        return {"method": self.method, "alpha": self.alpha,
                "regularization": round(self.regularization, 6),
                "reproduction_overlap_at_20": round(self.reproduction_overlap, 4)}


def fold_in_options(bundle: Bundle) -> list[FoldIn]:
    """The mean, ALS's closed form at the bundle's own ALS settings when it records them, and
    a small grid of confidences and (relative) regularisations."""
    scale = float(np.mean(np.einsum("ij,ij->j", bundle.items, bundle.items)))
    options = [FoldIn("mean")] + [FoldIn("als", alpha, ridge * scale)
                                  for alpha in ALPHAS for ridge in RIDGES]
    params = bundle.manifest.get("model_params") or {}
    if "alpha" in params and "regularization" in params:
        options.append(FoldIn("als", float(params["alpha"]), float(params["regularization"])))
    return options


def inherited_fold_in(bundle: Bundle) -> FoldIn | None:
    """The fold-in an update parent already chose (chosen once after each full export)."""
    chosen = bundle.manifest.get("changes", {}).get("fold_in")
    if not chosen:
        return None
    return FoldIn(chosen["method"], chosen["alpha"], chosen["regularization"],
                  chosen["reproduction_overlap_at_20"])


def choose_fold_in(bundle: Bundle, seed: int = 0) -> FoldIn:
    """The fold-in that best reproduces existing users' top-20 lists (their trained vectors
    vs vectors folded in from their training items), on a sample of users."""
    rng = np.random.default_rng(seed)
    active = np.flatnonzero(np.diff(bundle.seen.indptr) >= 2)
    sample = np.sort(rng.choice(active, min(SAMPLE_USERS, len(active)), replace=False))
    if len(sample) == 0:
        return FoldIn()
    truth = bundle.retriever.search(bundle.users, 20, bundle.seen, sample)[0]
    options = fold_in_options(bundle)
    for option in options:
        folded = option.vectors(bundle.seen[sample], bundle.items)
        top = bundle.retriever.search(folded, 20, bundle.seen[sample])[0]
        option.reproduction_overlap = float(np.mean(
            [len(set(a[a >= 0]) & set(b[b >= 0])) / 20 for a, b in zip(truth, top)]))
    return max(options, key=lambda o: o.reproduction_overlap)


@dataclass
class Increment:
    """New interactions (as rows of the updated id space) and the new ids."""
    pairs: pd.DataFrame
    new_users: list[str]
    new_items: list[str]
    latest_timestamp: str | None
    source: str
    log: list[dict] = field(default_factory=list)


def read_interactions(path: Path, bundle: Bundle) -> Increment:
    """`user,item[,timestamp]` rows with the bundle's original ids; unknown ids are new."""
    if not path.is_file():
        raise DataError(f"{path}: interactions file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from None
    if not {"user", "item"} <= set(frame.columns):
        raise DataError(f"{path}:1: header must name 'user' and 'item' columns "
                        f"(found {', '.join(frame.columns)})")
    blank = np.flatnonzero((frame["user"].str.strip() == "") | (frame["item"].str.strip() == ""))
    if len(blank):
        raise DataError(f"{path}:{blank[0] + 2}: empty user or item id")
    if frame.empty:
        raise DataError(f"{path}: no interactions")
    new_users = list(dict.fromkeys(u for u in frame["user"] if u not in bundle._user_row))
    new_items = list(dict.fromkeys(i for i in frame["item"] if i not in bundle._item_row))
    latest = str(frame["timestamp"].max()) if "timestamp" in frame else None
    return Increment(frame[["user", "item"]], new_users, new_items, latest, str(path))


def read_profiles_by_id(path: Path, key: str) -> dict[str, str]:
    """JSON lines {key: id, "profile": text}; ids as in the bundle (strings or integers)."""
    if not path.is_file():
        raise DataError(f"{path}: profile file not found")
    profiles = {}
    for line_number, record in iter_json_lines(path):
        if key not in record or not isinstance(record.get("profile"), str):
            raise DataError(f"{path}:{line_number}: expected {{\"{key}\": id, \"profile\": str}}")
        profiles[str(record[key])] = record["profile"].strip()
    return profiles


@dataclass
class UpdateResult:
    version: str
    made_current: bool
    report: dict


def update_bundle(root: Path, interactions: Path, user_profiles: Path | None = None,
                  item_profiles: Path | None = None, remove_items: Path | None = None,
                  validation: Path | None = None, max_drop: float = 0.02) -> UpdateResult:
    """Write the update of the store `root`'s current version as a new version; make it
    current unless Recall@20 on `validation` falls more than `max_drop` below the parent's."""
    parent = Bundle(root)
    if parent.store is None:
        raise BundleError(f"{root}: a single bundle version, not a store; `export` writes "
                          "stores, and updates go into one")
    started = time.perf_counter()
    increment = read_interactions(Path(interactions), parent)
    users_text = read_profiles_by_id(Path(user_profiles), "user_id") if user_profiles else {}
    items_text = read_profiles_by_id(Path(item_profiles), "item_id") if item_profiles else {}
    removed = _read_ids(Path(remove_items), parent) if remove_items else []
    state = _Update(parent, increment, users_text, items_text, removed)
    state.log("read", started, interactions=len(increment.pairs))
    state.run()
    store = parent.store
    with store.lock(), store.staged_version() as (version, folder):
        manifest = state.write(folder, version)
    made_current, verdict = True, "no validation file given: made current without a check"
    if validation is not None:
        made_current, verdict = _no_regression(parent, Bundle(store.path(version)),
                                               Path(validation), max_drop)
    if made_current:
        with store.lock():
            store.switch(version)
    return UpdateResult(version, made_current, {**manifest["changes"], "validation": verdict,
                                                "seconds": round(time.perf_counter() - started,
                                                                 3)})


def _read_ids(path: Path, bundle: Bundle) -> list[int]:
    if not path.is_file():
        raise DataError(f"{path}: file of item ids not found")
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            if line.strip() not in bundle._item_row:
                raise DataError(f"{path}:{line_number}: unknown item id {line.strip()!r}")
            rows.append(bundle.item_row(line.strip()))
    return rows


class _Update:
    """The parent's arrays grown by the increment (rows appended, never reordered)."""

    def __init__(self, parent: Bundle, increment: Increment, users_text: dict, items_text: dict,
                 removed: list[int]) -> None:
        self.parent, self.increment, self.removed = parent, increment, removed
        self.users_text, self.items_text = users_text, items_text
        self.user_ids = parent.user_ids + increment.new_users + [
            u for u in users_text if u not in parent._user_row and u not in increment.new_users]
        self.item_ids = parent.item_ids + increment.new_items + [
            i for i in items_text if i not in parent._item_row and i not in increment.new_items]
        self.n_old_users, self.n_old_items = len(parent.user_ids), len(parent.item_ids)
        self.dim = parent.manifest["dim"]
        self.steps: list[dict] = []

    def log(self, name: str, started: float, **touched) -> None:
        self.steps.append({"step": name, "seconds": round(time.perf_counter() - started, 3),
                           **touched})

    def run(self) -> None:
        started = time.perf_counter()
        user_row = {u: r for r, u in enumerate(self.user_ids)}
        item_row = {i: r for r, i in enumerate(self.item_ids)}
        pairs = self.increment.pairs
        self.added = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32),
                                    (pairs["user"].map(user_row).to_numpy(),
                                     pairs["item"].map(item_row).to_numpy())),
                                   shape=(len(self.user_ids), len(self.item_ids)))
        old = self.parent.seen.copy().tocsr()
        old.resize(self.added.shape)
        self.seen = (old + self.added).tocsr()
        self.log("interactions", started, new_pairs=int(self.added.nnz))
        started = time.perf_counter()
        self.fold_in = inherited_fold_in(self.parent) or choose_fold_in(self.parent)
        self.log("choose fold-in", started, **self.fold_in.describe())
        self._item_vectors()
        self._user_vectors()
        self._changed_items()
        self._index()

    def _text_vectors(self, texts: list[str]) -> tuple[np.ndarray, tuple[int, int] | None]:
        """Only the new profiles are encoded (the parent's vectors are the cache)."""
        recipe = self.parent.manifest.get("text_encoder")
        if recipe is None or not texts:
            return np.zeros((len(texts), self.dim), np.float32), None
        encoded = self.parent.encoder.encode(texts, show_progress=False) * recipe["scale"]
        return encoded, tuple(recipe["block"])

    def _grown(self, vectors: np.ndarray, rows: int) -> np.ndarray:
        return np.vstack([vectors, np.zeros((rows - len(vectors), self.dim), np.float32)])

    def _item_vectors(self) -> None:
        """New items: folded in from the users who interacted with them, then their text
        (when they have a profile and the bundle an encoder) in the text block."""
        started = time.perf_counter()
        items = self._grown(self.parent.items, len(self.item_ids))
        new_rows = np.arange(self.n_old_items, len(self.item_ids))
        by_users = self.added.T.tocsr()[new_rows]
        items[new_rows] = self.fold_in.vectors(by_users,
                                               self._grown(self.parent.users, by_users.shape[1]))
        with_text = np.array([r for r in new_rows if self.item_ids[r] in self.items_text],
                             dtype=np.int64)
        encoded, block = self._text_vectors([self.items_text[self.item_ids[r]]
                                             for r in with_text])
        self.item_text = dict(zip(with_text.tolist(), encoded)) if block else {}
        self.items = items
        self._text_block(items, with_text)
        self.log("items", started, new_items=len(new_rows), encoded_profiles=len(self.item_text),
                 folded_in=int((np.diff(by_users.indptr) > 0).sum()))

    def _text_block(self, items: np.ndarray, rows: np.ndarray) -> None:
        """Put the encoded profile text of new items back into their text block."""
        block = (self.parent.manifest.get("text_encoder") or {}).get("block")
        for row in rows:
            if int(row) in self.item_text:
                items[row, block[0]:block[1]] = self.item_text[int(row)]

    def _user_vectors(self) -> None:
        """New users: the fold-in of their items (or their profile's text when they have no
        interactions yet); changed users: their vector moved by the fold-in's change."""
        started = time.perf_counter()
        users = self._grown(self.parent.users, len(self.user_ids))
        touched = np.flatnonzero(np.diff(self.added.indptr) > 0)
        old, new = touched[touched < self.n_old_users], touched[touched >= self.n_old_users]
        if len(old):
            users[old] = self._refreshed(self.seen[old], self.parent.seen[old], self.items,
                                         users[old])
        users[new] = self.fold_in.vectors(self.seen[new], self.items)
        quiet = np.array([r for r in range(self.n_old_users, len(self.user_ids))
                          if self.added.indptr[r + 1] == self.added.indptr[r]
                          and self.user_ids[r] in self.users_text], dtype=np.int64)
        encoded, block = self._text_vectors([self.users_text[self.user_ids[r]] for r in quiet])
        if block is not None:
            users[quiet, block[0]:block[1]] = encoded
        self.users = users
        self.log("users", started, changed_users=len(old), new_users=len(new),
                 new_users_from_profile=len(quiet) if block else 0)

    def _changed_items(self) -> None:
        """Existing items with new interactions move by the fold-in's change over their users
        (with the updated user vectors): the item half of an ALS sweep over touched rows."""
        started = time.perf_counter()
        by_users, seen_by_item = self.added.T.tocsr(), self.seen.T.tocsr()
        touched = np.flatnonzero(np.diff(by_users.indptr[:self.n_old_items + 1]) > 0)
        if len(touched):
            self.items[touched] = self._refreshed(seen_by_item[touched],
                                                  self.parent.seen.T.tocsr()[touched],
                                                  self.users, self.items[touched])
        new_rows = np.arange(self.n_old_items, len(self.item_ids))
        refold = new_rows[np.diff(by_users.indptr)[new_rows] > 0]  # now with the new users too
        self.items[refold] = self.fold_in.vectors(seen_by_item[refold], self.users,
                                                  self.items[refold])
        self._text_block(self.items, refold)
        self.log("changed items", started, changed_items=len(touched),
                 new_items_refolded=len(refold))

    def _refreshed(self, after: sp.csr_matrix, before: sp.csr_matrix, other: np.ndarray,
                   current: np.ndarray) -> np.ndarray:
        """Touched rows' vectors: ALS's closed form over all their interactions (what
        training computes, warm-started from the current vector), or for the mean rule the
        current vector moved by the change of the mean."""
        if self.fold_in.method == "als":
            return self.fold_in.vectors(after, other, current)
        before = before.tocsr()
        before.resize(after.shape)
        return current + self.fold_in.vectors(after, other) \
            - self.fold_in.vectors(before.tocsr(), other)

    def _index(self) -> None:
        started = time.perf_counter()
        kept = np.setdiff1d(self.parent.retriever.row_to_item, self.removed)
        new_rows = [r for r in range(self.n_old_items, len(self.item_ids)) if self.items[r].any()]
        self.index_items = np.concatenate([kept, np.array(new_rows, dtype=np.int64)])
        self.log("index", started, added_items=len(new_rows), removed_items=len(self.removed),
                 new_items_not_retrievable=len(self.item_ids) - self.n_old_items - len(new_rows))

    def write(self, folder: Path, version: str) -> dict:
        """Write the new version's files and its sealed manifest; return the manifest."""
        started = time.perf_counter()
        parent = self.parent
        folder.mkdir(parents=True)
        for name in ("encoder", "ranker"):  # unchanged: hard links, no extra space
            if (parent.folder / name).is_dir():
                shutil.copytree(parent.folder / name, folder / name, copy_function=_link)
        np.save(folder / "user_embeddings.npy", self.users.astype(np.float32))
        np.save(folder / "item_embeddings.npy", self.items.astype(np.float32))
        pd.DataFrame({"row": np.arange(len(self.user_ids)), "id": self.user_ids}
                     ).to_parquet(folder / "users.parquet", index=False)
        table = {"row": np.arange(len(self.item_ids)), "id": self.item_ids}
        if parent.item_profiles is not None or self.items_text:
            table["profile"] = list(parent.item_profiles or [""] * self.n_old_items) + \
                [self.items_text.get(i, "") for i in self.item_ids[self.n_old_items:]]
        pd.DataFrame(table).to_parquet(folder / "items.parquet", index=False)
        FaissRetriever("flat", use_gpu=False).fit(self.items, self.index_items).save(
            folder / "items.faiss")
        np.save(folder / "index_items.npy", self.index_items)
        sp.save_npz(folder / "seen.npz", self.seen)
        self.log("write version", started)
        manifest = {key: value for key, value in parent.manifest.items() if key != "files"}
        manifest.update({
            "version": version, "parent": parent.version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "users": len(self.user_ids), "items": len(self.item_ids), "storage": "float32",
            "scales": {"users": 1.0, "items": 1.0},
            "ranker_rows": parent.manifest.get("ranker_rows") or
            {"users": parent.manifest["users"], "items": parent.manifest["items"]},
            "data_cutoff": {"training_interactions": int(self.seen.nnz),
                            "interactions_file": self.increment.source,
                            "interactions_sha256": sha256_file(self.increment.source),
                            "latest_timestamp": self.increment.latest_timestamp},
            "changes": {"kind": "update", "new_interactions": int(self.added.nnz),
                        "new_users": len(self.user_ids) - self.n_old_users,
                        "new_items": len(self.item_ids) - self.n_old_items,
                        "removed_items": len(self.removed),
                        "fold_in": self.fold_in.describe(), "steps": self.steps,
                        "ranker": "kept as trained: users and items that joined after it are "
                                  "answered by recall" if parent.manifest.get("ranker") else None}})
        seal_manifest(folder, manifest)
        return manifest


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system: copy
        shutil.copy2(source, target)


def _no_regression(parent: Bundle, candidate: Bundle, validation: Path,
                   max_drop: float) -> tuple[bool, str]:
    """Recall@20 of both versions on held-out `user,item` pairs of users the parent knows."""
    frame = read_interactions(validation, parent).pairs
    known = frame[frame["user"].isin(parent._user_row) & frame["item"].isin(parent._item_row)]
    if known.empty:
        return True, f"{validation}: no pairs of known users and items: made current unchecked"
    figures = []
    for bundle in (parent, candidate):
        held = known.groupby("user")["item"].agg(set)
        rows = np.array([bundle.user_row(u) for u in held.index])
        top = bundle.retriever.search(bundle.users, 20, bundle.seen, rows)[0]
        hits = [len({bundle.item_ids[i] for i in found if i >= 0} & items) / min(len(items), 20)
                for found, items in zip(top, held)]
        figures.append(float(np.mean(hits)))
    before, after = figures
    if after < before * (1 - max_drop):
        return False, (f"not made current: validation Recall@20 {after:.4f} is more than "
                       f"{max_drop:.0%} below the parent's {before:.4f}")
    return True, f"validation Recall@20 {after:.4f} vs parent {before:.4f}: made current"
