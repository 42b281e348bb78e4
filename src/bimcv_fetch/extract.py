"""Safe streaming extraction of the wanted members of an archive into the MIDS tree.

One pass over the gzip'd tar (``tarfile`` in stream mode), writing only the
members a :class:`~bimcv_fetch.mids.Selector` wants, each to a temporary name
beside its final path and renamed when complete; reading stops after the last
wanted member. Every member is checked against the archive's listing and the
safety rules (:mod:`bimcv_fetch.safety`) before a byte of it is written.

A receipt (``.bimcv-fetch/receipts/NAME.json``) records what was written::

    {"version": 1, "archive": NAME, "sha1": ARCHIVE_SHA1, "tree": "/dest",
     "complete": true,
     "subset": "all" | "CT" | "CR,DX",    # modalities covered (union)
     "subsets": "all" | ["CR", "DX"],
     "subjects": null | ["S03044", ...],  # null: every subject
     "selections": [{"subset": ..., "subjects": ..., "iterations": ...}],
     "members": {"covid19_posi/...png": {"size": 123, "hash": "crc32:0a1b2c3d",
                                         "mtime": 1600691640}}}

It is rewritten every few seconds while extracting (``complete: false``) and a
last time with ``complete: true``. Entries are only added after their file was
renamed into place, so a rerun can skip them (when the file on disk still has
the recorded size and mtime) - it still streams through their bytes.

``download --extract`` uses :class:`StreamingExtractor`: the same extraction
fed by the bytes of the transfer, committed only after the SHA1 check.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bimcv_fetch import gz
from bimcv_fetch.catalog import Release
from bimcv_fetch.errors import (
    BimcvError,
    ConfigError,
    CorruptArchiveError,
    ExitCode,
    Interrupted,
    UnsafeArchiveError,
)
from bimcv_fetch.events import Event, Reporter, ThreadSafeReporter, null_reporter
from bimcv_fetch.manifest import Kind, Listing, Member, listing_names, parse_listing
from bimcv_fetch.mids import MODALITIES, Selector, subset_label
from bimcv_fetch.safety import (
    SafeTree,
    check_member_name,
    is_root_name,
    normalize_name,
    raise_for_listing,
)
from bimcv_fetch.store import (
    FileLock,
    Layout,
    atomic_write_json,
    clear_verified,
    disk_error,
    read_json,
)

RECEIPT_VERSION = 1
TMP_SUFFIX = ".bimcv-tmp"
# Copying a member: read from tarfile in 64 KiB pieces, write through a 1 MiB buffer
# (1 MiB write calls). Measured on a 307 MB archive: 16 KiB reads and writes (tarfile's
# default) cost 7% more CPU; 1 MiB reads were as fast at best but up to 45% slower in
# some runs (each read makes fresh 1 MiB bytes objects through tarfile's layers:
# malloc's mmap threshold and page faults), so the smaller read size is kept.
READ_CHUNK = 1 << 16
COPY_CHUNK = 1 << 20
TAR_BUFSIZE = 1 << 16  # tarfile stream-mode read size (its default is 10 KiB)
RECEIPT_INTERVAL = 2.0  # seconds between incremental receipt writes (at least)
# Per-member content hash in receipts: CRC32 (isal: ~35 GB/s, zlib: ~7 GB/s) is free
# next to inflating; SHA1 (~2 GB/s here) added 18% CPU to a single-thread extraction.
# Receipts name the algorithm ("crc32:…"/"sha1:…"); both are understood.
HASH_ALGO = "crc32"

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)

try:  # isal's CRC32 is several times faster than zlib's
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover
    _crc32 = zlib.crc32


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


def hash_file(path: Path, algo: str | None = None, *, chunk: int = COPY_CHUNK) -> str:
    """``"<algo>:<hex>"`` of a file's content, as receipts record it."""
    h = MemberHash(algo)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.text()


# ------------------------------------------------------------------ planning


def plan_members(listing: Listing, selector: Selector) -> list[Member]:
    """The wanted regular files, plus the listed folders holding them, in listing order."""
    wanted_files: set[str] = set()
    needed_dirs: set[str] = set()
    for m in listing.members:
        if m.kind is Kind.FILE and selector.wants(m.path):
            wanted_files.add(m.path)
            head = m.path
            while "/" in head:
                head = head.rpartition("/")[0]
                if head in needed_dirs:
                    break
                needed_dirs.add(head)
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


# ------------------------------------------------------------------ receipts


@dataclass
class MemberRecord:
    size: int
    hash: str
    mtime: int
    unverified: bool = False  # written from bytes whose archive SHA1 is not checked yet

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"size": self.size, "hash": self.hash, "mtime": self.mtime}
        if self.unverified:
            d["unverified"] = True
        return d

    @classmethod
    def from_json(cls, raw: Any) -> MemberRecord:
        return cls(
            int(raw["size"]), str(raw["hash"]), int(raw["mtime"]), bool(raw.get("unverified"))
        )


