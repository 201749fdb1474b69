"""Turn a data folder (EasyRec/RLMRec pickles or CSV interactions, plus JSON-lines profiles)
into one in-memory `Dataset`; fill `dataset/NAME` on first use from a local copy, a download,
or the built-in demo generator."""
from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import pickle
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from utils import atomic_path, log, sha256_of

PROJECT_ROOT = Path(__file__).resolve().parent
SHARED_DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
EASYREC_DATA_URL = "https://archive.org/download/easyrec_data/data.zip"

SPLIT_FILES = {
    "easyrec": ("trn_mat.pkl", "val_mat.pkl", "tst_mat.pkl"),
    "csv": ("train.csv", "val.csv", "test.csv"),
}
OPTIONAL_FILES = ("user_profile.json", "item_profile.json", "user_profile.llm.json",
                  "item_profile.llm.json", "user_mapper.json", "item_mapper.json", "item_meta.json")
BUILT_USER_FILE, BUILT_ITEM_FILE = "user_profile.built.json", "item_profile.built.json"
MAX_ITEMS_IN_BUILT_PROFILE = 5
DEMO_SEED = 2023  # the built-in demo data of the default seed lives in dataset/demo


class DataError(ValueError):
    """Bad input data; the message names the file (and line, where there is one)."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    layout: str  # "easyrec", "csv" or "generated"
    url: str | None = None  # archive with a folder named `archive_dir` inside
    archive_dir: str | None = None
    description: str = ""


REGISTRY: dict[str, DatasetSpec] = {
    "demo": DatasetSpec("demo", "generated", description="small synthetic set made by this project"),
    "yelp": DatasetSpec("yelp", "easyrec", EASYREC_DATA_URL, "yelp",
                        "RLMRec/EasyRec Yelp split, 11,091 users x 11,010 items"),
    "yelp-text": DatasetSpec("yelp-text", "csv", description="XRec Yelp with LLM-written profiles"),
    "sports": DatasetSpec("sports", "easyrec", EASYREC_DATA_URL, "sports", "EasyRec Amazon-Sports"),
    "steam": DatasetSpec("steam", "easyrec", EASYREC_DATA_URL, "steam", "RLMRec/EasyRec Steam"),
}


@dataclass
class Dataset:
    """Everything downstream reads: three user x item CSR count matrices, profiles, ids."""

    name: str
    train: sp.csr_matrix
    val: sp.csr_matrix
    test: sp.csr_matrix
    user_profiles: list[str | None]
    item_profiles: list[str | None]
    user_profile_source: np.ndarray  # "written", "built" or "none" per user
    item_profile_source: np.ndarray
    user_ids: list[str] = field(default_factory=list)  # original ids, index = row
    item_ids: list[str] = field(default_factory=list)
    hygiene: dict = field(default_factory=dict)  # what profile cleaning found (model/hygiene)
    protocol: dict = field(default_factory=dict)  # a cold-start split's record (model/splits)

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    def summary(self) -> dict:
        test_users = np.flatnonzero(np.diff(self.test.indptr) > 0)
        return {
            "dataset": self.name, "users": self.n_users, "items": self.n_items,
            "interactions": {"train": int(self.train.nnz), "val": int(self.val.nnz),
                             "test": int(self.test.nnz)},
            "test_users": int(len(test_users)),
            "text_coverage": self.text_coverage(),
            "split_sha256": self.split_digest(),
        } | ({"profile_hygiene": self.hygiene} if self.hygiene else {}) | (
            {"split": {k: len(v) if isinstance(v, list) else v  # counts, not the rows
                       for k, v in self.protocol.items()}} if self.protocol else {})

    def split_digest(self) -> str:
        """Identity of the three splits' contents (not just their sizes): runs compared in an
        A/B report, or a bundle re-evaluated, must be on exactly these interactions."""
        parts = []
        for matrix in (self.train, self.val, self.test):
            matrix = matrix.tocsr()
            matrix.sort_indices()
            parts += [np.asarray(matrix.shape, dtype=np.int64).tobytes(),
                      matrix.indptr.astype(np.int64).tobytes(),
                      matrix.indices.astype(np.int64).tobytes(),
                      matrix.data.astype(np.float32).tobytes()]
        return sha256_of(*parts)

    def text_coverage(self) -> dict:
        def counts(source: np.ndarray) -> dict:
            return {kind: int((source == kind).sum()) for kind in ("written", "built", "none")}

        users, items = counts(self.user_profile_source), counts(self.item_profile_source)
        users["written_fraction"] = round(users["written"] / max(self.n_users, 1), 4)
        items["with_text_fraction"] = round(
            (items["written"] + items["built"]) / max(self.n_items, 1), 4)
        return {"users": users, "items": items}


def load_dataset(folder: str | Path, name: str | None = None) -> Dataset:
    """Read a folder in the EasyRec layout (pickled CSR) or the CSV layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder does not exist")
    layout = detect_layout(folder)
    if layout == "easyrec":
        train, val, test = (_read_pickled_matrix(folder / f) for f in SPLIT_FILES["easyrec"])
        _check_shapes(folder, SPLIT_FILES["easyrec"], (train, val, test))
        n_users, n_items = train.shape
    else:
        frames = [_read_interaction_csv(folder / f) for f in SPLIT_FILES["csv"]]
        if not any(len(f) for f in frames):
            raise DataError(f"{folder}: train.csv, val.csv and test.csv hold no interactions")
        n_users, n_items = (_id_space(folder, frames, column) for column in ("user", "item"))
        train, val, test = (_to_csr(f, n_users, n_items) for f in frames)
    if train.nnz == 0:
        raise DataError(f"{folder}: the training split has no interactions")
    if test.nnz == 0:
        raise DataError(f"{folder}: the test split is empty; nothing to evaluate")

    item_profiles = _read_profiles(folder / "item_profile.json", "item_id", n_items)
    item_source = _sources(item_profiles)
    meta_file = folder / "item_meta.json"
    for item, (_, meta) in (read_id_lines(meta_file, "item_id", n_items).items()
                            if meta_file.exists() else ()):
        if item_profiles[item] is None and (text := item_profile_from_metadata(meta)):
            item_profiles[item], item_source[item] = text, "built"

    user_profiles = _read_profiles(folder / "user_profile.json", "user_id", n_users)
    user_source = _sources(user_profiles)
    for user, text in enumerate(build_user_profiles(train, item_profiles)):
        if user_profiles[user] is None and text is not None:
            user_profiles[user], user_source[user] = text, "built"

    return Dataset(name=name or folder.name, train=train, val=val, test=test,
                   user_profiles=user_profiles, item_profiles=item_profiles,
                   user_profile_source=user_source, item_profile_source=item_source,
                   user_ids=_read_mapper(folder / "user_mapper.json", n_users),
                   item_ids=_read_mapper(folder / "item_mapper.json", n_items))


