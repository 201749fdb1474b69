"""Production bundles: one recall model of a run (its user and item vectors, FAISS index,
id maps, seen items), the encoder to embed a new profile where the model has text, and the
Wide&Deep ranker trained on that model's candidates, so a two-stage recommendation can be
made from the bundle alone. Every file's checksum is verified on load."""
from __future__ import annotations

import json
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dataHandler import prepare_dataset, read_id_lines
from evaluation import Evaluator, file_name, same_data
from coreMethod import apply_content_map, unit_rows
from model.base import Recommender
from model.config import ExperimentConfig
from model.foldin import choose_fold_in
from model.graph import GraphSAGE
from model.graph_update import sage_cold_start, sage_cold_start_network
from model.ranking import WideDeepRanker
from model.retrieval import (FaissRetriever, active_users, calibrated_retriever,
                             calibration_users, top_overlap)
from model.text import ENCODER_DIR, TextEncoder, load_encoder
from model.versions import CURRENT, BundleStore, VersionError, is_store
from utils import atomic_path, code_version, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"  # guards against edits and corruption; not a signature
REQUIRED = ("format_version", "variant", "dataset", "data", "users", "items", "dim", "scales",
            "metrics_at_export", "files")
FORMAT_VERSION = 2
RANKER_DIR = "ranker"
ATTRIBUTE_PREFIX = "attr_"  # items.parquet columns that `where` filters can use
FILTER_ATTRIBUTES = ("city", "state", "categories")


class BundleError(ValueError):
    """A bundle that is missing, corrupted or does not fit what is asked of it."""


def _quantise(vectors: np.ndarray, storage: str) -> tuple[np.ndarray, float]:
    if storage == "float32":
        return vectors.astype(np.float32), 1.0
    if storage == "float16":
        return vectors.astype(np.float16), 1.0
    scale = float(np.abs(vectors).max() / 127) or 1.0  # symmetric int8, one scale per matrix
    return np.clip(np.round(vectors / scale), -127, 127).astype(np.int8), scale


def _restore(stored: np.ndarray, scale: float) -> np.ndarray:
    return stored.astype(np.float32) * np.float32(scale)


def original_ids(ids: list[str], count: int) -> list[str]:
    """The data's original ids, or the row numbers as strings when it has none."""
    return list(ids) if len(ids) == count else [str(i) for i in range(count)]