def _fs(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


@dataclass(frozen=True)
class Selection:
    """What part of an archive an extraction covered (None: no restriction)."""

    subset: frozenset[str] | None = None
    subjects: frozenset[str] | None = None
    iterations: frozenset[int] | None = None

    @classmethod
    def of(cls, selector: Selector) -> Selection:
        subset = selector.subset
        if subset is not None and set(MODALITIES) <= subset:
            subset = None
        iterations: frozenset[int] | None = None
        if (
            selector.release is not None
            and selector.iterations is not None
            and set(selector.release.iterations) != set(selector.iterations)
        ):
            iterations = frozenset(selector.iterations)
        return cls(subset, selector.subjects, iterations)

    def covers(self, other: Selection) -> bool:
        def sub(mine: frozenset[Any] | None, theirs: frozenset[Any] | None) -> bool:
            return mine is None or (theirs is not None and theirs <= mine)

        return (
            sub(self.subset, other.subset)
            and sub(self.subjects, other.subjects)
            and sub(self.iterations, other.iterations)
        )

    def merged(self, other: Selection) -> Selection | None:
        """One selection equal to the union of both, when there is one."""
        if self.covers(other):
            return self
        if other.covers(self):
            return other
        if self.subjects == other.subjects and self.iterations == other.iterations:
            assert self.subset is not None and other.subset is not None
            union = self.subset | other.subset
            return Selection(
                None if set(MODALITIES) <= union else union, self.subjects, self.iterations
            )
        if self.subset == other.subset and self.iterations == other.iterations:
            assert self.subjects is not None and other.subjects is not None
            return Selection(self.subset, self.subjects | other.subjects, self.iterations)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "subset": None if self.subset is None else sorted(self.subset),
            "subjects": None if self.subjects is None else sorted(self.subjects),
            "iterations": None if self.iterations is None else sorted(self.iterations),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Selection:
        its = raw.get("iterations")
        return cls(
            _fs(raw.get("subset")),
            _fs(raw.get("subjects")),
            None if its is None else frozenset(int(i) for i in its),
        )


def add_selection(selections: list[Selection], new: Selection) -> list[Selection]:
    """The union of ``selections`` and ``new``, merged where a single selection says it."""
    pending = [new]
    out = list(selections)
    while pending:
        cur = pending.pop()
        for i, old in enumerate(out):
            m = old.merged(cur)
            if m is not None:
                del out[i]
                pending.append(m)
                break
        else:
            out.append(cur)
    return out


@dataclass
class Receipt:
    """What extraction wrote from one archive (see the module docstring for the JSON)."""

    archive: str
    sha1: str
    tree: str
    members: dict[str, MemberRecord] = field(default_factory=dict)
    selections: list[Selection] = field(default_factory=list)
    complete: bool = False
    # statistics of the last run (not saved)
    written: int = 0
    skipped: int = 0
    bytes_written: int = 0

    @property
    def subsets(self) -> frozenset[str] | None:
        """Union of the modalities covered (None: all)."""
        if not self.selections:
            return frozenset()
        out: set[str] = set()
        for s in self.selections:
            if s.subset is None:
                return None
            out |= s.subset
        return None if set(MODALITIES) <= out else frozenset(out)

    @property
    def subjects(self) -> frozenset[str] | None:
        out: set[str] = set()
        for s in self.selections:
            if s.subjects is None:
                return None
            out |= s.subjects
        return frozenset(out) if self.selections else frozenset()

    def covers(self, selector: Selector) -> bool:
        want = Selection.of(selector)
        return any(s.covers(want) for s in self.selections)

    def to_json(self) -> dict[str, Any]:
        subsets = self.subsets
        subjects = self.subjects
        return {
            "version": RECEIPT_VERSION,
            "archive": self.archive,
            "sha1": self.sha1,
            "tree": self.tree,
            "complete": self.complete,
            "subset": subset_label(subsets) if subsets is None or subsets else "",
            "subsets": "all" if subsets is None else [m for m in MODALITIES if m in subsets],
            "subjects": None if subjects is None else sorted(subjects),
            "selections": [s.to_json() for s in self.selections],
            "members": {p: r.to_json() for p, r in sorted(self.members.items())},
        }

    @classmethod
    def from_json(cls, raw: Any) -> Receipt | None:
        """A receipt from its JSON, or None when it is not one we can trust."""
        if not isinstance(raw, dict) or raw.get("version") != RECEIPT_VERSION:
            return None
        try:
            return cls(
                archive=str(raw["archive"]),
                sha1=str(raw["sha1"]),
                tree=str(raw["tree"]),
                members={str(p): MemberRecord.from_json(r) for p, r in raw["members"].items()},
                selections=[Selection.from_json(s) for s in raw.get("selections") or []],
                complete=bool(raw.get("complete")),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def save(self, layout: Layout) -> None:
        atomic_write_json(layout.receipt(self.archive), self.to_json())


def load_receipt(layout: Layout, name: str) -> Receipt | None:
    """The receipt of archive ``name``, or None when missing or unreadable."""
    return Receipt.from_json(read_json(layout.receipt(name)))


def receipt_covers(
    layout: Layout,
    name: str,
    selector: Selector,
    *,
    listing: Listing | None = None,
    sha1: str | None = None,
) -> bool:
    """True when a complete receipt shows ``selector``'s members of ``name`` were extracted.

    With ``listing`` the answer is exact (every wanted file has a verified
    entry); without it, one recorded selection must include ``selector``'s.
    ``sha1`` (the published archive SHA1), when given, must match the receipt's.
    Files on disk are not checked (``verify --tree`` does that).
    """
    r = load_receipt(layout, name)
    if r is None or not r.complete or r.tree != tree_id(layout):
        return False
    if sha1 is not None and r.sha1 != sha1:
        return False
    if listing is None:
        return r.covers(selector)
    for m in plan_members(listing, selector):
        if m.kind is Kind.FILE:
            rec = r.members.get(m.path)
            if rec is None or rec.unverified:
                return False
    return True


def tree_id(layout: Layout) -> str:
    """How receipts name the tree they describe: its absolute path."""
    return os.path.abspath(layout.tree)


def temp_path(final: Path) -> Path:
    """Where a member is written before it is renamed to ``final``."""
    name = f".{final.name}{TMP_SUFFIX}"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        name = f".{hashlib.sha1(final.name.encode('utf-8', 'surrogateescape')).hexdigest()}"
        name += TMP_SUFFIX
    return final.with_name(name)


# ------------------------------------------------------------------ the extraction


class StaleFilesError(CorruptArchiveError):
    """Files extracted earlier from unverified bytes differ from this archive's.

    Their receipt entries are dropped; extracting again (from the verified
    archive) rewrites them.
    """


class _Stopped(BaseException):
    """Raised inside a streaming parser thread to unwind it (reset/abort/discard)."""


def _unsafe_type(ti: tarfile.TarInfo) -> str:
    if ti.issym():
        return f"symbolic link to {ti.linkname!r}"
    if ti.islnk():
        return f"hard link to {ti.linkname!r}"
    if ti.ischr() or ti.isblk():
        return "device node"
    if ti.isfifo():
        return "FIFO"
    if ti.issparse():
        return "sparse file"
    return f"unsupported member type {ti.type!r}"


class _Extraction:
    """The member loop shared by :func:`extract_archive` and :class:`StreamingExtractor`."""

    def __init__(
        self,
        layout: Layout,
        name: str,
        listing: Listing,
        *,
        archive_sha1: str,
        selector: Selector,
        reporter: Reporter,
        cancel: threading.Event | None,
        unverified: bool,
        receipt: Receipt | None = None,
    ) -> None:
        raise_for_listing(listing, archive=name)
        self.layout = layout
        self.name = name
        self.listing = listing
        self.selector = selector
        self.reporter = reporter
        self.cancel = cancel
        self.unverified = unverified
        self.plan = plan_members(listing, selector)
        self.wanted = {m.path: m for m in self.plan if m.kind is Kind.FILE}
        self.remaining = set(self.wanted)
        self.by_path = listing.by_path()
        self.planned_bytes = sum(m.size for m in self.wanted.values())
        self.tree = SafeTree(layout.tree)
        self.touched: set[str] = set()  # paths written or confirmed from this byte stream
        self.stale: list[str] = []
        self.current_tmp: Path | None = None
        if receipt is None:
            receipt = load_receipt(layout, name)
            if receipt is None or receipt.sha1 != archive_sha1 or receipt.tree != tree_id(layout):
                receipt = Receipt(name, archive_sha1, tree_id(layout))
        receipt.written = receipt.skipped = receipt.bytes_written = 0
        self.receipt = receipt
        self._saved_at = time.monotonic()
        self._save_cost = 0.0
        self._dirty = False
        self._unreported = 0

    # -- receipt

    def save(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (
            not self._dirty or now - self._saved_at < max(RECEIPT_INTERVAL, 20 * self._save_cost)
        ):
            return
        self.receipt.save(self.layout)
        self._saved_at = time.monotonic()
        self._save_cost = self._saved_at - now
        self._dirty = False

    def on_disk(self, path: str, rec: MemberRecord) -> bool:
        """The final file exists as a regular file with the recorded size and mtime."""
        try:
            st = os.lstat(os.path.join(self.tree.real_root, path))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == rec.size and int(st.st_mtime) == rec.mtime

    def all_done(self) -> bool:
        """Every wanted member has a trusted entry and its file on disk: no need to read."""
        for path in self.wanted:
            rec = self.receipt.members.get(path)
            if rec is None or rec.unverified:
                return False
            if not self.on_disk(path, rec):
                return False
        return True

    # -- the member loop

    def run(self, stream: BinaryIO) -> None:
        """Read the tar stream until every wanted member has been seen."""
        self.reporter(
            Event(
                "start",
                self.name,
                total=self.planned_bytes,
                done=0,
                data={"stage": "extract", "files": len(self.wanted)},
            )
        )
        if not self.remaining:
            return
        self.receipt.complete = False
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BUFSIZE) as tar:
                seen = getattr(tar, "members", None)  # stream mode keeps every TarInfo
                while self.remaining:
                    if self.cancel is not None and self.cancel.is_set():
                        raise Interrupted(f"{self.name}: extraction interrupted")
                    ti = tar.next()
                    if ti is None:
                        break
                    if isinstance(seen, list):
                        seen.clear()
                    self._member(tar, ti)
                    self.save()
                self.advance(0, flush=True)
        except tarfile.TarError as exc:
            raise CorruptArchiveError(f"{self.name}: broken tar stream ({exc})") from exc
        finally:
            self.drop_tmp()
        if self.remaining:
            first = sorted(self.remaining)[0]
            raise CorruptArchiveError(
                f"{self.name}: the archive ended before {len(self.remaining)} listed member(s), "
                f"e.g. {first!r}"
            )
        if self.stale:
            for p in self.stale:
                self.receipt.members.pop(p, None)
            self._dirty = True
            raise StaleFilesError(
                f"{self.name}: {len(self.stale)} extracted file(s) differ from this archive's "
                f"bytes, e.g. {self.stale[0]!r}",
                hint="run the extraction again to rewrite them",
            )

    def advance(self, n: int, *, flush: bool = False) -> None:
        """Report progress in steps of at least 1 MiB (events cost more than bytes)."""
        self._unreported += n
        if self._unreported >= COPY_CHUNK or (flush and self._unreported):
            self.reporter(Event("advance", self.name, done=self._unreported))
            self._unreported = 0

    def drop_tmp(self) -> None:
        if self.current_tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.current_tmp)
            self.current_tmp = None

    def _member(self, tar: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        name = ti.name
        if ti.isdir() and is_root_name(name):
            return
        reason = check_member_name(name)
        if reason is None and (ti.issparse() or not (ti.type in _FILE_TYPES or ti.isdir())):
            reason = _unsafe_type(ti)
        if reason is not None:
            raise UnsafeArchiveError(
                f"{self.name}: unsafe member {name!r}: {reason}",
                hint="nothing of it was written",
            )
        path = normalize_name(name)
        listed = self.by_path.get(path)
        if listed is None:
            raise CorruptArchiveError(f"{self.name}: member {name!r} is not in the listing")
        is_file = ti.type in _FILE_TYPES
        if (listed.kind is Kind.FILE) != is_file or (listed.kind is Kind.DIR) != ti.isdir():
            raise CorruptArchiveError(
                f"{self.name}: member {name!r} is a {'file' if is_file else 'folder'} "
                f"but the listing says {listed.kind.value}"
            )
        if is_file and listed.size != ti.size:
            raise CorruptArchiveError(
                f"{self.name}: member {name!r} has {ti.size} bytes, the listing says {listed.size}"
            )
        if not is_file or path not in self.wanted:
            return
        self.remaining.discard(path)
        rec = self.receipt.members.get(path)
        if rec is not None and self.on_disk(path, rec):
            if not rec.unverified:
                self.receipt.skipped += 1
                self.advance(ti.size)
                return
            if self._confirm(tar, ti, rec):
                self.touched.add(path)
                if not self.unverified:
                    rec.unverified = False
                    self._dirty = True
                self.receipt.skipped += 1
                return
            self.stale.append(path)
            return
        self._write(tar, ti, path)

    def _read_chunks(self, tar: tarfile.TarFile, ti: tarfile.TarInfo) -> Iterable[bytes]:
        src = tar.extractfile(ti)
        assert src is not None
        left = ti.size
        while left > 0:
            if self.cancel is not None and self.cancel.is_set():
                raise Interrupted(f"{self.name}: extraction interrupted")
            chunk = src.read(min(READ_CHUNK, left))
            if not chunk:
                raise CorruptArchiveError(f"{self.name}: archive ends inside {ti.name!r}")
            left -= len(chunk)
            yield chunk

    def _confirm(self, tar: tarfile.TarFile, ti: tarfile.TarInfo, rec: MemberRecord) -> bool:
        """Hash a member's bytes without writing them; True when they match the record."""
        algo = rec.hash.partition(":")[0]
        h = MemberHash(algo if algo in ("crc32", "sha1") else HASH_ALGO)
        for chunk in self._read_chunks(tar, ti):
            h.update(chunk)
            self.advance(len(chunk))
        return h.text() == rec.hash

    def _write(self, tar: tarfile.TarFile, ti: tarfile.TarInfo, path: str) -> None:
        parent = self.tree.parent_for(path)
        final = parent / path.rpartition("/")[2]
        tmp = temp_path(final)
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise disk_error(final, exc) from exc
        else:
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeArchiveError(
                    f"{self.name}: cannot write {path!r}: a folder of that name is in the way"
                )
        h = MemberHash()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666
            )
        except OSError as exc:
            raise disk_error(tmp, exc) from exc
        self.current_tmp = tmp
        try:
            with open(fd, "wb", buffering=COPY_CHUNK, closefd=True) as out:
                for chunk in self._read_chunks(tar, ti):
                    h.update(chunk)
                    out.write(chunk)
                    self.advance(len(chunk))
                out.flush()
                mtime = int(ti.mtime)
                os.utime(out.fileno(), (mtime, mtime))
            os.replace(tmp, final)
        except OSError as exc:
            self.drop_tmp()
            raise disk_error(final, exc) from exc
        except BaseException:
            self.drop_tmp()
            raise
        self.current_tmp = None
        self.receipt.members[path] = MemberRecord(ti.size, h.text(), int(ti.mtime), self.unverified)
        self.touched.add(path)
        self.receipt.written += 1
        self.receipt.bytes_written += ti.size
        self._dirty = True

    # -- completion

    def complete(self, archive_sha1: str) -> Receipt:
        """Mark the receipt complete for this selection and write it (written last)."""
        r = self.receipt
        r.sha1 = archive_sha1
        for p in self.touched:
            rec = r.members.get(p)
            if rec is not None:
                rec.unverified = False
        r.selections = add_selection(r.selections, Selection.of(self.selector))
        r.complete = True
        self.save(force=True)
        self.clean_temps()
        return r

    def clean_temps(self) -> None:
        """Remove temporary files left by a killed run in the folders this run used."""
        for d in self.tree.checked_dirs():
            try:
                entries = list(os.scandir(os.path.join(self.tree.real_root, d)))
            except OSError:
                continue
            for e in entries:
                if (
                    e.name.startswith(".")
                    and e.name.endswith(TMP_SUFFIX)
                    and (e.is_file(follow_symlinks=False) or e.is_symlink())
                ):
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)

    def finish_event(self, status: str = "ok") -> None:
        r = self.receipt
        self.reporter(
            Event(
                "finish",
                self.name,
                data={
                    "status": status,
                    "stage": "extract",
                    "sha1": r.sha1,
                    "written": r.written,
                    "skipped": r.skipped,
                    "bytes": r.bytes_written,
                },
            )
        )


