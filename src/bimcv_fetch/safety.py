"""Member-name and member-type checks, and a path resolver that never leaves its root.

These checks stand on their own: extraction does not rely on tarfile's
``filter=`` (Python 3.11's data filter had bypasses). Only regular files and
directories are ever extracted; links, devices, FIFOs and anything else make
the whole archive unsafe.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tarfile
from pathlib import Path

from bimcv_fetch.errors import UnsafeArchiveError
from bimcv_fetch.manifest import Kind, Listing, Member

_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_SAFE_KINDS = (Kind.FILE, Kind.DIR)


def normalize_name(name: str) -> str:
    """A tar member name as a relative path: no trailing ``/``, no leading ``./``."""
    p = name.rstrip("/")
    while p.startswith("./"):
        p = p[2:]
    return "" if p == "." else p


def is_root_name(name: str) -> bool:
    """``.`` or ``./``: the archive's own top directory (harmless as a directory)."""
    return name != "" and normalize_name(name) == "" and not name.startswith("/")


def check_member_name(name: str) -> str | None:
    """Why extracting a member called ``name`` would be unsafe, or None if it is fine."""
    if not name:
        return "empty name"
    if "\x00" in name:
        return "NUL byte in name"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "control character in name"
    if "\\" in name:
        return "backslash in name"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE_RE.match(name):
        return "drive letter in name"
    rel = normalize_name(name)
    if not rel:
        return "names the destination itself"
    parts = rel.split("/")
    if ".." in parts:
        return "'..' component"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' component"
    return None


def check_kind(member: Member) -> str | None:
    """Why a member's type is not extractable (only files and directories are)."""
    if member.kind in _SAFE_KINDS:
        return None
    if member.kind is Kind.SYMLINK:
        return f"symbolic link to {member.link!r}" if member.link else "symbolic link"
    if member.kind is Kind.HARDLINK:
        return f"hard link to {member.link!r}" if member.link else "hard link"
    if member.kind in (Kind.CHAR, Kind.BLOCK):
        return f"{member.kind.value} device node"
    if member.kind is Kind.FIFO:
        return "FIFO"
    return f"unsupported member type {member.mode[:1]!r}"


def check_listing(listing: Listing) -> list[tuple[Member, str]]:
    """Every member of ``listing`` that is unsafe, with the reason; empty when all are fine."""
    out: list[tuple[Member, str]] = []
    for m in listing.members:
        if m.kind is Kind.DIR and is_root_name(m.name):
            continue
        reason = check_member_name(m.name) or check_kind(m)
        if reason:
            out.append((m, reason))
    return out


def raise_for_listing(listing: Listing, *, archive: str = "") -> None:
    """Raise UnsafeArchiveError naming the first unsafe member of ``listing`` (if any)."""
    bad = check_listing(listing)
    if bad:
        member, reason = bad[0]
        where = archive or listing.source
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UnsafeArchiveError(
            f"{where}: unsafe member {member.name!r}: {reason}{more}",
            hint="nothing was extracted from this archive",
        )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(root: Path, relpath: str) -> Path:
    """The real path ``root/relpath`` will be written at, refusing anything outside ``root``.

    The name is checked first (:func:`check_member_name`); then the existing
    parents are resolved, so a symlinked directory already on disk that points
    out of ``root`` is caught. ``root`` itself may be a symlink. The last
    component is not followed: writers replace it (``os.replace`` replaces a
    symlink itself, never its target). Raises :class:`UnsafeArchiveError`.
    """
    reason = check_member_name(relpath)
    if reason:
        raise UnsafeArchiveError(f"unsafe member {relpath!r}: {reason}")
    real_root = os.path.realpath(root)
    rel = normalize_name(relpath)
    head, _, leaf = rel.rpartition("/")
    parent = os.path.realpath(os.path.join(real_root, head)) if head else real_root
    if not _inside(parent, real_root):
        raise UnsafeArchiveError(
            f"unsafe member {relpath!r}: its folder leads out of {root} (a symbolic link on disk)"
        )
    return Path(parent) / leaf


class SafeTree:
    """Creates member folders under ``root`` without following any symlink.

    Each folder component is checked with ``lstat`` (and created when missing);
    a symlink or a non-directory in the way raises :class:`UnsafeArchiveError`:
    we never write through a link, even one that stays inside ``root``.
    ``root`` itself may be a symlink (it is resolved once). Folders already
    checked are remembered, so a long extraction pays one ``lstat`` per folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self._checked: set[str] = set()
        self._root_made = False

    def forget(self) -> None:
        self._checked.clear()

    def checked_dirs(self) -> list[str]:
        """Folders (relative to the root) checked or created so far."""
        return sorted(self._checked)

    def parent_for(self, relpath: str) -> Path:
        """The real folder member ``relpath`` goes in, created if needed."""
        reason = check_member_name(relpath)
        if reason:
            raise UnsafeArchiveError(f"unsafe member {relpath!r}: {reason}")
        rel = normalize_name(relpath)
        head = rel.rpartition("/")[0]
        if not self._root_made:
            os.makedirs(self.real_root, exist_ok=True)
            self._root_made = True
        if not head:
            return Path(self.real_root)
        if head not in self._checked:
            self._make(head, relpath)
        return Path(self.real_root, head)

    def _make(self, head: str, relpath: str) -> None:
        done = ""
        for part in head.split("/"):
            done = f"{done}/{part}" if done else part
            if done in self._checked:
                continue
            current = os.path.join(self.real_root, done)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(current)
                st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchiveError(
                    f"unsafe member {relpath!r}: {current} is a symbolic link on disk",
                    hint="remove the link, or extract somewhere else",
                )
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeArchiveError(
                    f"unsafe member {relpath!r}: {current} exists and is not a folder"
                )
            self._checked.add(done)


def make_parents(root: Path, relpath: str) -> Path:
    """Create the folders of ``relpath`` under ``root`` (see :class:`SafeTree`)."""
    return SafeTree(root).parent_for(relpath)


def member_type_problem(ti: tarfile.TarInfo) -> str | None:
    """Why a tar member's type cannot be extracted safely; None for files and folders."""
    if ti.issparse():
        return "sparse file"
    if ti.isreg() or ti.isdir():
        return None
    if ti.issym():
        return f"symbolic link to {ti.linkname!r}"
    if ti.islnk():
        return f"hard link to {ti.linkname!r}"
    if ti.ischr() or ti.isblk():
        return "device node"
    if ti.isfifo():
        return "FIFO"
    return f"unsupported member type {ti.type!r}"
