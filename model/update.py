"""Daily incremental update of a bundle, without retraining: the day's interactions, new
users and new items are folded into the current version's vectors (`model/foldin.py`: the
rule the bundle recorded at export) and written as a new version of the store, made current
unless its validation figures fall too far below the parent's.

- Users: a new user's vector is the fold-in of their items (or their profile's text vector
  when they have no interactions yet). A changed user is solved again over all their items
  with ALS's closed form, warm-started from the trained vector (what training computes);
  under the mean rule the trained vector moves by the change of the mean instead.
- Items: a new item is folded in from its users' vectors (again after the users are
  updated), and one with a profile gets its text vector from the bundle's encoder in the
  text block (only new profiles are encoded); a changed item is updated like a changed user.
  New items are added to the FAISS index; `remove_items` are taken out of it.
- An ALS bundle (variant 'als' whose fold-in is ALS's closed form) is instead brought up to
  date by ALS_SWEEPS warm-started ALS iterations over every user and item with interactions
  (`implicit` continues from the vectors it is given; new rows start from zero; fewer
  conjugate-gradient steps per row than training takes, `sweep_cg_steps`): solving
  only the touched rows leaves the others fitted to yesterday's vectors, and that drift adds
  up.
- A LightGCN bundle is warm-started from its layer-0 embeddings and a GraphSAGE bundle's
  network runs over the updated graph, new nodes through its inductive path
  (`model/graph_update.py`): every vector is computed again.
- A ranked bundle's Wide&Deep ranker gets its features grown to the new rows and one
  warm-started epoch on the day's new pairs, kept if validation agrees
  (`model/ranker_update.py`): users and items that joined are ranked too.
"""
from __future__ import annotations

import csv
import os
import shutil
import time
import warnings
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from dataHandler import DataError, iter_json_lines
from evaluation import retrieved_recall
from model.bundle import (ATTRIBUTE_PREFIX, FILTER_ATTRIBUTES, RANKER_DIR, Bundle,
                          BundleError, seal_manifest, write_version_files)
from model.foldin import FoldIn, choose_fold_in
from model.graph_update import lightgcn_warm_start, sage_pass, save_graph_files
from model.hygiene import scrub_pii
from model.ranker_update import served_primary, warm_epoch
from model.retrieval import (FaissRetriever, active_users, calibrated_retriever,
                             calibration_users)
from model.versions import BundleStore, is_store
from utils import sha256_file

GATE_USERS = 1000  # validation users the no-regression check looks at (a fixed sample)
ALS_SWEEPS = 2  # warm-started ALS iterations over all rows in an update of an ALS bundle
SWEEP_SHARE = 0.08  # the sweeps' row solves: at most this share of a full refit's (see below)


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
    """`user,item[,timestamp]` rows with the bundle's original ids (surrounding spaces
    ignored, blank lines skipped); unknown ids are new. A row with more fields than the
    header, an empty id or a timestamp that is neither a number nor a date stops with its
    line."""
    if not path.is_file():
        raise DataError(f"{path}: interactions file not found")
    header = _header(path)
    try:
        with warnings.catch_warnings():  # a row with extra fields must not be cut silently
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=object, keep_default_na=False, index_col=False,
                                encoding="utf-8-sig", skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning) as error:
        line = _first_ragged_line(path)
        raise DataError(f"{path}:{line}: more fields than the header names" if line else
                        f"{path}: malformed CSV ({str(error).strip()})") from None
    frame.columns = header
    frame = frame.apply(lambda column: column.str.strip())
    frame = frame[(frame != "").any(axis=1)]  # blank lines; the index still gives line - 2
    if frame.empty:
        raise DataError(f"{path}: no interactions")
    blank = frame.index[((frame["user"] == "") | (frame["item"] == "")).to_numpy()]
    if len(blank):
        raise DataError(f"{path}:{blank[0] + 2}: empty user or item id")
    new_users = frame.loc[~frame["user"].isin(bundle._user_row.keys()), "user"].unique().tolist()
    new_items = frame.loc[~frame["item"].isin(bundle._item_row.keys()), "item"].unique().tolist()
    latest = None
    if "timestamp" in frame:
        times = parse_timestamps(path, frame["timestamp"], frame.index.to_numpy() + 2)
        latest = str(frame["timestamp"].iloc[int(times.argmax())])
    return Increment(frame[["user", "item"]], new_users, new_items, latest, str(path))


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = [name.strip() for name in next(csv.reader(handle), [])]
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({error})") from None
    if not {"user", "item"} <= set(header):
        raise DataError(f"{path}:1: header must name 'user' and 'item' columns "
                        f"(found {', '.join(header) or 'nothing'})")
    if len(set(header)) != len(header):
        raise DataError(f"{path}:1: a column is named twice ({', '.join(header)})")
    return header