def _fail_event(reporter: Reporter, name: str, exc: BaseException) -> None:
    if isinstance(exc, BimcvError):
        code = exc.exit_code
    elif isinstance(exc, KeyboardInterrupt):
        code = ExitCode.INTERRUPTED
    else:
        code = ExitCode.UNEXPECTED
    reporter(
        Event("fail", name, data={"error": str(exc), "exit_code": int(code), "stage": "extract"})
    )


def _extract_lock(layout: Layout, name: str) -> FileLock:
    return FileLock(layout.lock(name + ".extract"), command="extract")


def extract_archive(
    archive_path: Path,
    listing: Listing,
    layout: Layout,
    *,
    name: str,
    archive_sha1: str,
    selector: Selector,
    reporter: Reporter | None = None,
    delete_archive: bool = False,
    cancel: threading.Event | None = None,
    backend: str | None = None,
    lock: bool = True,
) -> Receipt:
    """Extract the members of ``archive_path`` that ``selector`` wants into ``layout.tree``.

    ``archive_sha1`` is the archive's (already verified) SHA1, recorded in the
    receipt. Returns the receipt, complete. The archive is not opened when
    nothing in ``listing`` is wanted or when the receipt and the files on disk
    already hold every wanted member. With ``delete_archive`` the archive and
    its verified stamp are removed once the complete receipt is written.

    Raises UnsafeArchiveError (unsafe name or type, in the listing or the
    archive; nothing is written for such a member and nothing ever outside
    ``layout.tree``), CorruptArchiveError (broken gzip/tar stream, member not
    listed or differing from the listing, member missing), DiskError,
    LockedError (another extraction of this archive runs), Interrupted (when
    ``cancel`` is set).
    """
    report = reporter or null_reporter
    lk = _extract_lock(layout, name) if lock else None
    try:
        if lk is not None:
            lk.acquire()
        try:
            ex = _Extraction(
                layout,
                name,
                listing,
                archive_sha1=archive_sha1,
                selector=selector,
                reporter=report,
                cancel=cancel,
                unverified=False,
            )
            if ex.wanted and not ex.all_done():
                try:
                    fh = open(archive_path, "rb", buffering=0)  # noqa: SIM115
                except OSError as exc:
                    raise disk_error(archive_path, exc) from exc
                try:
                    with fh, gz.open_gzip_stream(fh, name=name, backend=backend) as stream:
                        ex.run(stream)
                except BaseException:
                    with contextlib.suppress(BimcvError):
                        ex.save(force=True)
                    raise
            else:
                ex.reporter(
                    Event(
                        "start",
                        name,
                        total=ex.planned_bytes,
                        done=ex.planned_bytes,
                        data={"stage": "extract", "files": len(ex.wanted)},
                    )
                )
                ex.receipt.skipped = len(ex.wanted)
            receipt = ex.complete(archive_sha1)
            if delete_archive:
                try:
                    os.unlink(archive_path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise disk_error(archive_path, exc) from exc
                clear_verified(layout, name)
            ex.finish_event()
            return receipt
        finally:
            if lk is not None:
                lk.release()
    except OSError as exc:
        err = disk_error(layout.tree, exc)
        _fail_event(report, name, err)
        raise err from exc
    except BaseException as exc:
        _fail_event(report, name, exc)
        raise


# ------------------------------------------------------------------ many archives


@dataclass(frozen=True)
class ExtractJob:
    name: str
    archive: Path
    listing: Listing
    sha1: str


@dataclass
class ExtractResult:
    name: str
    receipt: Receipt | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def exit_code(self) -> int:
        if self.error is None:
            return 0
        if isinstance(self.error, BimcvError):
            return int(self.error.exit_code)
        return int(ExitCode.UNEXPECTED)


def extract_many(
    jobs: Sequence[ExtractJob],
    jobs_n: int,
    layout: Layout,
    *,
    selector: Selector,
    reporter: Reporter | None = None,
    delete_archives: bool = False,
    cancel: threading.Event | None = None,
    backend: str | None = None,
) -> list[ExtractResult]:
    """Extract several archives in ``jobs_n`` threads; one result per job, in job order.

    A failing archive does not stop the others (see ``ExtractResult.exit_code``
    and :func:`bimcv_fetch.errors.worst`). Ctrl-C sets ``cancel``, waits for the
    workers to stop at their next member and raises Interrupted.
    """
    report: Reporter = ThreadSafeReporter(reporter) if reporter else null_reporter
    stop = cancel or threading.Event()
    results = [ExtractResult(j.name) for j in jobs]

    def one(i: int) -> None:
        j = jobs[i]
        if stop.is_set():
            results[i].error = Interrupted(f"{j.name}: not extracted (interrupted)")
            return
        try:
            results[i].receipt = extract_archive(
                j.archive,
                j.listing,
                layout,
                name=j.name,
                archive_sha1=j.sha1,
                selector=selector,
                reporter=report,
                delete_archive=delete_archives,
                cancel=stop,
                backend=backend,
            )
        except Exception as exc:
            results[i].error = exc

    with ThreadPoolExecutor(max_workers=max(1, jobs_n), thread_name_prefix="extract") as pool:
        pending: set[Future[None]] = {pool.submit(one, i) for i in range(len(jobs))}
        try:
            while pending:
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            stop.set()
            for f in pending:
                f.cancel()
            wait(pending)
            raise Interrupted("extraction interrupted") from None
    return results


# ------------------------------------------------------------------ streaming (download --extract)


class _ByteQueue:
    """A bounded FIFO of byte chunks between the transfer thread and the parser thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[bytes | None] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.closed = False  # the consumer is gone: puts are dropped

    def put(self, item: bytes | None, *, alive: Callable[[], bool]) -> None:
        with self._cond:
            while self._items and self._bytes >= self.limit and not self.closed:
                self._cond.wait(0.1)
                if not alive():
                    return
            if self.closed:
                return
            self._items.append(item)
            self._bytes += len(item) if item else 0
            self._cond.notify_all()

    def get(self) -> bytes | None:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._bytes -= len(item) if item else 0
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Drop everything queued; later puts are ignored."""
        with self._cond:
            self.closed = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()

    def interrupt(self) -> None:
        """Make the consumer's next get() return the stop marker at once."""
        with self._cond:
            self._items.clear()
            self._bytes = 0
            self._items.append(_STOP)
            self._cond.notify_all()


_STOP = b"\x00stop"  # identity-compared marker


class _QueueReader:
    """The parser thread's file object: compressed chunks in, decompressed bytes out."""

    def __init__(self, q: _ByteQueue, name: str, backend: str | None) -> None:
        self._q = q
        self._dec = gz.GzipDecoder(name=name, backend=backend)
        self._pieces: Iterator[bytes] = iter(())
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _next_piece(self) -> bool:
        while True:
            for piece in self._pieces:
                self._buf, self._pos = piece, 0
                return True
            if self._eof:
                return False
            item = self._q.get()
            if item is _STOP:
                raise _Stopped()
            if item is None:
                self._dec.finish()
                self._eof = True
                return False
            self._pieces = iter(self._dec.decompress(item))

    def read(self, size: int = -1) -> bytes:
        if self._pos >= len(self._buf) and not self._next_piece():
            return b""
        if size < 0:
            size = len(self._buf) - self._pos
        out = self._buf[self._pos : self._pos + size]
        self._pos += len(out)
        return out


class StreamingExtractor:
    """Extract an archive from its bytes as they are downloaded (``download --extract``).

    Implements :class:`bimcv_fetch.stream.Consumer`. The transfer calls
    ``feed()`` with every byte in order (``reset()`` when it restarts from
    byte 0) and ``finish()`` after the last one; then the caller checks the
    archive SHA1 and calls ``commit(sha1)`` (complete receipt, returns it) or
    ``discard()`` (removes what this archive's unverified bytes produced).
    ``abort()`` stops for now, keeping finished files and the receipt (a later
    run skips them once it sees the same bytes again).

    Parsing, decompression and writing run in one background thread fed
    through a bounded queue (``queue_bytes``), so memory stays flat. Errors of
    the archive itself (unsafe, corrupt) never escape ``feed()`` or
    ``finish()``: later bytes are dropped and ``commit()`` raises the error.
    """

    def __init__(
        self,
        layout: Layout,
        name: str,
        listing: Listing,
        *,
        archive_sha1: str,
        selector: Selector,
        reporter: Reporter | None = None,
        queue_bytes: int = 16 << 20,
        backend: str | None = None,
        lock: bool = True,
    ) -> None:
        self.layout = layout
        self.name = name
        self.listing = listing
        self.selector = selector
        self.reporter = reporter or null_reporter
        self.backend = backend
        self.queue_bytes = queue_bytes
        self._lock = _extract_lock(layout, name) if lock else None
        self._ex = _Extraction(
            layout,
            name,
            listing,
            archive_sha1=archive_sha1,
            selector=selector,
            reporter=self.reporter,
            cancel=None,
            unverified=True,
        )
        self._thread: threading.Thread | None = None
        self._queue: _ByteQueue | None = None
        self._error: BaseException | None = None
        self._finished = False
        self._closed = False
        if self._lock is not None and self._ex.wanted:
            self._lock.acquire()

    # -- state

    @property
    def wanted(self) -> bool:
        """False when nothing of this archive is wanted (every byte is then ignored)."""
        return bool(self._ex.wanted)

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def receipt(self) -> Receipt:
        return self._ex.receipt

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start(self) -> None:
        self._queue = _ByteQueue(self.queue_bytes)
        reader = _QueueReader(self._queue, self.name, self.backend)
        ex = self._ex
        q = self._queue

        def work() -> None:
            try:
                ex.run(reader)  # type: ignore[arg-type]
            except _Stopped:
                pass
            except BaseException as exc:  # handed to commit()
                self._error = (
                    exc if not isinstance(exc, OSError) else disk_error(self.layout.tree, exc)
                )
            finally:
                ex.drop_tmp()
                q.close()
                with contextlib.suppress(BimcvError):
                    ex.save(force=True)

        self._thread = threading.Thread(target=work, name=f"extract-{self.name}", daemon=True)
        self._thread.start()

    def _stop_thread(self, *, drain: bool = False) -> None:
        if self._thread is not None:
            assert self._queue is not None
            if drain:
                self._queue.put(_STOP, alive=self._alive)
            else:
                self._queue.interrupt()
            self._thread.join()
        self._thread = None
        self._queue = None

    # -- Consumer protocol

    def reset(self) -> None:
        """The byte stream restarts from 0: drop the parser state, keep finished files."""
        self._stop_thread()
        self._error = None
        self._finished = False
        receipt = self._ex.receipt
        self._ex = _Extraction(
            self.layout,
            self.name,
            self.listing,
            archive_sha1=receipt.sha1,
            selector=self.selector,
            reporter=self.reporter,
            cancel=None,
            unverified=True,
            receipt=receipt,
        )

    def feed(self, data: bytes | memoryview) -> None:
        if not self._ex.wanted or self._error is not None or self._closed:
            return
        if self._thread is None:
            if self._finished:
                return
            self._start()
        assert self._queue is not None
        if self._queue.closed:
            return  # the parser is done (early stop) or failed
        self._queue.put(bytes(data), alive=self._alive)

    def finish(self) -> None:
        """All bytes were fed: wait for the parser to finish (errors wait for commit())."""
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None, alive=self._alive)
            self._thread.join()
            self._thread = None
        elif self._ex.wanted and not self._finished and self._error is None:
            self._error = CorruptArchiveError(f"{self.name}: no bytes were received")
        self._finished = True

    def abort(self) -> None:
        """Stop for now: finish the bytes already fed, then release the thread and lock.

        Finished files and the receipt stay; a later run skips them once it is
        fed the same bytes again.
        """
        self._stop_thread(drain=True)
        self._close()

    # -- after the SHA1 check

    def commit(self, sha1: str) -> Receipt:
        """The archive's SHA1 was verified: write the complete receipt and return it.

        Raises the archive's UnsafeArchiveError/CorruptArchiveError (or a
        DiskError) met while extracting, and CorruptArchiveError when finish()
        was not reached.
        """
        try:
            if self._error is not None:
                raise self._error
            if not self._finished:
                raise CorruptArchiveError(f"{self.name}: commit() before finish()")
            receipt = self._ex.complete(sha1)
            self._ex.finish_event()
            return receipt
        finally:
            self._close()

    def discard(self) -> None:
        """The SHA1 was wrong: remove every file these (unverified) bytes produced."""
        self._stop_thread()
        r = self._ex.receipt
        for path, rec in list(r.members.items()):
            if rec.unverified:
                final = Path(self._ex.tree.real_root, path)
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(final)
                    if stat.S_ISREG(st.st_mode):
                        os.unlink(final)
                del r.members[path]
        r.complete = False
        try:
            if r.members:
                r.save(self.layout)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.layout.receipt(self.name))
        finally:
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._lock is not None:
                self._lock.release()