def detect_layout(folder: Path) -> str:
    """The layout whose split files are all there; else say which files are missing."""
    partial = []
    for layout, files in SPLIT_FILES.items():
        found = [f for f in files if (folder / f).exists()]
        if len(found) == len(files):
            return layout
        if found:
            missing = [f for f in files if f not in found]
            partial.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                           f"missing (found {', '.join(found)})")
    expected = " or ".join("/".join(files) for files in SPLIT_FILES.values())
    raise DataError(f"{folder}: " + ("; ".join(partial) or
                                     f"no interaction files found; expected {expected}"))


class _MatrixUnpickler(pickle.Unpickler):
    """Unpickles only what a sparse or dense numeric matrix is made of. A pickle can name any
    callable, and plain `pickle.load` calls it: that runs code from the data file."""

    SPARSE = {"csr_matrix", "csc_matrix", "coo_matrix", "csr_array", "csc_array", "coo_array"}
    NUMPY = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
             ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
             ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        sparse = module.startswith("scipy.sparse") and name in self.SPARSE
        if sparse or (module, name) in self.NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and "
                                     "scipy sparse matrices are allowed in a matrix pickle")


def _read_pickled_matrix(path: Path) -> sp.csr_matrix:
    try:
        with open(path, "rb") as handle:
            matrix = _MatrixUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError,
            IndexError) as error:
        raise DataError(f"{path}: cannot unpickle a matrix ({error})") from error
    if not sp.issparse(matrix):
        raise DataError(f"{path}: expected a scipy sparse user x item matrix, got "
                        f"{type(matrix).__name__}")
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    if matrix.nnz and matrix.data.min() < 0:
        raise DataError(f"{path}: interaction counts must be non-negative")
    return matrix


