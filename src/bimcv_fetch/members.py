"""The members an extraction deals with: which are wanted, and their content hash.

:func:`plan_members` picks the wanted regular files of an archive's listing (and
the folders holding them) for a :class:`~bimcv_fetch.mids.Selector`;
:class:`MemberHash` is the per-member content hash receipts record
(``"crc32:0a1b2c3d"`` or ``"sha1:…"``, see :mod:`bimcv_fetch.receipts`) and
``verify --tree`` checks (:func:`hash_file`).
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

from bimcv_fetch.manifest import Kind, Listing, Member
from bimcv_fetch.mids import Selector
from bimcv_fetch.stream import file_chunks

# Per-member content hash in receipts: CRC32 (isal: ~35 GB/s, zlib: ~7 GB/s) is free
# next to inflating; SHA1 (~2 GB/s here) added 18% CPU to a single-thread extraction.
# Receipts name the algorithm ("crc32:…"/"sha1:…"); both are understood.
HASH_ALGO = "crc32"
HASH_CHUNK = 1 << 20  # hash_file's read size (extraction's write buffer size)

try:  # isal's CRC32 is several times faster than zlib's
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover
    _crc32 = zlib.crc32


# ------------------------------------------------------------------ planning


def plan_members(listing: Listing, selector: Selector) -> list[Member]:
    """The wanted regular files, plus the listed folders holding them, in listing order."""
    wanted_files: set[str] = set()
    needed_dirs: set[str] = set()
    for m in listing.members:
        if m.kind is Kind.FILE and selector.wants(m.path):
            wanted_files.add(m.path)
            add_parents(m.path, needed_dirs)
    out: list[Member] = []
    seen: set[str] = set()
    for m in listing.members:
        p = m.path
        if p in seen:
            continue
        if (m.kind is Kind.FILE and p in wanted_files) or (m.kind is Kind.DIR and p in needed_dirs):
            out.append(m)
            seen.add(p)
    return out


def last_wanted_index(listing: Listing, selector: Selector) -> int:
    """Index in ``listing.members`` of the last wanted file; -1 when nothing is wanted."""
    for i in range(len(listing.members) - 1, -1, -1):
        m = listing.members[i]
        if m.kind is Kind.FILE and selector.wants(m.path):
            return i
    return -1


# ------------------------------------------------------------------ content hashes


class MemberHash:
    """Running content hash of one member: ``crc32`` (nearly free) or ``sha1``."""

    def __init__(self, algo: str | None = None) -> None:
        algo = algo or HASH_ALGO
        if algo not in ("crc32", "sha1"):
            raise ValueError(f"unknown member hash {algo!r}")
        self.algo = algo
        self._crc = 0
        self._sha = hashlib.sha1() if algo == "sha1" else None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._sha is not None:
            self._sha.update(data)
        else:
            self._crc = _crc32(data, self._crc)

    def text(self) -> str:
        if self._sha is not None:
            return f"sha1:{self._sha.hexdigest()}"
        return f"crc32:{self._crc & 0xFFFFFFFF:08x}"


def hash_file(path: Path, algo: str | None = None, *, chunk: int = HASH_CHUNK) -> str:
    """``"<algo>:<hex>"`` of a file's content, as receipts record it."""
    h = MemberHash(algo)
    for piece in file_chunks(path, chunk):
        h.update(piece)
    return h.text()


def add_parents(path: str, dirs: set[str]) -> None:
    """Add every folder above ``path`` (``a/b/c`` → ``a/b``, ``a``) to ``dirs``."""
    head = path
    while "/" in head:
        head = head.rpartition("/")[0]
        if head in dirs:
            return  # and so are all of its parents
        dirs.add(head)