# ------------------------------------------------------------------ download --extract hook


def cached_listing(layout: Layout, name: str) -> Listing | None:
    """The listing of archive ``name`` from ``layout.manifests`` (as the index caches it)."""
    for lname in listing_names(name):
        path = layout.manifest(lname)
        try:
            data = path.read_bytes()
        except OSError:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        return parse_listing(text, lname)
    return None


class DownloadExtractHook:
    """One archive's extraction inside ``download --extract`` (see download.ExtractHook).

    ``consumer`` (created on first use) extracts while the bytes land;
    ``commit(sha1)``/``discard()`` follow the SHA1 check; ``extract_local()``
    extracts an archive already on disk and verified. Counts returned are
    files written.
    """

    def __init__(
        self,
        layout: Layout,
        name: str,
        sha1: str | None,
        listing: Listing,
        selector: Selector,
        *,
        reporter: Reporter | None = None,
        delete_archive: bool = False,
    ) -> None:
        self.layout = layout
        self.name = name
        self.sha1 = sha1
        self.listing = listing
        self.selector = selector
        self.reporter = reporter
        self.delete_archive = delete_archive
        self._streaming: StreamingExtractor | None = None

    @property
    def consumer(self) -> StreamingExtractor:
        if self._streaming is None:
            # No progress events here: the transfer already reports this archive's bytes.
            self._streaming = StreamingExtractor(
                self.layout,
                self.name,
                self.listing,
                archive_sha1=self.sha1 or "",
                selector=self.selector,
            )
        return self._streaming

    def commit(self, sha1: str) -> int:
        if self._streaming is None:
            return self.extract_local()
        try:
            receipt = self._streaming.commit(sha1)
        except StaleFilesError:
            # The bytes were fine (SHA1 checked) but files from an earlier, different
            # stream were in the way: redo it from the verified archive on disk.
            self.sha1 = sha1
            return self.extract_local()
        if self.delete_archive:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layout.archive(self.name))
            clear_verified(self.layout, self.name)
        return receipt.written

    def discard(self) -> None:
        if self._streaming is not None:
            self._streaming.discard()

    def abort(self) -> None:
        """Stop for now keeping what was extracted (an interrupted transfer resumes later)."""
        if self._streaming is not None:
            self._streaming.abort()

    def extract_local(self) -> int:
        receipt = extract_archive(
            self.layout.archive(self.name),
            self.listing,
            self.layout,
            name=self.name,
            archive_sha1=self.sha1 or "",
            selector=self.selector,
            reporter=self.reporter,
            delete_archive=self.delete_archive,
        )
        return receipt.written


def extract_hook_factory(
    layout: Layout,
    release: Release | None,
    selector: Selector,
    *,
    listings: Mapping[str, Listing] | None = None,
    reporter: Reporter | None = None,
    delete_archives: bool = False,
) -> Callable[[str, str | None], Any]:
    """What ``download --extract`` calls per archive: ``factory(name, sha1) -> hook``.

    The hooks are :class:`DownloadExtractHook` objects (typed ``Any`` here because
    ``download.ExtractHook`` is a nominal class that this core module does not import).

    Listings come from ``listings`` or the manifest cache in ``layout``; a
    missing one raises ConfigError (nothing is extracted without its listing).
    ``release`` is accepted for the selector's iteration filter (already in
    ``selector``) and not otherwise needed.
    """
    del release

    def factory(name: str, sha1: str | None) -> DownloadExtractHook:
        listing = listings.get(name) if listings is not None else None
        if listing is None:
            listing = cached_listing(layout, name)
        if listing is None:
            raise ConfigError(
                f"{name}: no tar -tvf listing cached in {layout.manifests}",
                hint="run the command again online so the listings are fetched",
            )
        return DownloadExtractHook(
            layout, name, sha1, listing, selector, reporter=reporter, delete_archive=delete_archives
        )

    return factory
