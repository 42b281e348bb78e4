"""The files of a share: which are visible, their ETags, SHA1s and content types.

A share is flat: only the regular files directly inside its folder are
visible (no subfolders, no dotfiles). ETags derive from name, size and mtime
unless a ``change_etag`` fault gave a file a new one; SHA1s (for
``OC-Checksum``) are computed once per file version and cached.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One visible file of the share, with the ``lstat`` it was found with."""

    name: str
    path: Path
    st: os.stat_result


def content_type(name: str) -> str:
    lower = name.lower()
    if lower.endswith((".tar.gz", ".gz")):
        return "application/gzip"
    if lower.endswith(".tgz"):
        return "application/x-compressed"
    if lower.endswith(".txt"):
        return "text/plain"
    if lower.endswith(".md"):
        return "text/markdown"
    if lower.endswith(".zip"):
        return "application/zip"
    return "application/octet-stream"


class ShareFiles:
    """The visible files of the folder ``root``; thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._etag_override: dict[str, str] = {}
        self._sha1_cache: dict[str, tuple[int, int, str]] = {}
        self._sha1_locks: dict[str, threading.Lock] = {}

    def entry(self, name: str) -> Entry | None:
        """The file ``name`` when it is visible, else None."""
        if (
            not name
            or name in (".", "..")
            or name.startswith(".")
            or "/" in name
            or "\\" in name
            or "\x00" in name
        ):
            return None
        path = self.root / name
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return Entry(name, path, st)

    def entries(self) -> list[Entry]:
        """The files of the share, sorted by name."""
        out = []
        try:
            with os.scandir(self.root) as it:
                names = sorted(e.name for e in it)
        except OSError:
            return []
        for name in names:
            entry = self.entry(name)
            if entry is not None:
                out.append(entry)
        return out

    def etag(self, entry: Entry) -> str:
        with self._lock:
            override = self._etag_override.get(entry.name)
        if override is not None:
            return override
        key = f"{entry.name}:{entry.st.st_size}:{entry.st.st_mtime_ns}"
        return '"' + hashlib.md5(key.encode()).hexdigest() + '"'

    def change_etag(self, entry: Entry) -> str:
        """Give ``entry`` a new ETag from now on; returns it."""
        old = self.etag(entry)
        new = '"' + hashlib.md5(f"{old}:changed".encode()).hexdigest() + '"'
        with self._lock:
            self._etag_override[entry.name] = new
        return new

    def folder_etag(self, entries: list[Entry]) -> str:
        h = hashlib.md5(b"folder")
        for e in entries:
            h.update(self.etag(e).encode())
        return '"' + h.hexdigest() + '"'

    def sha1_of(self, entry: Entry) -> str:
        """SHA1 of a file, computed once per (size, mtime) and cached."""
        with self._lock:
            lock = self._sha1_locks.setdefault(entry.name, threading.Lock())
        with lock:
            cached = self._sha1_cache.get(entry.name)
            sig = (entry.st.st_size, entry.st.st_mtime_ns)
            if cached is not None and cached[:2] == sig:
                return cached[2]
            h = hashlib.sha1()
            with open(entry.path, "rb") as f:
                while block := f.read(4 << 20):
                    h.update(block)
            digest = h.hexdigest()
            self._sha1_cache[entry.name] = (*sig, digest)
            return digest