def _first_ragged_line(path: Path) -> int | None:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = csv.reader(handle)
        width = len(next(rows, []))
        return next((rows.line_num for row in rows if len(row) > width), None)


def parse_timestamps(path: Path, values: pd.Series, lines: np.ndarray) -> np.ndarray:
    """Timestamps as float numbers for ordering: epoch numbers, or dates (as nanoseconds);
    the first value that is neither, or a file mixing both, stops with its line."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(np.float64)
    dates = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    if dates.notna().all():
        return dates.astype("int64").to_numpy(np.float64)
    neither = (numbers.isna() & dates.isna()).to_numpy()
    row = int(np.flatnonzero(neither if neither.any() else numbers.isna().to_numpy())[0])
    what = "is neither a number nor a date" if neither.any() else "is a date among numbers"
    raise DataError(f"{path}:{lines[row]}: timestamp {values.iloc[row]!r} {what}")


def read_attributes_by_id(path: Path) -> dict[str, dict[str, str]]:
    """item id -> the filterable attributes (city, state, categories) its profile line has."""
    found = {}
    for _, record in iter_json_lines(path):
        values = {name: record[name] for name in FILTER_ATTRIBUTES if record.get(name)}
        if values:
            found[str(record["item_id"])] = {
                name: ", ".join(map(str, v)) if isinstance(v, list) else str(v)
                for name, v in values.items()}
    return found


def read_profiles_by_id(path: Path, key: str) -> dict[str, str]:
    """JSON lines {key: id, "profile": text}; ids as in the bundle (strings or integers).
    Personal data is taken out of the text (model/hygiene.py) before it is encoded or stored."""
    if not path.is_file():
        raise DataError(f"{path}: profile file not found")
    profiles = {}
    for line_number, record in iter_json_lines(path):
        if key not in record or not isinstance(record.get("profile"), str):
            raise DataError(f"{path}:{line_number}: expected {{\"{key}\": id, \"profile\": str}}")
        profiles[str(record[key])] = scrub_pii(record["profile"].strip())[0]
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
    if not is_store(root):
        raise BundleError(f"{root}: not a bundle store; `export` writes stores, and updates "
                          "go into one")
    store = BundleStore(root)
    with store.lock():  # one writer: the parent stays current until this update switches
        return _update_locked(store, interactions, user_profiles, item_profiles,
                              remove_items, validation, max_drop)


def _update_locked(store: BundleStore, interactions: Path, user_profiles: Path | None,
                   item_profiles: Path | None, remove_items: Path | None,
                   validation: Path | None, max_drop: float) -> UpdateResult:
    began = started = time.perf_counter()
    parent = Bundle(store.root)
    increment = read_interactions(Path(interactions), parent)
    users_text = read_profiles_by_id(Path(user_profiles), "user_id") if user_profiles else {}
    items_text = read_profiles_by_id(Path(item_profiles), "item_id") if item_profiles else {}
    removed = _read_ids(Path(remove_items), parent) if remove_items else []
    state = _Update(parent, increment, users_text, items_text, removed)
    if item_profiles:
        state.attributes = read_attributes_by_id(Path(item_profiles))
    state.log("load parent and read", started, interactions=len(increment.pairs))
    started = time.perf_counter()
    check = _validation_pairs(parent, state, Path(validation)) if validation else None
    if check is not None:
        state.log("validation pairs", started, users=0 if isinstance(check, str)
                  else len(check[0]))
    state.run(check if isinstance(check, tuple) else None)
    made_current, verdict = True, "no validation file given: made current without a check"
    state.ranker_epoch(check if isinstance(check, tuple) else None)
    if check is not None:
        started = time.perf_counter()
        made_current, verdict = _no_regression(parent, state, check, max_drop)
        state.log("validation check", started, made_current=made_current)
    with store.staged_version() as (version, folder):
        manifest = state.write(folder, version, verdict)
    if made_current:
        store.switch(version)
    return UpdateResult(version, made_current, {**manifest["changes"],
                                                "seconds": round(time.perf_counter() - began, 3)})


def _read_ids(path: Path, bundle: Bundle) -> list[int]:
    if not path.is_file():
        raise DataError(f"{path}: file of item ids not found")
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(),
                                       start=1):
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
        self.attributes: dict[str, dict[str, str]] = {}  # new items' filter attributes
        self.ranker, self.ranker_report = None, None  # a ranked bundle's (`ranker_epoch`)
        self.steps: list[dict] = []

    def log(self, name: str, started: float, **touched) -> None:
        self.steps.append({"step": name, "seconds": round(time.perf_counter() - started, 3),
                           **touched})

    def run(self, check: tuple[np.ndarray, sp.csr_matrix] | None = None) -> None:
        started = time.perf_counter()  # `check`: validation (users, their held-out items)
        self.check = check
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
        self.fold_in = FoldIn.recorded(self.parent.manifest) or choose_fold_in(
            self.parent.users, self.parent.items, self.parent.seen, self.parent.retriever,
            self.parent.manifest.get("model_params"))
        self.log("choose fold-in", started, **self.fold_in.describe())
        self.als = self._als_settings()  # an ALS bundle: sweeps re-solve every row
        self.graph = self.parent.manifest.get("graph")  # LightGCN's or GraphSAGE's state
        self.whole_pass = self.als is not None or self.graph is not None
        self.graph_files: dict = {}  # a graph bundle's state, as this version has it
        self._item_vectors()
        self._user_vectors()
        self._changed_items()
        self._als_sweep()
        self._graph_pass()
        self._index()

    def _encoded(self, texts: list[str]) -> np.ndarray | None:
        """Only the new profiles are encoded (the parent's vectors are the cache); None when
        the bundle has no encoder."""
        if self.parent.manifest.get("text_encoder") is None or not texts:
            return None
        return self.parent.encoder.encode(texts, show_progress=False)

    def _grown(self, vectors: np.ndarray, rows: int) -> np.ndarray:
        return np.vstack([vectors, np.zeros((rows - len(vectors), self.dim), np.float32)])

    def _item_vectors(self) -> None:
        """New items: folded in from the users who interacted with them, then their text
        (when they have a profile and the bundle an encoder) in the text block."""
        started = time.perf_counter()
        items = self._grown(self.parent.items, len(self.item_ids))
        new_rows = np.arange(self.n_old_items, len(self.item_ids))
        by_users = self.added.T.tocsr()[new_rows]
        if not self.whole_pass:  # (else the pass over every row places them)
            items[new_rows] = self.fold_in.vectors(
                by_users, self._grown(self.parent.users, by_users.shape[1]))
        with_text = np.array([r for r in new_rows if self.item_ids[r] in self.items_text],
                             dtype=np.int64)
        encoded = self._encoded([self.items_text[self.item_ids[r]] for r in with_text])
        self.item_text = dict(zip(with_text.tolist(), encoded)) if encoded is not None else {}
        self.items = items
        self._text_block(items, with_text, np.diff(self.added.T.tocsr().indptr))
        self.log("items", started, new_items=len(new_rows), encoded_profiles=len(self.item_text),
                 folded_in=int((np.diff(by_users.indptr) > 0).sum()))

    def _text_block(self, items: np.ndarray, rows: np.ndarray, degree: np.ndarray) -> None:
        """New items with a profile: one without interactions is placed by its text alone
        (the fused model's cold-start path, `Bundle.place_text`); one with interactions
        keeps its fold-in and gets its text in the text block."""
        recipe = self.parent.manifest.get("text_encoder") or {}
        for row in (int(r) for r in rows if int(r) in self.item_text):
            if degree[row] == 0:
                items[row] = self.parent.place_text(self.item_text[row][None, :], "items")[0]
            elif recipe.get("block"):
                start, end = recipe["block"]
                items[row, start:end] = self.item_text[row] * recipe["scale"]

    def _user_vectors(self) -> None:
        """New users: the fold-in of their items (or their profile's text when they have no
        interactions yet); changed users: their vector moved by the fold-in's change."""
        started = time.perf_counter()
        users = self._grown(self.parent.users, len(self.user_ids))
        touched = np.flatnonzero(np.diff(self.added.indptr) > 0)
        old, new = touched[touched < self.n_old_users], touched[touched >= self.n_old_users]
        if len(old) and not self.whole_pass:
            users[old] = self._refreshed(self.seen[old], lambda: self.parent.seen[old],
                                         self.items, users[old])
        if not self.whole_pass:
            users[new] = self.fold_in.vectors(self.seen[new], self.items)
        inductive = (self.graph or {}).get("model") == "graphsage"  # features: every profile
        profiled = np.array([r for r in range(self.n_old_users, len(self.user_ids))
                             if self.user_ids[r] in self.users_text and (inductive or self.added
                             .indptr[r + 1] == self.added.indptr[r])], dtype=np.int64)
        encoded = self._encoded([self.users_text[self.user_ids[r]] for r in profiled])
        self.user_text = dict(zip(profiled.tolist(), encoded)) if encoded is not None else {}
        quiet = profiled[np.diff(self.added.indptr)[profiled] == 0]  # no interactions yet
        if encoded is not None and len(quiet):
            users[quiet] = self.parent.place_text(encoded[np.isin(profiled, quiet)], "users")
        self.users = users
        self.log("users", started, changed_users=len(old), new_users=len(new),
                 new_users_from_profile=len(quiet) if encoded is not None else 0)

    def _changed_items(self) -> None:
        """Existing items with new interactions move by the fold-in's change over their users
        (with the updated user vectors): the item half of an ALS sweep over touched rows."""
        started = time.perf_counter()
        by_users, seen_by_item = self.added.T.tocsr(), self.seen.T.tocsr()
        touched = np.flatnonzero(np.diff(by_users.indptr[:self.n_old_items + 1]) > 0)
        if len(touched) and not self.whole_pass:
            self.items[touched] = self._refreshed(
                seen_by_item[touched], lambda: self.parent.seen.T.tocsr()[touched], self.users,
                self.items[touched])
        new_rows = np.arange(self.n_old_items, len(self.item_ids))
        refold = new_rows[np.diff(by_users.indptr)[new_rows] > 0] if not self.whole_pass \
            else new_rows[:0]  # now with the new users too
        self.items[refold] = self.fold_in.vectors(seen_by_item[refold], self.users,
                                                  self.items[refold])
        self._text_block(self.items, refold, np.diff(seen_by_item.indptr))
        self.log("changed items", started, changed_items=len(touched),
                 new_items_refolded=len(refold))

    def _refreshed(self, after: sp.csr_matrix, before, other: np.ndarray,
                   current: np.ndarray) -> np.ndarray:
        """Touched rows' vectors: ALS's closed form over all their interactions (what
        training computes, warm-started from the current vector), or for the mean rule the
        current vector moved by the change of the mean."""
        if self.fold_in.method == "als":
            return self.fold_in.vectors(after, other, current)
        before = before().tocsr()  # (a callable: only this rule needs the old interactions)
        before.resize(after.shape)
        return current + self.fold_in.vectors(after, other) \
            - self.fold_in.vectors(before.tocsr(), other)

    def _als_settings(self) -> dict | None:
        """An ALS bundle's settings (variant 'als', ALS fold-in), else None."""
        params = self.parent.manifest.get("model_params") or {}
        if self.parent.manifest["variant"] != "als" or self.fold_in.method != "als" or \
                params.get("factors") != self.dim or ALS_SWEEPS == 0:
            return None
        return params

    def _als_sweep(self) -> None:
        """An ALS bundle: every user and item is solved again, as ALS_SWEEPS training
        iterations do, warm-started from the vectors (implicit continues from factors it is
        given; new rows start from zero). Re-solving only the touched rows leaves the others
        fitted to yesterday's vectors, and that drift adds up over daily updates."""
        params = self.als
        if params is None:
            return
        started = time.perf_counter()
        observed = ((self.seen > 0) if params.get("binary", True) else self.seen
                    ).astype(np.float32).tocsr()
        als = AlternatingLeastSquares(factors=self.dim, regularization=params["regularization"],
                                      alpha=params["alpha"], iterations=ALS_SWEEPS,
                                      random_state=0, use_gpu=False)
        als.cg_steps = sweep_cg_steps(params.get("iterations", 15), als.cg_steps)
        als.user_factors, als.item_factors = self.users.copy(), self.items.copy()
        with threadpool_limits(1, "blas"):  # implicit runs its own threads
            als.fit(observed, show_progress=False)
        solved_users = np.diff(observed.indptr) > 0  # the others keep their (text) vectors
        solved_items = np.diff(observed.T.tocsr().indptr) > 0
        self.users[solved_users] = np.asarray(als.user_factors)[solved_users]
        self.items[solved_items] = np.asarray(als.item_factors)[solved_items]
        self.log("ALS sweep", started, iterations=ALS_SWEEPS, cg_steps=als.cg_steps,
                 users=int(solved_users.sum()), items=int(solved_items.sum()))

    def _graph_pass(self) -> None:
        """A graph bundle: LightGCN's warm start or GraphSAGE's inductive pass over the
        updated graph (`model/graph_update.py`); every vector is computed again."""
        if self.graph is None:
            return
        started = time.perf_counter()
        if self.graph["model"] == "graphsage":
            self.users, self.items, self.graph_files, touched = sage_pass(
                self.parent.folder, self.graph, self.seen, self.n_old_users, self.n_old_items,
                {"users": self.user_text, "items": self.item_text},
                self._validation_recall if self.check is not None else None)
            self.log("GraphSAGE inductive pass", started, **touched)
            return
        self.users, self.items, self.graph_files, touched = lightgcn_warm_start(
            self.parent.folder, self.graph, self.seen, self.added, self.parent.seen,
            self.n_old_users)
        self.log("LightGCN warm start", started, **touched)

    def _validation_recall(self, users: np.ndarray, items: np.ndarray) -> float:
        """Recall@20 on the validation pairs of `self.check` with these vectors (exact)."""
        rows, truth = self.check
        kept = np.setdiff1d(np.arange(len(items)), self.parent.manifest.get("removed_rows", [])
                            + list(self.removed))
        return retrieved_recall(FaissRetriever("flat", use_gpu=False).fit(items, kept), users,
                                self.seen, rows, truth)

    def ranker_epoch(self, check: tuple[np.ndarray, sp.csr_matrix] | None) -> None:
        """A ranked bundle: the ranker's features grown to this version's rows and one
        warm-started epoch on the day's new pairs (`model/ranker_update.py`). A ranker this
        code cannot read is carried over as it is (its rows stay the parent's)."""
        if self.parent.manifest.get("ranker") is None:
            return
        started = time.perf_counter()
        try:
            ranker = self.parent.ranker
        except BundleError as error:
            self.ranker_report = {"epoch": f"none: kept as it was ({error})"}
            return
        before = self.parent.seen.copy().tocsr()
        before.resize(self.seen.shape)
        removed = np.array([*self.parent.manifest.get("removed_rows", []), *self.removed],
                           dtype=np.int64)
        primary = served_primary(ranker, (self.parent.users, self.parent.items),
                                 (self.users, self.items))
        self.ranker, self.ranker_report = warm_epoch(ranker, before, self.added, primary,
                                                     check, removed)
        self.log("ranker epoch", started, **self.ranker_report)

    def _index(self) -> None:
        started = time.perf_counter()
        kept = np.setdiff1d(self.parent.retriever.row_to_item, self.removed)
        new_rows = [r for r in range(self.n_old_items, len(self.item_ids)) if self.items[r].any()]
        self.index_items = np.concatenate([kept, np.array(new_rows, dtype=np.int64)])
        exported, self.index_report = self.parent.retriever, {"type": "IndexFlatIP"}
        if exported.kind == "flat":
            self.retriever = FaissRetriever("flat", use_gpu=False).fit(self.items,
                                                                       self.index_items)
        else:  # the same kind, checked again against exact search on the new vectors
            self.retriever, self.index_report = calibrated_retriever(
                self.items, self.index_items, self.users, self.seen,
                calibration_users(active_users(self.seen)), exported.kind, exported.search_width())
        self.log("index", started, added_items=len(new_rows), removed_items=len(self.removed),
                 new_items_not_retrievable=len(self.item_ids) - self.n_old_items - len(new_rows))

    def write(self, folder: Path, version: str, verdict: str) -> dict:
        """Write the new version's files and its sealed manifest; return the manifest."""
        started = time.perf_counter()
        parent = self.parent
        folder.mkdir(parents=True)
        for name in ("encoder", RANKER_DIR):  # unchanged: hard links, no extra space
            if (parent.folder / name).is_dir() and (name != RANKER_DIR or self.ranker is None):
                shutil.copytree(parent.folder / name, folder / name, copy_function=_link)
        if self.ranker is not None:
            self.ranker.save(folder / RANKER_DIR)
        recipe = parent.manifest.get("text_encoder") or {}
        for name in (recipe.get("projection") or {}).values():  # the cold-start path
            _link(parent.folder / name, folder / name)
        table = {"row": np.arange(len(self.item_ids)), "id": self.item_ids}
        if parent.item_profiles is not None or self.items_text:
            table["profile"] = list(parent.item_profiles or [""] * self.n_old_items) + \
                [self.items_text.get(i, "") for i in self.item_ids[self.n_old_items:]]
        parent_table = pd.read_parquet(parent.folder / "items.parquet")
        names = {c[len(ATTRIBUTE_PREFIX):] for c in parent_table.columns
                 if c.startswith(ATTRIBUTE_PREFIX)} | {n for v in self.attributes.values()
                                                       for n in v}
        for name in sorted(names):  # the parent's values, then the new items' own
            column = ATTRIBUTE_PREFIX + name
            old = list(parent_table[column]) if column in parent_table else [""] * \
                self.n_old_items
            table[column] = old + [self.attributes.get(i, {}).get(name, "")
                                   for i in self.item_ids[self.n_old_items:]]
        save_graph_files(folder, self.graph_files)
        write_version_files(folder, self.users.astype(np.float32), self.items.astype(np.float32),
                            {"row": np.arange(len(self.user_ids)), "id": self.user_ids}, table,
                            self.retriever, self.seen, compressed=False)  # daily: speed
        self.log("write version", started)
        manifest = {key: value for key, value in parent.manifest.items() if key != "files"}
        manifest.update({
            "version": version, "parent": parent.version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "users": len(self.user_ids), "items": len(self.item_ids), "storage": "float32",
            "scales": {"users": 1.0, "items": 1.0},
            "removed_rows": sorted(set(parent.manifest.get("removed_rows", []))
                                   | {int(r) for r in self.removed}),
            "ranker_rows": {"users": len(self.user_ids), "items": len(self.item_ids)}
            if self.ranker is not None or parent.manifest.get("ranker") is None else
            parent.manifest.get("ranker_rows") or {"users": parent.manifest["users"],
                                                   "items": parent.manifest["items"]},
            "data_cutoff": {"training_interactions": int(self.seen.nnz),
                            "interactions_file": self.increment.source,
                            "interactions_sha256": sha256_file(self.increment.source),
                            "latest_timestamp": self.increment.latest_timestamp},
            "fold_in": self.fold_in.describe(),
            "index": {"file": "items.faiss", **self.index_report, "calibrated_in": version},
            "changes": {"kind": "update", "new_interactions": int(self.added.nnz),
                        "new_users": len(self.user_ids) - self.n_old_users,
                        "new_items": len(self.item_ids) - self.n_old_items,
                        "removed_items": len(self.removed),
                        "fold_in": self.fold_in.describe(), "steps": self.steps,
                        "validation": verdict,
                        "ranker": self.ranker_report}})
        seal_manifest(folder, manifest)
        return manifest


def sweep_cg_steps(refit_iterations: int, refit_cg_steps: int) -> int:
    """Conjugate-gradient steps per row solve in an update's ALS sweeps. A row solve with c
    steps costs about c + 1 products with the row's Gram matrix, so the sweeps cost
    ALS_SWEEPS * (c + 1) against a full refit's iterations * (refit_cg_steps + 1); c is the
    largest (at least 1, at most the refit's) that keeps them within SWEEP_SHARE of it,
    leaving the rest of the update's budget (20% of a refit) to reading, the index, the
    validation check and writing. Warm-started rows are near their solution, so few steps
    do: on yelp-text 1 step at 256 factors x 15 iterations kept Recall@20 within 2.3% of the
    refit over 5 daily steps."""
    budget = SWEEP_SHARE * refit_iterations * (refit_cg_steps + 1) / ALS_SWEEPS - 1
    return int(min(max(budget, 1), refit_cg_steps))


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system: copy
        shutil.copy2(source, target)


def _validation_pairs(parent: Bundle, candidate: _Update, validation: Path
                      ) -> tuple[np.ndarray, sp.csr_matrix] | str:
    """(a fixed sample of at most GATE_USERS users, the truth matrix in the candidate's rows)
    of the held-out `user,item` pairs of users and items the parent knows; or why none."""
    frame = read_interactions(validation, parent).pairs
    users, items = frame["user"].map(parent._user_row), frame["item"].map(parent._item_row)
    known = (users.notna() & items.notna()).to_numpy()
    if not known.any():
        return f"{validation}: no pairs of known users and items"
    users = users.to_numpy()[known].astype(np.int64)
    items = items.to_numpy()[known].astype(np.int64)
    gone = np.isin(items, [*parent.manifest.get("removed_rows", []), *candidate.removed])
    users, items = users[~gone], items[~gone]  # a removed item is no miss of the update
    if len(users) == 0:
        return f"{validation}: no pairs of known users and kept items"
    truth = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                          shape=(len(candidate.user_ids), len(candidate.item_ids)))
    rows = np.flatnonzero(np.diff(truth.indptr) > 0)
    if len(rows) > GATE_USERS:
        rows = np.sort(np.random.default_rng(0).choice(rows, GATE_USERS, replace=False))
    return rows, truth


def _no_regression(parent: Bundle, candidate: _Update,
                   check: tuple[np.ndarray, sp.csr_matrix] | str,
                   max_drop: float) -> tuple[bool, str]:
    """Recall@20 of both versions on the validation pairs `check` (`_validation_pairs`)."""
    if isinstance(check, str):
        return True, f"{check}: made current unchecked"
    rows, truth = check
    before, after = (retrieved_recall(bundle.retriever, bundle.users, bundle.seen, rows, truth)
                     for bundle in (parent, candidate))  # the parent's rows come first
    if after < before * (1 - max_drop):
        return False, (f"not made current: validation Recall@20 {after:.4f} is more than "
                       f"{max_drop:.0%} below the parent's {before:.4f}")
    return True, f"validation Recall@20 {after:.4f} vs parent {before:.4f}: made current"