def _check_shapes(folder: Path, names: Iterable[str], matrices: Iterable[sp.spmatrix]) -> None:
    shapes = {name: m.shape for name, m in zip(names, matrices)}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s[0]}x{s[1]}" for n, s in shapes.items())
        raise DataError(f"{folder}: matrix shapes disagree ({listed})")


def _read_interaction_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") \
            from error
    except pd.errors.ParserError as error:
        raise _csv_error(path, error) from error
    except pd.errors.EmptyDataError:
        return pd.DataFrame({"user": np.array([], int), "item": np.array([], int)})
    if {"user", "item"} - set(frame.columns):
        raise DataError(f"{path}:1: header must name columns 'user' and 'item' "
                        f"(found {list(frame.columns)})")
    out = {}
    for column in ("user", "item"):
        values = pd.to_numeric(frame[column], errors="coerce")
        written = frame[column].str.strip()
        bad = values.isna() | (values < 0) | (values != values.round()) \
            | ~written.str.fullmatch(r"\d+")  # 2e1 or 3.0 are not ids
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}:{row + 2}: {column} id must be a non-negative integer, "
                            f"got {frame[column].iloc[row]!r}")
        out[column] = values.astype(np.int64).to_numpy()
    return pd.DataFrame(out)


def _csv_error(path: Path, error: pd.errors.ParserError) -> DataError:
    """pandas counts records (header: 1); the line an editor shows counts quoted newlines."""
    text = " ".join(str(error).split())
    match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if match is None:
        return DataError(f"{path}: malformed CSV ({text})")
    expected, line, saw = match[1], int(match[2]), match[3]
    with contextlib.suppress(csv.Error), \
            open(path, newline="", encoding="utf-8", errors="replace") as handle:
        records = csv.reader(handle)
        for _ in zip(range(line - 1), records):
            pass
        line = records.line_num + 1
    return DataError(f"{path}:{line}: expected {expected} fields, saw {saw}")


def _id_space(folder: Path, frames: list[pd.DataFrame], column: str) -> int:
    """Rows are ids 0..max; ids far beyond the number of distinct ids (a typo, or ids that
    need a mapper) would allocate a huge matrix: refuse them."""
    ids = np.concatenate([f[column].to_numpy() for f in frames])
    largest, distinct = int(ids.max()), len(np.unique(ids))
    if largest + 1 > max(1000, 100 * distinct):
        raise DataError(f"{folder}: {column} id {largest:,} but only {distinct:,} distinct "
                        f"{column} ids: ids must be row numbers 0..N-1 (map original ids "
                        f"with {column}_mapper.json)")
    return largest + 1


def _to_csr(frame: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    ones = np.ones(len(frame), dtype=np.float32)  # repeated rows add up to a visit count
    matrix = sp.csr_matrix((ones, (frame["user"], frame["item"])), shape=(n_users, n_items))
    matrix.sum_duplicates()
    return matrix


def iter_json_lines(path: Path) -> Iterable[tuple[int, dict]]:
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_number}: not UTF-8 text ({error.reason} at byte "
                                f"{error.start})") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: malformed JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object per line")
            yield line_number, record


def read_id_lines(path: Path, id_key: str, limit: int) -> dict[int, tuple[int, dict]]:
    """{id: (line number, record)} from JSON lines keyed by an in-range integer `id_key`."""
    records: dict[int, tuple[int, dict]] = {}
    for line_number, record in iter_json_lines(path):
        key = record.get(id_key)
        if not isinstance(key, int) or isinstance(key, bool):
            raise DataError(f"{path}:{line_number}: missing integer '{id_key}'")
        if not 0 <= key < limit:
            raise DataError(f"{path}:{line_number}: {id_key} {key} out of range "
                            f"(the interaction data has ids 0..{limit - 1})")
        if key in records:
            raise DataError(f"{path}:{line_number}: duplicate {id_key} {key}")
        records[key] = (line_number, record)
    return records


