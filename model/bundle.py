"""Production recall bundles: export a run's user and item vectors with their FAISS index,
id maps and the recipe to embed a new profile; load them back with every checksum verified."""
from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from utils import atomic_path, sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle that is missing, corrupted or does not fit what is asked of it."""


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _quantise(vectors: np.ndarray, storage: str) -> tuple[np.ndarray, float]:
    if storage == "float32":
        return vectors.astype(np.float32), 1.0
    if storage == "float16":
        return vectors.astype(np.float16), 1.0
    scale = float(np.abs(vectors).max() / 127) or 1.0  # symmetric int8, one scale per matrix
    return np.clip(np.round(vectors / scale), -127, 127).astype(np.int8), scale


def export_bundle(run_dir: Path, variant: str, dataset, out: Path,
                  storage: str = "float32") -> Path:
    """Write the bundle of one embedding variant of a run to `out` (atomically)."""
    import faiss

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    vectors_file = run_dir / "embeddings" / f"{variant}.npz"
    if not vectors_file.exists():
        saved = sorted(p.stem for p in (run_dir / "embeddings").glob("*.npz"))
        raise BundleError(f"{run_dir}: no vectors saved for variant '{variant}' (saved: {saved})")
    vectors = np.load(vectors_file)
    users, items = vectors["users"], vectors["items"]
    result = metrics["variants"][variant]
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        stored_users, user_scale = _quantise(users, storage)
        stored_items, item_scale = _quantise(items, storage)
        np.save(tmp / "user_embeddings.npy", stored_users)
        np.save(tmp / "item_embeddings.npy", stored_items)
        pd.DataFrame({"row": np.arange(len(users)), "id": _ids(dataset.user_ids, len(users))}
                     ).to_parquet(tmp / "users.parquet", index=False)
        item_table = {"row": np.arange(len(items)), "id": _ids(dataset.item_ids, len(items))}
        if any(p is not None for p in dataset.item_profiles):  # lets answers show what an id is
            item_table["profile"] = [p or "" for p in dataset.item_profiles]
        pd.DataFrame(item_table).to_parquet(tmp / "items.parquet", index=False)
        index = faiss.IndexFlatIP(items.shape[1])
        index.add(np.ascontiguousarray(_restore(stored_items, item_scale)))
        faiss.write_index(index, str(tmp / "items.faiss"))
        sp.save_npz(tmp / "seen.npz", (dataset.train > 0).astype(np.float32).tocsr())
        manifest = {
            "format_version": FORMAT_VERSION, "variant": variant,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "code_version": _code_version(), "source_run": str(run_dir),
            "dataset": metrics["dataset"],
            "data": {k: config.get(k) for k in ("dataset", "data_root", "data_source")},
            "users": int(users.shape[0]), "items": int(items.shape[0]),
            "dim": int(items.shape[1]), "storage": storage,
            "scales": {"users": user_scale, "items": item_scale},
            "normalised": bool(np.allclose(np.linalg.norm(items[np.abs(items).sum(1) > 0],
                                                          axis=1), 1, atol=1e-3)),
            "metric": "inner_product", "index": {"file": "items.faiss", "type": "IndexFlatIP"},
            "metrics_at_export": result["metrics"],
            "text_encoder": _encoder_recipe(variant, result, metrics, config, users.shape[1]),
        }
        if manifest["text_encoder"] is None:
            manifest["text_encoder_unavailable"] = _no_text_reason(variant, result, metrics)
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _ids(ids: list[str], count: int) -> list[str]:
    return list(ids) if len(ids) == count else [str(i) for i in range(count)]


def _restore(stored: np.ndarray, scale: float) -> np.ndarray:
    return stored.astype(np.float32) * np.float32(scale)


def _encoder_recipe(variant: str, result: dict, metrics: dict, config: dict,
                    dim: int) -> dict | None:
    """How to embed a new profile into this variant's user space, or None if it has no text.

    Text variant: the encoder output itself. Fused: the text block (first columns, scaled by
    sqrt(weight) / mean row norm) with the graph blocks left at zero: a cold-start vector.
    """
    text = metrics["variants"].get("text", {})
    encoder = text.get("encoder")
    if encoder is None:
        return None
    recipe = {"base": config.get("encoder_path") or config.get("base_model"),
              "layers": config.get("layers"), "layer_strategy": config.get("layer_strategy"),
              "weights_sha256": text.get("encoder_fingerprint"), **encoder}
    if variant == "text":
        return {**recipe, "block": [0, encoder["dim"]], "scale": 1.0}
    parts = result.get("parts", [])
    weights = result.get("fusion_weights", {})
    if variant == "fused" and result.get("method") == "concat" and parts[:1] == ["text"] \
            and weights.get("text", 0) > 0:
        return {**recipe, "block": [0, encoder["dim"]], "scale": float(np.sqrt(weights["text"])),
                "total_dim": dim}
    return None


def _no_text_reason(variant: str, result: dict, metrics: dict) -> str:
    if "encoder" not in metrics["variants"].get("text", {}):
        return "the run has no text model (no profiles, or the text variant was not run)"
    if variant == "fused" and result.get("method") != "concat":
        return "a learned-projection fusion has no separate text block"
    if variant == "fused":
        return "the fusion gave the text part weight 0 on validation"
    return f"variant '{variant}' is not built from text"


class Bundle:
    """A loaded, verified bundle: vectors, ids, seen items and the item index."""

    def __init__(self, folder: str | Path) -> None:
        import faiss

        self.folder = Path(folder)
        manifest_file = self.folder / MANIFEST
        if not manifest_file.exists():
            raise BundleError(f"{self.folder}: not a bundle (no {MANIFEST})")
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as error:
            raise BundleError(f"{manifest_file}: malformed JSON ({error.msg})") from error
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{manifest_file}: unsupported format version "
                              f"{self.manifest.get('format_version')}")
        for name, expected in self.manifest["files"].items():
            path = self.folder / name
            if not path.exists():
                raise BundleError(f"{path}: listed in the manifest but missing")
            if sha256_file(path) != expected:
                raise BundleError(f"{path}: checksum mismatch (file changed or corrupted)")
        scales = self.manifest["scales"]
        self.users = _restore(np.load(self.folder / "user_embeddings.npy"), scales["users"])
        self.items = _restore(np.load(self.folder / "item_embeddings.npy"), scales["items"])
        expected_shapes = {"users": (self.manifest["users"], self.manifest["dim"]),
                           "items": (self.manifest["items"], self.manifest["dim"])}
        for name, shape in expected_shapes.items():
            if getattr(self, name).shape != tuple(shape):
                raise BundleError(f"{self.folder}: {name} vectors are "
                                  f"{getattr(self, name).shape}, manifest says {tuple(shape)}")
        self.user_ids = pd.read_parquet(self.folder / "users.parquet")["id"].astype(str).tolist()
        item_table = pd.read_parquet(self.folder / "items.parquet")
        self.item_ids = item_table["id"].astype(str).tolist()
        self.item_profiles = item_table["profile"].tolist() if "profile" in item_table else None
        self.seen = sp.load_npz(self.folder / "seen.npz").tocsr()
        self.index = faiss.read_index(str(self.folder / "items.faiss"))
        self._user_row = {uid: row for row, uid in enumerate(self.user_ids)}
        self._item_row = {iid: row for row, iid in enumerate(self.item_ids)}

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

    def _search(self, query: np.ndarray, k: int, exclude: np.ndarray) -> list[tuple[str, float]]:
        scores, rows = self.index.search(query[None, :].astype(np.float32), k + len(exclude))
        keep = [(self.item_ids[r], float(s)) for r, s in zip(rows[0], scores[0])
                if r >= 0 and r not in set(exclude.tolist())]
        return keep[:k]

    def recommend(self, user: str, k: int = 20) -> list[tuple[str, float]]:
        row = self.user_row(user)
        seen = self.seen.indices[self.seen.indptr[row]:self.seen.indptr[row + 1]]
        return self._search(self.users[row], k, seen)

    def recommend_for_vector(self, vector: np.ndarray, k: int = 20) -> list[tuple[str, float]]:
        return self._search(vector, k, np.zeros(0, dtype=np.int64))

    def similar_items(self, item: str, k: int = 20) -> list[tuple[str, float]]:
        row = self.item_row(item)
        return self._search(self.items[row], k, np.array([row]))

    def lookalike_users(self, user: str, k: int = 20) -> list[tuple[str, float]]:
        import faiss

        row = self.user_row(user)
        index = faiss.IndexFlatIP(self.users.shape[1])
        index.add(self.users)
        scores, rows = index.search(self.users[row][None, :], k + 1)
        return [(self.user_ids[r], float(s)) for r, s in zip(rows[0], scores[0])
                if r >= 0 and r != row][:k]

    def embed_profile(self, text: str) -> np.ndarray:
        """A cold-start user vector from profile text, with the encoder the run used."""
        from model.text import TextEncoder

        recipe = self.manifest.get("text_encoder")
        if recipe is None:
            reason = self.manifest.get("text_encoder_unavailable", "no text part")
            raise BundleError(f"this '{self.manifest['variant']}' bundle cannot embed a new "
                              f"profile: {reason}")
        encoder = TextEncoder.from_pretrained(
            recipe["base"], layers=recipe["layers"], strategy=recipe["layer_strategy"],
            pooling=recipe["pooling"], max_length=recipe["max_length"],
            quantize=recipe["quantize"])
        if recipe.get("weights_sha256") and encoder.fingerprint() != recipe["weights_sha256"]:
            raise BundleError(f"the encoder rebuilt from {recipe['base']!r} differs from the one "
                              "this bundle was made with (weights hash mismatch)")
        text_vector = encoder.encode([text], show_progress=False)[0] * recipe["scale"]
        vector = np.zeros(self.manifest["dim"], dtype=np.float32)
        start, end = recipe["block"]
        vector[start:end] = text_vector
        return vector
