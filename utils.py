"""Small shared helpers: seeding, devices, atomic file writes, hashing, memory, timing,
and the process group of data-parallel training (rank, collectives, gradient averaging)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def set_seed(seed: int) -> None:
    """Seed every random source the pipeline uses, so two runs give the same metrics."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Torch's deterministic kernels while training: with several CPU threads, some
    accumulating kernels (index_put with accumulate, sparse products' backward) otherwise sum
    in a thread-dependent order, and a rerun with the same seed drifts apart (GraphSAGE
    moved 0.001 Recall@20 on yelp-text). Ops without a deterministic kernel only warn."""
    import torch

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def pick_device(name: str = "auto") -> str:
    """'auto' means CUDA when torch sees a GPU, else CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but torch sees no CUDA device")
    return name


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def timed() -> Iterator[dict]:
    """`with timed() as t: ...` then t['seconds']."""
    holder: dict = {}
    start = time.perf_counter()
    try:
        yield holder
    finally:
        holder["seconds"] = time.perf_counter() - start


class OutputExists(FileExistsError):
    """An output folder that is in the way: not ours, or ours without permission to replace."""


def check_output_folder(target: Path, own_marker: str | None, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder this tool did not write (recognised by
    `own_marker`, a file its outputs always hold), or one of its own without `overwrite`."""
    if not target.exists() or target.is_symlink() or not target.is_dir():
        return
    if not any(target.iterdir()):
        return
    if own_marker is None or not (target / own_marker).is_file():
        raise OutputExists(f"{target}: folder exists and was not written by this tool; it is "
                           "left untouched (choose another output folder)")
    if not overwrite:
        raise OutputExists(f"{target}: holds an earlier output of this tool; pass --overwrite "
                           "to replace it")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, own_marker: str | None = None,
                overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only on success.

    Works for a file or a directory: whatever the caller creates at the yielded path
    replaces `target` atomically, and nothing half-written is left behind on error. An
    existing non-empty folder at `target` is replaced only if it is this tool's own output
    (holds `own_marker`) and `overwrite` is set; it is checked before any work is done.
    """
    target = Path(target)
    check_output_folder(target, own_marker, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        with _terminate_as_exit():
            yield staged
            if target.is_dir() and not target.is_symlink():
                check_output_folder(target, own_marker, overwrite)  # it may have appeared since
            with _termination_held():  # never between the renames: old and new both lost
                if target.is_dir() and not target.is_symlink():
                    os.replace(target, tmp / "replaced")  # removed with tmp below
                os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """While staging: SIGTERM raises SystemExit (exit status 143, not -15), so the `finally`
    above removes the staging folder; the default action would end the process on the spot.
    The exit waits for the main thread to return from native code (a faiss build); a second
    SIGTERM ends it at once. Only in the main thread, and only where nobody else handles
    SIGTERM (a server, Ray)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _termination_held() -> Iterator[None]:
    """SIGTERM waits until the block is done (then acts as it would have)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_of(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def log(message: str) -> None:
    """Progress messages go to stderr so stdout stays the result table."""
    print(message, file=sys.stderr, flush=True)


def pair_values(matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """matrix[rows[k], cols[k]] for every k, as a 1-d array (also when there are none)."""
    if len(rows) == 0:
        return np.zeros(0, dtype=matrix.dtype)
    return np.asarray(matrix[rows, cols]).ravel()


def rows_contain(matrix, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Boolean array shaped like `items`: is items[r, c] a non-zero entry of matrix row rows[r]?

    `matrix` is a scipy CSR matrix; negative item ids (padding) are never contained. Works
    on the CSR arrays directly (one sorted key per stored entry of the asked rows): scipy's
    fancy indexing costs ~0.1 ms per call, which a served request pays once per channel.
    """
    rows, items = np.asarray(rows, dtype=np.int64), np.asarray(items)
    starts, ends = matrix.indptr[rows].astype(np.int64), matrix.indptr[rows + 1].astype(np.int64)
    lengths = ends - starts
    offsets = np.cumsum(lengths) - lengths
    entries = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)
    stored = matrix.data[entries] != 0
    n_cols = np.int64(matrix.shape[1])
    keys = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)[stored] * n_cols \
        + matrix.indices[entries][stored]
    keys.sort()
    asked = np.arange(len(rows), dtype=np.int64).reshape(-1, *[1] * (items.ndim - 1)) * n_cols \
        + np.maximum(items, 0)
    if len(keys) == 0:
        return np.zeros(items.shape, dtype=bool)
    found = keys[np.minimum(np.searchsorted(keys, asked), len(keys) - 1)] == asked
    return found & (items >= 0) & (items < n_cols)


def code_version() -> str:
    """The git commit of this code, or "unknown" outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------- process groups


def data_parallel() -> tuple[int, int]:
    """(rank, world size) of the process group this process belongs to; (0, 1) without one."""
    import torch
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collective_scalar(value: float):
    import torch
    on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL moves CUDA tensors only
    return torch.tensor([value], dtype=torch.float64, device="cuda" if on_gpu else "cpu")


def rank0_value(value: float) -> float:
    """Rank 0's `value` on every rank (itself without a process group)."""
    if data_parallel()[1] == 1:
        return value
    import torch
    shared = _collective_scalar(value)
    torch.distributed.broadcast(shared, src=0)
    return float(shared)


def mean_over_ranks(value: float) -> float:
    """The mean of `value` over the ranks (itself without a process group)."""
    _, world = data_parallel()
    if world == 1:
        return value
    import torch
    total = _collective_scalar(value)
    torch.distributed.all_reduce(total)
    return float(total) / world


def average_gradients(parameters) -> None:
    """DistributedDataParallel's step after backward: every gradient averaged over the ranks
    (no-op alone). A missing gradient counts as zero on its rank (a rank without rows); one
    missing on every rank stays missing, so the optimiser skips it as one process would."""
    _, world = data_parallel()
    if world == 1:
        return
    import torch
    trainable = [p for p in parameters if p.requires_grad]
    if not trainable:
        return
    has = torch.tensor([p.grad is not None for p in trainable], dtype=torch.float32,
                       device=trainable[0].device)
    torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
    for parameter, anywhere in zip(trainable, has.tolist()):
        if not anywhere:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        torch.distributed.all_reduce(parameter.grad)
        parameter.grad /= world