def _read_profiles(path: Path, id_key: str, limit: int) -> list[str | None]:
    """The data's profiles, then for the others those `main.py profiles` wrote (NAME.llm.json)."""
    profiles: list[str | None] = [None] * limit
    for source in (path.with_suffix(".llm.json"), path):  # the data's own file wins
        for key, (line_number, record) in (read_id_lines(source, id_key, limit).items()
                                           if source.exists() else ()):
            if not isinstance(record.get("profile"), str):
                raise DataError(f"{source}:{line_number}: 'profile' must be a string")
            profiles[key] = record["profile"].strip() or profiles[key]
    return profiles


def _read_mapper(path: Path, limit: int) -> list[str]:
    """Original ids from RLMRec mappers: {"uid": 0, "user_id": "..."} per line; without a
    mapper, the row numbers as strings."""
    if not path.exists():
        return [str(row) for row in range(limit)]
    ids: list[str] = [""] * limit
    for line_number, record in iter_json_lines(path):
        index = next((v for k, v in record.items() if isinstance(v, int) and k in ("uid", "iid")),
                     None)
        original = next((v for v in record.values() if isinstance(v, str)), None)
        if index is None or original is None:
            raise DataError(f"{path}:{line_number}: expected an integer uid/iid and a string id")
        if not 0 <= index < limit:
            raise DataError(f"{path}:{line_number}: index {index} out of range 0..{limit - 1}")
        ids[index] = original
    return ids


def _sources(profiles: list[str | None]) -> np.ndarray:
    return np.array(["written" if p is not None else "none" for p in profiles], dtype=object)


def item_profile_from_metadata(meta: dict) -> str | None:
    """A factual item profile from Yelp-style business fields; None when there are none."""
    name = str(meta.get("name") or "").strip()
    categories = meta.get("categories")
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    place = ", ".join(str(meta[k]) for k in ("city", "state") if meta.get(k))
    head = (name or "This business") + (f" ({', '.join(categories)})" if categories else "") \
        + (f" in {place}" if place else "")
    parts = [head + "."] if name or categories or place else []
    stars = pd.to_numeric(meta.get("stars"), errors="coerce") if meta.get("stars") is not None \
        else None
    if stars is not None and np.isfinite(stars):  # a non-numeric rating is left out
        parts.append(f"Rated {float(stars):.1f} stars.")
    attributes = meta.get("attributes") or {}
    if isinstance(attributes, dict):
        features = [k for k, v in attributes.items() if v in (True, "True", "true", "yes")]
        if features:
            parts.append("Offers " + ", ".join(features) + ".")
    return " ".join(parts) or None


def _first_sentence(text: str) -> str:
    return text.split(". ", 1)[0] + "." if ". " in text else text


def build_user_profiles(train: sp.csr_matrix, item_profiles: list[str | None],
                        max_items: int = MAX_ITEMS_IN_BUILT_PROFILE) -> list[str | None]:
    """A profile per user from the profiles of their *training* items only.

    The user's most-visited items come first (ties: lower item id). Users whose training
    items have no text get None: no text is invented.
    """
    profiles: list[str | None] = []
    for user in range(train.shape[0]):
        start, end = train.indptr[user], train.indptr[user + 1]
        items, counts = train.indices[start:end], train.data[start:end]
        order = np.lexsort((items, -counts))
        texts = [item_profiles[i] for i in items[order] if item_profiles[i] is not None]
        profiles.append("Visited: " + " | ".join(_first_sentence(t) for t in texts[:max_items])
                        if texts else None)
    return profiles


def write_profiles(path: Path, id_key: str, profiles: list[str | None],
                   sources: np.ndarray, keep: str = "built") -> int:
    """Write the profiles of one source kind as JSON lines (atomically); return how many."""
    kept = [(index, text) for index, (text, source) in enumerate(zip(profiles, sources))
            if source == keep and text is not None]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({id_key: i, "profile": text}) + "\n" for i, text in kept)
    return len(kept)


def open_dataset(name: str = "demo", root: str | Path = "dataset",
                 source: str | Path | None = None, url: str | None = None,
                 seed: int = 2023) -> Dataset:
    """The `Dataset` called `name` (registered name or folder), prepared on first use."""
    return load_dataset(prepare_dataset(name, root, source, url, seed), Path(name).name)


