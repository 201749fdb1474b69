"""Versioned bundles: a bundle folder holds every version and a `current` pointer.

    B/store.json                 marks the folder as this tool's bundle store
    B/versions/v0001/ ...        one complete bundle per version (manifest: version, parent,
    B/versions/v0002/ ...        data cutoff, what changed)
    B/current -> versions/v0002  switched atomically (a new symlink renamed over the old)

A version is written under a staging name and renamed into place when complete, so a failed
or interrupted update leaves no version behind and `current` untouched. Readers resolve
`current` once and then read only that version's folder: the vectors and the index they use
always come from the same version."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

STORE_MARKER = "store.json"
CURRENT = "current"
VERSIONS = "versions"
VERSION_NAME = re.compile(r"^v(\d{4,})$")


class VersionError(ValueError):
    """A store, version or switch that cannot be done; the message says why."""


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / STORE_MARKER).is_file()


class BundleStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not is_store(self.root):
            raise VersionError(f"{self.root}: not a bundle store (no {STORE_MARKER})")

    @classmethod
    def initialise(cls, root: Path) -> BundleStore:
        (root / VERSIONS).mkdir(parents=True)
        (root / STORE_MARKER).write_text(json.dumps({"kind": "bundle-store", "format": 1}) + "\n")
        return cls(root)

    def versions(self) -> list[str]:
        folder = self.root / VERSIONS
        names = [p.name for p in folder.iterdir() if VERSION_NAME.match(p.name) and p.is_dir()]
        return sorted(names, key=lambda name: int(VERSION_NAME.match(name).group(1)))

    def current(self) -> str:
        try:
            target = os.readlink(self.root / CURRENT)
        except OSError:
            raise VersionError(f"{self.root}: no '{CURRENT}' version (the store holds "
                               f"{', '.join(self.versions()) or 'no versions'})") from None
        return Path(target).name

    def path(self, version: str) -> Path:
        path = self.root / VERSIONS / version
        if not VERSION_NAME.match(version) or not path.is_dir():
            raise VersionError(f"{self.root}: no version {version!r} (it holds "
                               f"{', '.join(self.versions())})")
        return path

    def manifest(self, version: str) -> dict:
        return json.loads((self.path(version) / "manifest.json").read_text())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time (updates, exports, switches)."""
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staged_version(self) -> Iterator[tuple[str, Path]]:
        """(name, folder to write it in): renamed to versions/NAME only if the block ends
        without an error; the caller holds `lock`."""
        numbers = [int(VERSION_NAME.match(v).group(1)) for v in self.versions()]
        version = f"v{max(numbers, default=0) + 1:04d}"
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp",
                                        dir=self.root / VERSIONS))
        try:
            yield version, staging / version
            os.replace(staging / version, self.root / VERSIONS / version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def switch(self, version: str) -> None:
        """Point `current` at `version` atomically."""
        self.path(version)
        link = self.root / f".{CURRENT}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.symlink(Path(VERSIONS) / version, link)
        os.replace(link, self.root / CURRENT)

    def rollback(self, to: str | None, verify) -> str:
        """Make `to` (default: the current version's parent) current, after `verify(folder)`
        passes; resolved and switched under the lock, so no update slips in between."""
        with self.lock():
            target = to or self.parent_of(self.current())
            if target is None:
                raise VersionError(f"version {self.current()} has no parent")
            verify(self.path(target))
            self.switch(target)
        return target

    def parent_of(self, version: str) -> str | None:
        return self.manifest(version).get("parent")

    def history(self) -> list[dict]:
        current = self.current() if (self.root / CURRENT).is_symlink() else None
        rows = []
        for version in self.versions():
            manifest = self.manifest(version)
            rows.append({"version": version, "current": version == current,
                         "parent": manifest.get("parent"), "created": manifest.get("created"),
                         "kind": manifest.get("changes", {}).get("kind"),
                         "users": manifest.get("users"), "items": manifest.get("items"),
                         "data_cutoff": manifest.get("data_cutoff"),
                         "changes": manifest.get("changes", {})})
        return rows