def export_bundle(run_dir: Path, variant: str, dataset, out: Path,
                  storage: str = "float32", overwrite: bool = False, index: str = "flat") -> str:
    """Add the bundle of one recall variant of a run to the store `out` as a new version and
    make it current (a full retrain); a new store is created whole or not at all. Returns
    the version's name. `index`: 'flat' (exact), 'ivf' or 'hnsw' (kept only where it holds
    95% of the exact top 20 of sampled users; `calibrated_retriever`)."""
    if index not in ("flat", "ivf", "hnsw"):
        raise BundleError(f"unknown index '{index}' (flat, ivf or hnsw)")
    run_dir, out = Path(run_dir), Path(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model_dir = run_dir / "models" / file_name(variant)
    if not model_dir.exists():
        saved = sorted(p.name for p in (run_dir / "models").glob("*"))
        raise BundleError(f"{run_dir}: no model saved for variant '{variant}' (saved: {saved})")
    model = Recommender.load(model_dir)
    if not model.has_vectors():
        raise BundleError(f"variant '{variant}' has no vectors to export")
    config = json.loads((run_dir / "config.json").read_text())

    def write(store: BundleStore) -> str:
        with store.lock():
            with store.staged_version() as (version, folder):
                parent = store.current() if (store.root / CURRENT).is_symlink() else None
                lineage = {"version": version, "parent": parent,
                           "data_cutoff": {"training_interactions": int(dataset.train.nnz),
                                           "split_sha256": metrics["dataset"]["split_sha256"]},
                           "changes": {"kind": "full", "source_run": str(run_dir),
                                       "variant": variant}}
                _write_bundle(folder, run_dir, variant, model, dataset, metrics, config,
                              storage, lineage, index)
            store.switch(version)
        return version

    if is_store(out):
        return write(BundleStore(out))
    with atomic_path(out, MANIFEST, overwrite) as tmp:  # a new store, whole or not at all
        return write(BundleStore.initialise(tmp))


def _write_bundle(tmp: Path, run_dir: Path, variant: str, model: Recommender, dataset,
                  metrics: dict, config: dict, storage: str, lineage: dict,
                  index: str = "flat") -> None:
    users, items = model.embeddings()
    tmp.mkdir(parents=True)
    stored_users, user_scale = _quantise(users, storage)
    stored_items, item_scale = _quantise(items, storage)
    indexed = np.flatnonzero(model.item_mask) if model.item_mask is not None \
        else np.arange(len(items))
    served_users, served_items = _restore(stored_users, user_scale), \
        _restore(stored_items, item_scale)
    if index != "flat":
        retriever, index_report = calibrated_retriever(
            served_items, indexed, served_users, model.seen,
            calibration_users(active_users(model.seen), config.get("run", {}).get("seed", 2023)),
            index)
    else:
        retriever = FaissRetriever("flat", use_gpu=False).fit(served_items, indexed)
        index_report = {"type": "IndexFlatIP"}
    exported_metrics = metrics["variants"][variant]["metrics"]
    if retriever.kind != "flat" or storage != "float32":
        # what these stored vectors and this index serve, beside the run's float32 exact search
        index_report["metrics_exact_search"] = exported_metrics
        evaluator = Evaluator.on_test(dataset, tuple(sorted(
            {int(name.split("@")[1]) for name in exported_metrics})))
        exported_metrics = evaluator.metrics(retriever.search(
            served_users, evaluator.k, model.seen, evaluator.users)[0])
    write_version_files(tmp, stored_users, stored_items,
                        *_id_tables(dataset, len(users), len(items),
                                    _item_attributes(config, len(items))),
                        retriever, model.seen)
    text = _copy_encoder(run_dir, variant, model, tmp)
    ranker = _copy_ranker(run_dir, variant, tmp)
    if ranker is not None and retriever.kind == "hnsw":
        ranker["channels"] = _approximate_channels(tmp / RANKER_DIR, retriever, model.seen,
                                                   index_report["target"])
    data = config.get("data", config)
    manifest = {
        "format_version": FORMAT_VERSION, "variant": variant, "model_class": type(model).__name__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(), "source_run": str(run_dir),
        "dataset": metrics["dataset"],
        "data": {**_absolute_data_paths(data),
                 "seed": config.get("run", {}).get("seed", 2023)},  # draws a cold split
        "users": int(users.shape[0]), "items": int(items.shape[0]),
        "dim": int(items.shape[1]), "storage": storage,
        "scales": {"users": user_scale, "items": item_scale},
        "metric": "inner_product", "index": {"file": "items.faiss", **index_report},
        "metrics_at_export": exported_metrics,
        "text_encoder": text, "ranker": ranker, "model_params": _json_params(model),
        "graph": model.save_graph(tmp) if hasattr(model, "save_graph") else None,
        "fold_in": choose_fold_in(served_users, served_items, model.seen, retriever,
                                  model.params()).describe(),
        **lineage}
    if text is None:
        manifest["text_encoder_unavailable"] = _no_text_reason(variant, model)
    seal_manifest(tmp, manifest)


def _json_params(model: Recommender) -> dict:
    """The model's settings that JSON can hold (an update's fold-in may use ALS's)."""
    return {k: v for k, v in model.params().items()
            if isinstance(v, (int, float, str, bool, type(None)))}


def seal_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest with every file's checksum, and the manifest's own digest."""
    manifest["files"] = {str(p.relative_to(folder)): sha256_file(p)
                         for p in sorted(folder.rglob("*")) if p.is_file()}
    write_json_atomic(folder / MANIFEST, manifest)
    (folder / MANIFEST_DIGEST).write_text(sha256_file(folder / MANIFEST) + "\n")


def _absolute_data_paths(data: dict) -> dict:
    """Where the data lives, as absolute paths: `evaluate` must find the same data from any
    working directory, never prepare a copy wherever it is called from."""
    out = {k: data.get(k) for k in ("dataset", "data_root", "data_source", "split",
                                     "cold_fraction")}
    for key in ("data_root", "data_source"):
        if out[key] is not None:
            out[key] = str(Path(out[key]).resolve())
    if Path(out["dataset"]).is_dir():
        out["dataset"] = str(Path(out["dataset"]).resolve())
    return out


def write_version_files(folder: Path, users: np.ndarray, items: np.ndarray, user_table: dict,
                        item_table: dict, retriever: FaissRetriever, seen: sp.csr_matrix,
                        compressed: bool = True) -> None:
    """The files of every bundle version but encoder/, ranker/ and the manifest: vectors,
    id tables (row -> id, profile, attributes), the item index and the seen items."""
    np.save(folder / "user_embeddings.npy", users)
    np.save(folder / "item_embeddings.npy", items)
    pd.DataFrame(user_table).to_parquet(folder / "users.parquet", index=False)
    pd.DataFrame(item_table).to_parquet(folder / "items.parquet", index=False)
    retriever.save(folder / "items.faiss")
    np.save(folder / "index_items.npy", retriever.row_to_item)
    sp.save_npz(folder / "seen.npz", seen, compressed=compressed)


def _id_tables(dataset, n_users: int, n_items: int,
               attributes: dict[str, list[str]]) -> tuple[dict, dict]:
    user_table = {"row": np.arange(n_users), "id": original_ids(dataset.user_ids, n_users)}
    item_table = {"row": np.arange(n_items), "id": original_ids(dataset.item_ids, n_items)}
    if any(p is not None for p in dataset.item_profiles):  # lets answers show what an id is
        item_table["profile"] = [p or "" for p in dataset.item_profiles]
    item_table.update({ATTRIBUTE_PREFIX + name: values for name, values in attributes.items()})
    return user_table, item_table


def _item_attributes(config: dict, n_items: int) -> dict[str, list[str]]:
    """The run's items' FILTER_ATTRIBUTES, from the data folder's item_meta.json if any."""
    data, seed = config.get("data", config), config.get("run", {}).get("seed", 2023)
    folder = prepare_dataset(data["dataset"], data.get("data_root", "dataset"),
                             data.get("data_source"), data.get("data_url"), seed)
    if not (folder / "item_meta.json").exists():
        return {}
    values = {name: [""] * n_items for name in FILTER_ATTRIBUTES}
    for item, (_, meta) in read_id_lines(folder / "item_meta.json", "item_id", n_items).items():
        for name in FILTER_ATTRIBUTES:
            value = meta.get(name)
            values[name][item] = ", ".join(map(str, value)) if isinstance(value, list) \
                else "" if value is None else str(value)
    return {name: column for name, column in values.items() if any(column)}


def _attribute_index(item_table: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """attribute -> value (case-folded; each category on its own) -> item rows."""
    index = {}
    for column in (c for c in item_table.columns if c.startswith(ATTRIBUTE_PREFIX)):
        rows: dict[str, list[int]] = {}
        for row, value in enumerate(item_table[column].astype(str)):
            parts = value.split(",") if column == ATTRIBUTE_PREFIX + "categories" else [value]
            for part in parts:
                if part.strip():
                    rows.setdefault(part.strip().casefold(), []).append(row)
        index[column[len(ATTRIBUTE_PREFIX):]] = {v: np.asarray(r, dtype=np.int64)
                                                 for v, r in rows.items()}
    return index


def _copy_encoder(run_dir: Path, variant: str, model: Recommender, folder: Path) -> dict | None:
    """Copy the encoder that embeds a new profile into this variant's user space: a text
    model's own (the whole vector), or a concat fusion's text part (its block of the fused
    vector; the other blocks stay zero: a cold-start vector)."""
    source = run_dir / "models" / file_name(variant) / ENCODER_DIR
    if not source.exists():
        return None
    shutil.copytree(source, folder / ENCODER_DIR)
    if isinstance(model, GraphSAGE):  # text features in, the network places the node
        return {"folder": ENCODER_DIR, "block": None, "inductive": True}
    block = getattr(model, "text_block", None)
    projections = {side: f"text_projection_{side}.npy"
                   for side, matrix in getattr(model, "text_projections", {}).items()
                   if matrix is not None}
    for side, name in projections.items():  # the fused model's cold-start path
        np.save(folder / name, model.text_projections[side])
    if block or projections:
        return {"folder": ENCODER_DIR, "block": block[:2] if block else None,
                "scale": block[2] if block else None, "projection": projections}
    return {"folder": ENCODER_DIR, "block": [0, model.embeddings()[0].shape[1]], "scale": 1.0}


def _approximate_channels(folder: Path, retriever: FaissRetriever, seen: sp.csr_matrix,
                          target: float, users: int = 300) -> dict:
    """HNSW recall channels for the served ranker, at the item index's width (at least the
    candidate depth), kept only if the ranked top 20 of sampled users holds `target` of the
    ranked top 20 with exact channels."""
    sample = calibration_users(active_users(seen), count=users)
    exact = WideDeepRanker.load(folder, device="cpu")
    approximate = WideDeepRanker.load(folder, device="cpu")
    approximate.channel_index = ("hnsw", retriever.search_width())
    overlap = top_overlap(approximate.recommend(sample, seen, 20)[0],
                          exact.recommend(sample, seen, 20)[0])
    kind = "hnsw" if overlap >= target else "flat"
    return {"kind": kind, "width": retriever.search_width(), "ranked_overlap@20": overlap,
            "users": len(sample), "target": target}


def _copy_ranker(run_dir: Path, variant: str, folder: Path) -> dict | None:
    source = run_dir / "models" / file_name(f"{variant} + Wide&Deep")
    if not source.exists():
        return None
    shutil.copytree(source, folder / RANKER_DIR)
    description = json.loads((source / "ranker.json").read_text())
    return {"folder": RANKER_DIR, "candidates": description["params"]["candidates"],
            "kept_recall_order": description["kept_recall_order"]}


def _no_text_reason(variant: str, model: Recommender) -> str:
    if getattr(model, "method", None) == "projection":
        return "a learned-projection fusion has no separate text block"
    if variant == "fused":
        return "the fusion has no text part, or gave it weight 0 on validation"
    return f"variant '{variant}' is not built from text"


def reproduction_verdict(now: dict, then: dict, tolerance: float) -> tuple[bool, str]:
    """Do metrics now match those at export within `tolerance`? One missing then differs."""
    gaps = [abs(value - then.get(name, float("nan"))) for name, value in now.items()]
    worst = max(gaps) if gaps else float("nan")
    if worst <= tolerance:
        return True, f"verdict: reproduced (largest gap {worst:.2g} <= {tolerance:g})"
    return False, f"verdict: DIFFERS from export (largest gap {worst:.2g} > {tolerance:g})"


class Bundle:
    """A loaded, verified bundle: vectors, ids, seen items, the item index, and the run's
    text encoder and Wide&Deep ranker when it had them."""

    def __init__(self, folder: str | Path) -> None:
        """`folder`: a store (its `current` version, resolved once) or a version's folder."""
        self.folder = Path(folder)
        self.store: BundleStore | None = None
        if is_store(self.folder):
            try:
                self.store = BundleStore(self.folder)
                self.folder = self.store.path(self.store.current())
            except VersionError as error:
                raise BundleError(str(error)) from None
        self.version = self.folder.name
        self.manifest = self._verified_manifest()
        scales = self.manifest["scales"]
        self.users = _restore(np.load(self.folder / "user_embeddings.npy"), scales["users"])
        self.items = _restore(np.load(self.folder / "item_embeddings.npy"), scales["items"])
        for name in ("users", "items"):
            shape = (self.manifest[name], self.manifest["dim"])
            if getattr(self, name).shape != shape:
                raise BundleError(f"{self.folder}: {name} vectors are "
                                  f"{getattr(self, name).shape}, manifest says {shape}")
        self.user_ids = pd.read_parquet(self.folder / "users.parquet")["id"].astype(str).tolist()
        item_table = pd.read_parquet(self.folder / "items.parquet")
        self.item_ids = item_table["id"].astype(str).tolist()
        self.item_profiles = item_table["profile"].tolist() if "profile" in item_table else None
        self._attribute_index = _attribute_index(item_table)
        self.seen = sp.load_npz(self.folder / "seen.npz").tocsr()
        self.retriever = FaissRetriever.load(self.folder / "items.faiss",
                                             np.load(self.folder / "index_items.npy"))
        self._user_row = {uid: row for row, uid in enumerate(self.user_ids)}
        self._item_row = {iid: row for row, iid in enumerate(self.item_ids)}
        self._ranker: WideDeepRanker | None = None
        self._encoder: TextEncoder | None = None
        self._encoder_lock = threading.RLock()  # loading and a fast tokenizer: one thread

    def _verified_manifest(self) -> dict:
        manifest_file = self.folder / MANIFEST
        if not manifest_file.exists():
            raise BundleError(f"{self.folder}: not a bundle (no {MANIFEST})")
        digest_file = self.folder / MANIFEST_DIGEST
        if not digest_file.exists():
            raise BundleError(f"{digest_file}: missing (the manifest cannot be verified)")
        if digest_file.read_text().strip() != sha256_file(manifest_file):
            raise BundleError(f"{manifest_file}: does not match {MANIFEST_DIGEST} (the manifest "
                              "was edited or corrupted)")
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as error:
            raise BundleError(f"{manifest_file}: malformed JSON ({error.msg})") from error
        missing = [key for key in REQUIRED if key not in manifest]
        if missing:
            raise BundleError(f"{manifest_file}: missing required fields {', '.join(missing)}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{manifest_file}: unsupported format version "
                              f"{manifest.get('format_version')} (this code reads "
                              f"{FORMAT_VERSION}; export the run again)")
        for name, expected in manifest["files"].items():
            path = self.folder / name
            if not path.exists():
                raise BundleError(f"{path}: listed in the manifest but missing")
            if sha256_file(path) != expected:
                raise BundleError(f"{path}: checksum mismatch (file changed or corrupted)")
        return manifest

    def data_config(self) -> ExperimentConfig:
        """The data set and split the bundle was exported from."""
        return ExperimentConfig().updated({k: v for k, v in self.manifest["data"].items()
                                           if v is not None})

    def item_profile(self, item: str) -> str:
        """The item's profile text as exported ('' when the bundle holds none)."""
        return self.item_profiles[self.item_row(item)] if self.item_profiles else ""

    def user_row(self, user: str) -> int:
        if user not in self._user_row:
            raise BundleError(f"unknown user id {user!r} (this bundle has "
                              f"{len(self.user_ids):,} users, e.g. {self.user_ids[0]!r})")
        return self._user_row[user]

    def item_row(self, item: str) -> int:
        if item not in self._item_row:
            raise BundleError(f"unknown item id {item!r} (this bundle has "
                              f"{len(self.item_ids):,} items, e.g. {self.item_ids[0]!r})")
        return self._item_row[item]

    def _named(self, rows: np.ndarray, scores: np.ndarray) -> list[tuple[str, float]]:
        return [(self.item_ids[r], float(s)) for r, s in zip(rows, scores) if r >= 0]

    @property
    def ranker(self) -> WideDeepRanker:
        if self.manifest.get("ranker") is None:
            raise BundleError(f"this '{self.manifest['variant']}' bundle has no ranker (run "
                              f"with --rank widedeep --rank-on {self.manifest['variant']}, "
                              "then export)")
        if self._ranker is None:
            try:
                self._ranker = WideDeepRanker.load(self.folder / RANKER_DIR)
            except ValueError as error:  # e.g. a ranker of an older format
                raise BundleError(str(error)) from error
            channels = self.manifest["ranker"].get("channels") or {}
            if channels.get("kind") == "hnsw":  # kept at export: close to exact channels
                self._ranker.channel_index = ("hnsw", channels["width"])
        return self._ranker

    def recommend(self, user: str, k: int = 20, rank: bool = False,
                  where: dict[str, str] | None = None) -> list[tuple[str, float]]:
        """Top-k items for a known user, seen items excluded; with `rank`, the ranker's
        order of the union of the recall channels' candidates (scores are then the ranker's).
        `where`: only items whose attributes match (`items_matching`): recall returns the
        exact top k among them; ranking keeps the matching ones of its candidates, scored
        exactly as without the filter (so the list may be shorter than k)."""
        keep = self.items_matching(where) if where else None
        if keep is None:
            return self.recommend_many([user], k, rank)[0]
        row = self.user_row(user)
        if not rank:
            return self._top_among(row, keep, k)
        items, scores = self._ranked(np.array([row]), self.ranker.union_size)
        inside = np.isin(items[0], keep)
        return self._named(items[0][inside][:k], scores[0][inside][:k])

    def recommend_many(self, users: list[str], k: int = 20,
                       rank: bool = False) -> list[list[tuple[str, float]]]:
        """`recommend` (no filter) for several users: one search per index, one ranker call;
        the lists of one at a time (scores may differ in the last float32 bit: batched)."""
        rows = np.array([self.user_row(user) for user in users], dtype=np.int64)
        items, scores = self._ranked(rows, k) if rank else \
            self.retriever.search(self.users, k, self.seen, rows)
        return [self._named(i, s) for i, s in zip(items, scores)]

    def _ranked(self, rows: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        ranker = self.ranker
        trained = self.manifest.get("ranker_rows", {"users": len(self.users),
                                                    "items": len(self.items)})
        if (rows >= trained["users"]).any():
            late = self.user_ids[rows[rows >= trained["users"]][0]]
            raise BundleError(f"user {late!r} joined in an update after the ranker was trained;"
                              " ask without rank (recall) until the next full retrain")
        removed = np.asarray(self.manifest.get("removed_rows", []), dtype=np.int64)
        exclude = self._exclusion(rows, (trained["users"], trained["items"]), removed)
        return ranker.recommend(rows, exclude, depth)

    def _top_among(self, row: int, keep: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Exact inner-product top k of `row` among the indexed, unseen items of `keep`
        (work in proportion to len(keep), not to the catalogue)."""
        seen = self.seen.indices[self.seen.indptr[row]:self.seen.indptr[row + 1]]
        candidates = np.setdiff1d(np.intersect1d(keep, self.retriever.row_to_item), seen)
        scores = self.items[candidates] @ self.users[row]
        top = np.argsort(-scores, kind="stable")[:k] if len(scores) <= 4 * k else \
            np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return self._named(candidates[top], scores[top])

    def _exclusion(self, rows: np.ndarray, shape: tuple[int, int],
                   extra: np.ndarray) -> sp.csr_matrix:
        """A `shape` matrix whose rows `rows` hold each user's seen items and `extra`."""
        lists = [np.union1d(self.seen.indices[self.seen.indptr[row]:self.seen.indptr[row + 1]],
                            extra).astype(np.int64) for row in rows]
        lists = [items[items < shape[1]] for items in lists]
        users = np.repeat(rows, [len(items) for items in lists])
        return sp.csr_matrix((np.ones(len(users), np.float32), (users, np.concatenate(lists))),
                             shape=shape)

    def items_matching(self, where: dict[str, str]) -> np.ndarray:
        """Rows of the items that pass every `where` filter: an attribute equal to the value
        (case-insensitive), or for `categories` one of its comma-separated entries."""
        unknown = sorted(set(where) - set(self._attribute_index))
        if unknown:
            raise BundleError(f"unknown item attribute(s) {', '.join(unknown)}; this bundle can "
                              f"filter by {', '.join(sorted(self._attribute_index)) or 'none'}")
        keep = None
        for name, value in where.items():
            rows = self._attribute_index[name].get(value.strip().casefold(),
                                                   np.empty(0, dtype=np.int64))
            keep = rows if keep is None else np.intersect1d(keep, rows)
        return keep

    def answer(self, user: str | None = None, profile: str | None = None,
               item: str | None = None, lookalike: str | None = None, k: int = 20,
               rank: bool = False, recent: list[str] | None = None
               ) -> tuple[list[tuple[str, float]], str]:
        """(rows, 'item' or 'user') for the one question asked, as `recommend` prints it
        (`recent`: items the user just interacted with, folded into their vector)."""
        if user is not None and recent:
            return self.recommend_with_recent(user, recent, k), "item"
        if user is not None:
            return self.recommend(user, k, rank=rank), "item"
        if profile is not None:
            if not profile.strip():
                raise BundleError("--profile is empty: give the new user's profile text")
            return self.recommend_for_vector(self.embed_profile(profile), k), "item"
        if item is not None:
            return self.similar_items(item, k), "item"
        return self.lookalike_users(lookalike, k), "user"

    def recommend_with_recent(self, user: str, recent: list[str],
                              k: int = 20) -> list[tuple[str, float]]:
        """Near-online fold-in, no training: the user's vector moved toward the mean of the
        items they just interacted with, in proportion to how many those are among all their
        interactions (the norm is kept); seen and recent items are excluded."""
        row = self.user_row(user)
        recent_rows = np.array([self.item_row(i) for i in recent], dtype=np.int64)
        user_vector, recent_mean = self.users[row], self.items[recent_rows].mean(axis=0)
        n_seen, n_recent = self.seen[row].nnz, len(recent_rows)
        direction = n_seen * unit_rows(user_vector[None])[0] + \
            n_recent * unit_rows(recent_mean[None])[0]
        vector = unit_rows(direction[None])[0] * max(np.linalg.norm(user_vector), 1e-12)
        exclude = self.seen[row].tolil()
        exclude[0, recent_rows] = 1
        items, scores = self.retriever.search(vector[None].astype(np.float32), k,
                                              exclude.tocsr())
        return self._named(items[0], scores[0])

    def recommend_for_vector(self, vector: np.ndarray, k: int = 20) -> list[tuple[str, float]]:
        items, scores = self.retriever.search(vector[None, :].astype(np.float32), k)
        return self._named(items[0], scores[0])

    def similar_items(self, item: str, k: int = 20) -> list[tuple[str, float]]:
        row = self.item_row(item)
        itself = sp.csr_matrix(([1.0], ([0], [row])), shape=(1, len(self.items)))
        items, scores = self.retriever.search(self.items[row][None, :], k, itself)
        return self._named(items[0], scores[0])

    def lookalike_users(self, user: str, k: int = 20) -> list[tuple[str, float]]:
        row = self.user_row(user)
        if not hasattr(self, "_user_index"):
            self._user_index = FaissRetriever("flat", use_gpu=False).fit(self.users)
        itself = sp.csr_matrix(([1.0], ([0], [row])), shape=(1, len(self.users)))
        rows, scores = self._user_index.search(self.users[row][None, :], k, itself)
        return [(self.user_ids[r], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]

    @property
    def encoder(self) -> TextEncoder:
        """The text encoder the run used (loaded once); BundleError says why there is none."""
        recipe = self.manifest.get("text_encoder")
        if recipe is None:
            reason = self.manifest.get("text_encoder_unavailable", "no text part")
            raise BundleError(f"this '{self.manifest['variant']}' bundle cannot embed a new "
                              f"profile: {reason}")
        with self._encoder_lock:  # two first callers load it once
            if self._encoder is None:
                try:
                    self._encoder = load_encoder(self.folder / recipe["folder"])
                except Exception as error:  # a rebuilt encoder that differs is refused
                    raise BundleError(f"{self.folder / recipe['folder']}: {error}") from error
        return self._encoder

    def embed_profile(self, text: str) -> np.ndarray:
        """A cold-start user vector from profile text, with the encoder the run used."""
        encoder = self.encoder
        with self._encoder_lock:
            encoded = encoder.encode([text], show_progress=False)[0]
        return self.place_text(encoded[None, :], "users")[0]

    def place_text(self, encoded: np.ndarray, side: str) -> np.ndarray:
        """Whole vectors for new users (profiles) or items from their encoded text: through
        the fused model's cold-start projection where it has one, else in the text block
        with the other blocks zero."""
        recipe = self.manifest["text_encoder"]
        if recipe.get("inductive"):
            if not hasattr(self, "_sage"):  # this version's network, shared weights only
                self._sage = sage_cold_start_network(self.folder, self.manifest["graph"])
            return sage_cold_start(self._sage, encoded)
        projection = (recipe.get("projection") or {}).get(side)
        if projection:
            if not hasattr(self, "_projections"):
                self._projections = {}
            if side not in self._projections:
                self._projections[side] = np.load(self.folder / projection, allow_pickle=False)
            return apply_content_map(encoded, self._projections[side])
        vectors = np.zeros((len(encoded), self.manifest["dim"]), dtype=np.float32)
        start, end = recipe["block"]
        vectors[:, start:end] = encoded * recipe["scale"]
        return vectors

    def evaluate(self, dataset, ks: tuple[int, ...]) -> tuple[dict, dict]:
        """(metrics now, metrics at export) on the data set's test split. Items without an
        indexed vector (no text, in a text bundle) are left out exactly as at export."""
        if self.manifest.get("changes", {}).get("kind") == "update":
            raise BundleError(f"version {self.version} was updated with interactions from "
                              "outside the data set; evaluate the version of a full export")
        if not same_data(dataset.summary(), self.manifest["dataset"]):
            raise BundleError("the data set on disk differs from the one the bundle was "
                              "exported from")
        evaluator = Evaluator.on_test(dataset, ks)
        top, _ = self.retriever.search(self.users, evaluator.k, self.seen, evaluator.users)
        return evaluator.metrics(top), self.manifest["metrics_at_export"]