def prepare_dataset(name: str, root: str | Path = "dataset", source: str | Path | None = None,
                    url: str | None = None, seed: int = 2023) -> Path:
    """Return a ready data folder for `name`, filling `root/name` on first use.

    `name` may also be a path to a folder in a supported layout. Filling happens in a
    temporary folder that is renamed into place only after the data loads cleanly.
    """
    as_path = Path(name)
    if name not in REGISTRY and as_path.is_dir():
        detect_layout(as_path)  # a folder without its split files: say which are expected
        return as_path
    spec = REGISTRY.get(name)
    target = Path(root) / name
    if spec is not None and spec.layout == "generated" and seed != DEMO_SEED:
        target = Path(root) / f"{name}-seed{seed}"  # generated data follows --seed
    if target.is_dir() and _has_splits(target):
        return target
    if spec is None and source is None and url is None:
        known = ", ".join(sorted(REGISTRY))
        looks_like_path = "/" in name or name.startswith(".")
        raise DataError(f"{name}: no such folder" if looks_like_path else
                        f"unknown dataset '{name}': use one of {known}, a folder path, "
                        f"or --data-source DIR")
    with _preparation_lock(target):
        if target.is_dir() and _has_splits(target):  # another process prepared it meanwhile
            return target
        with atomic_path(target) as staged:
            staged.mkdir(parents=True)
            _fill(staged, spec, name, source, url, seed)
            dataset = load_dataset(staged, name)  # refuse to install data that does not load
            _write_built_profiles(staged, dataset)
    log(f"prepared dataset '{name}' in {target}")
    return target


