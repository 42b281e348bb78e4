"""Parsers for the share's manifests: ``*.tar-tvf.txt`` listings and ``sha1sums*.txt``.

Both are plain functions from text to typed records. Bad input raises
:class:`~bimcv_fetch.errors.ManifestError` naming the file and the line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from bimcv_fetch.errors import ManifestError


class Kind(str, Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    OTHER = "other"


_KIND_BY_CHAR = {
    "-": Kind.FILE,
    "d": Kind.DIR,
    "l": Kind.SYMLINK,
    "h": Kind.HARDLINK,
    "c": Kind.CHAR,
    "b": Kind.BLOCK,
    "p": Kind.FIFO,
}

# GNU tar -tvf: MODE OWNER/GROUP SIZE DATE TIME NAME. The mode is ten
# characters (type + rwx triplets, GNU may add nothing else). Devices show
# "major,minor" in the size column.
_LISTING_RE = re.compile(
    r"(?P<mode>[-a-zA-Z?][-rwxsStTlL]{9})[.+@]?\s+"
    r"(?P<owner>\S+)\s+"
    r"(?P<size>\S+)\s+"
    r"(?P<date>\d{4}-\d{2}-\d{2})\s+"
    r"(?P<time>\d{1,2}:\d{2}(?::\d{2})?)\s"
    r"(?P<name>.+)"
)


@dataclass(frozen=True, slots=True)
class Member:
    """One line of a ``tar -tvf`` listing."""

    name: str  # the exact tar member name as listed (directories may end in "/")
    kind: Kind
    size: int
    mode: str
    link: str | None = None

    @property
    def path(self) -> str:
        """The member name without a trailing slash or a leading ``./``."""
        p = self.name.rstrip("/")
        while p.startswith("./"):
            p = p[2:]
        return p


@dataclass(frozen=True)
class Listing:
    source: str
    members: tuple[Member, ...]

    @property
    def files(self) -> list[Member]:
        return [m for m in self.members if m.kind is Kind.FILE]

    @property
    def unpacked_size(self) -> int:
        return sum(m.size for m in self.members if m.kind is Kind.FILE)

    def by_path(self) -> dict[str, Member]:
        return {m.path: m for m in self.members}


def _lines(text: str) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if line.strip():
            yield number, line


def parse_listing(text: str, source: str = "<listing>") -> Listing:
    """Parse the saved output of GNU ``tar -tvf``."""
    members: list[Member] = []
    match = _LISTING_RE.fullmatch
    for number, line in _lines(text):
        m = match(line)
        if m is None:
            raise ManifestError(source, number, f"not a tar -tvf line: {line[:80]!r}")
        mode, size_text, name = m.group("mode"), m.group("size"), m.group("name")
        kind = _KIND_BY_CHAR.get(mode[0], Kind.OTHER)
        link: str | None = None
        if kind is Kind.SYMLINK and " -> " in name:
            name, link = name.split(" -> ", 1)
        elif " link to " in name and kind in (Kind.HARDLINK, Kind.FILE):
            # GNU tar shows hard links with a '-' or 'h' type and "link to".
            name, link = name.split(" link to ", 1)
            kind = Kind.HARDLINK
        if kind in (Kind.CHAR, Kind.BLOCK) and "," in size_text:
            size = 0
        elif size_text.isdigit():
            size = int(size_text)
        else:
            raise ManifestError(source, number, f"size {size_text!r} is not a number")
        members.append(Member(name, kind, size, mode, link))
    if not members:
        raise ManifestError(source, None, "empty listing")
    return Listing(source, tuple(members))


# ---------------------------------------------------------------- sha1sums

_HEX40 = re.compile(r"[0-9a-fA-F]{40}")
_GNU_RE = re.compile(r"(?P<hash>\S+) [ *](?P<name>.+)")
_BSD_RE = re.compile(r"SHA1 ?\((?P<name>.+)\) ?= ?(?P<hash>\S+)")


@dataclass(frozen=True)
class Checksum:
    name: str
    sha1: str
    source: str
    line: int


@dataclass
class Checksums:
    """Published SHA1 of every file in the share, merged from one or more files."""

    entries: dict[str, Checksum] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        c = self.entries.get(name)
        return c.sha1 if c else None

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def add(self, item: Checksum) -> None:
        old = self.entries.get(item.name)
        if old is not None and old.sha1 != item.sha1:
            raise ManifestError(
                item.source,
                item.line,
                f"{item.name!r} has two different SHA1s: {item.sha1} here and "
                f"{old.sha1} in {old.source}:{old.line}",
            )
        if old is None:
            self.entries[item.name] = item

    def merge(self, other: Checksums) -> None:
        for item in other.entries.values():
            self.add(item)


def _clean_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _unescape(name: str) -> str:
    return name.replace("\\n", "\n").replace("\\r", "\r").replace("\\\\", "\\")


def parse_sha1sums(text: str, source: str = "<sha1sums>") -> Checksums:
    """Parse ``HASH  name``, ``HASH *name`` and ``SHA1 (name) = HASH`` lines."""
    out = Checksums()
    for number, line in _lines(text):
        if line.lstrip().startswith("#"):
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        m = _BSD_RE.fullmatch(body) or _GNU_RE.fullmatch(body)
        if m is None:
            raise ManifestError(source, number, f"not a checksum line: {line[:80]!r}")
        digest = m.group("hash")
        if not _HEX40.fullmatch(digest):
            raise ManifestError(source, number, f"{digest[:60]!r} is not a 40-digit SHA1")
        name = m.group("name")
        if escaped:
            name = _unescape(name)
        out.add(Checksum(_clean_name(name), digest.lower(), source, number))
    if not out.entries:
        raise ManifestError(source, None, "no checksums in file")
    return out


def merge_checksums(files: Iterable[Checksums]) -> Checksums:
    merged = Checksums()
    for c in files:
        merged.merge(c)
    return merged


# ---------------------------------------------------------------- names

LISTING_SUFFIX = ".tar-tvf.txt"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def archive_stem(archive: str) -> str:
    for suffix in _ARCHIVE_SUFFIXES:
        if archive.endswith(suffix):
            return archive[: -len(suffix)]
    return archive


def listing_names(archive: str) -> list[str]:
    """Names a listing of ``archive`` may have on the share, preferred first."""
    names = [archive + LISTING_SUFFIX]
    stem = archive_stem(archive)
    if stem != archive:
        names.append(stem + LISTING_SUFFIX)
    return names


def is_archive_name(name: str) -> bool:
    return name.endswith((".tar.gz", ".tgz")) and "/" not in name