@contextlib.contextmanager
def _preparation_lock(target: Path) -> Iterator[None]:
    """One process at a time prepares `target`; the holder first clears staging folders
    that a killed preparation left behind (named by `atomic_path`: .NAME.*.tmp)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for leftover in target.parent.glob(f".{target.name}.*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _has_splits(folder: Path) -> bool:
    return any(all((folder / f).exists() for f in files) for files in SPLIT_FILES.values())


def _fill(staged: Path, spec: DatasetSpec | None, name: str, source: str | Path | None,
          url: str | None, seed: int) -> None:
    if source is not None:
        _copy_source(Path(source), staged)
    elif spec is not None and spec.layout == "generated":
        make_demo_dataset(staged, seed=seed)
    elif (SHARED_DATASETS / name).is_dir():
        _copy_source(SHARED_DATASETS / name, staged)
    elif url or (spec is not None and spec.url):
        download_dataset(url or spec.url, spec.archive_dir if spec else name, staged)
    else:
        raise DataError(f"dataset '{name}': no local copy at {SHARED_DATASETS / name} and no "
                        f"download known; pass --data-source DIR")


def _copy_source(source: Path, staged: Path) -> None:
    if not source.is_dir():
        raise DataError(f"{source}: data source folder does not exist")
    detect_layout(source)  # raises naming the missing split files
    for file_name in sum(SPLIT_FILES.values(), ()) + OPTIONAL_FILES:
        if (source / file_name).exists():
            shutil.copy2(source / file_name, staged / file_name)
    log(f"copied data from {source}")


def download_dataset(url: str, archive_dir: str, staged: Path) -> None:
    """Download a zip archive and extract the files of folder `archive_dir` from it."""
    wanted = set(sum(SPLIT_FILES.values(), ()) + OPTIONAL_FILES)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "data.zip"
        log(f"downloading {url}")
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download",
                      disable=None) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        try:
            with zipfile.ZipFile(archive) as bundle:
                members = [m for m in bundle.namelist()
                           if Path(m).parent.name == archive_dir and Path(m).name in wanted]
                if not members:
                    raise DataError(f"{url}: the archive has no folder '{archive_dir}' with "
                                    f"interaction files")
                for member in members:
                    with bundle.open(member) as src, open(staged / Path(member).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile as error:
            raise DataError(f"{url}: not a zip archive ({error})") from error


def _write_built_profiles(folder: Path, dataset: Dataset) -> None:
    """Built profiles go beside the data, in the same format, for inspection or replacement."""
    users = write_profiles(folder / BUILT_USER_FILE, "user_id", dataset.user_profiles,
                           dataset.user_profile_source)
    items = write_profiles(folder / BUILT_ITEM_FILE, "item_id", dataset.item_profiles,
                           dataset.item_profile_source)
    log(f"built profiles written: {users} users ({BUILT_USER_FILE}), {items} items")


_CITIES = [("Tucson", "AZ"), ("Philadelphia", "PA"), ("Nashville", "TN"), ("Tampa", "FL")]
_CATEGORIES = ["Thai", "Mexican", "Italian", "Coffee & Tea", "Bakeries", "Sushi Bars", "Pizza",
               "Burgers", "Vegan", "Cocktail Bars", "Breakfast & Brunch", "Indian"]
_ADJECTIVES = ["Golden", "Little", "Blue", "Rustic", "Happy", "Urban", "Old Town", "Sunny",
               "Lucky", "Green", "Corner", "Royal"]
_NOUNS = ["Spoon", "Table", "Kitchen", "Garden", "House", "Oven", "Lantern", "Market", "Bowl",
          "Cellar", "Porch", "Grill"]
_ATTRIBUTES = ["outdoor seating", "takeout", "reservations", "free wifi", "happy hour",
               "live music"]


def make_demo_dataset(folder: Path, n_users: int = 600, n_items: int = 400,
                      seed: int = 2023) -> None:
    """Generate a small Yelp-like data set: businesses with metadata, users with tastes.

    Users prefer two categories and their home city; a third of them get a written profile
    that states those tastes, the rest are left to profiles built from their history.
    """
    rng = np.random.default_rng(seed)
    item_city = rng.integers(len(_CITIES), size=n_items)
    item_category = rng.integers(len(_CATEGORIES), size=n_items)
    popularity = rng.pareto(1.5, size=n_items) + 1.0
    with open(folder / "item_meta.json", "w", encoding="utf-8") as meta_file:
        for item in range(n_items):
            city, state = _CITIES[item_city[item]]
            attributes = {a: bool(rng.random() < 0.4) for a in _ATTRIBUTES}
            meta = {"item_id": item,
                    "name": f"{_ADJECTIVES[rng.integers(12)]} {_NOUNS[rng.integers(12)]}",
                    "categories": _CATEGORIES[item_category[item]], "city": city,
                    "state": state, "stars": float(rng.integers(5, 10)) / 2,
                    "attributes": attributes}
            meta_file.write(json.dumps(meta) + "\n")

    rows, written = [], []
    for user in range(n_users):
        home = rng.integers(len(_CITIES))
        tastes = rng.choice(len(_CATEGORIES), size=2, replace=False)
        affinity = np.where(np.isin(item_category, tastes), 6.0, 0.3)
        affinity *= np.where(item_city == home, 4.0, 0.25) * popularity
        n_visits = int(rng.integers(8, 25))
        items = rng.choice(n_items, size=n_visits, replace=False, p=affinity / affinity.sum())
        rows.extend((user, int(item)) for item in items)
        if rng.random() < 0.3:  # a repeat visit now and then: counts above one
            rows.append((user, int(items[0])))
        if rng.random() < 1 / 3:
            liked = " and ".join(_CATEGORIES[t] for t in tastes)
            written.append({"user_id": user, "profile": f"This user enjoys {liked} places in "
                            f"{_CITIES[home][0]}, {_CITIES[home][1]}."})
    _split_and_write(folder, np.array(rows), rng)
    with open(folder / "user_profile.json", "w", encoding="utf-8") as profile_file:
        profile_file.writelines(json.dumps(record) + "\n" for record in written)


def _split_and_write(folder: Path, rows: np.ndarray, rng: np.random.Generator) -> None:
    """Per user: 70% train, 15% validation, 15% test, at least one training pair."""
    split = np.empty(len(rows), dtype=object)
    for user in np.unique(rows[:, 0]):
        positions = rng.permutation(np.flatnonzero(rows[:, 0] == user))
        n_train = max(1, int(round(0.7 * len(positions))))
        n_val = (len(positions) - n_train) // 2
        split[positions[:n_train]] = "train"
        split[positions[n_train:n_train + n_val]] = "val"
        split[positions[n_train + n_val:]] = "test"
    for name, file_name in (("train", "train.csv"), ("val", "val.csv"), ("test", "test.csv")):
        pd.DataFrame(rows[split == name], columns=["user", "item"]).to_csv(
            folder / file_name, index=False)
