"""Checks without the network: archive SHA1s, archive members vs listing, extracted tree.

* :func:`verify_archives` - SHA1 of each archive on disk against the published
  one (parallel, 1 MiB reads), writing the verified stamp on a match;
* :func:`deep_check` - read a whole archive: gzip intact, tar parses, every
  member as listed (name, type, size), nothing unlisted, nothing unsafe;
* :func:`audit_tree` - the extracted tree against listings and receipts:
  missing files, wrong sizes, extra files, and (``hash=True``) contents
  against the per-member hash the receipt recorded.

Problems are plain dataclasses (``dataclasses.asdict`` gives JSON).
"""

from __future__ import annotations

import os
import stat
import tarfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bimcv_fetch import gz
from bimcv_fetch.errors import CorruptArchiveError, ExitCode, Interrupted
from bimcv_fetch.events import Event, Reporter, ThreadSafeReporter, null_reporter
from bimcv_fetch.extract import (
    TMP_SUFFIX,
    Receipt,
    hash_file,
    load_receipt,
    plan_members,
    tree_id,
)
from bimcv_fetch.manifest import Checksums, Kind, Listing
from bimcv_fetch.members import add_parents
from bimcv_fetch.mids import Selector
from bimcv_fetch.safety import (
    check_listing,
    check_member_name,
    is_root_name,
    member_type_problem,
    normalize_name,
)
from bimcv_fetch.store import (
    Layout,
    clear_verified,
    disk_error,
    is_verified,
    write_verified,
)
from bimcv_fetch.stream import CHUNK, sha1_file
from bimcv_fetch.tarstream import TarStream

# ------------------------------------------------------------------ archive SHA1


@dataclass(frozen=True)
class ArchiveCheck:
    """The SHA1 check of one archive.

    ``status``: ``ok`` (matches; ``cached`` when a verified stamp proved it
    without rehashing), ``mismatch`` (``expected``/``actual`` differ),
    ``missing`` (no file), ``partial`` (only a ``.part`` file), ``unknown`` (no
    published SHA1), ``error`` (the file could not be read: ``detail``).
    """

    name: str
    status: str
    expected: str | None = None
    actual: str | None = None
    size: int | None = None
    cached: bool = False
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def exit_code(self) -> int:
        """5 for a mismatch, 7 for a read error, 3 without a published SHA1, else 0."""
        return {
            "mismatch": int(ExitCode.CHECKSUM),
            "error": int(ExitCode.DISK),
            "unknown": int(ExitCode.CONFIG),
        }.get(self.status, 0)


def verify_archives(
    layout: Layout,
    checksums: Checksums,
    names: Sequence[str],
    *,
    jobs: int = 2,
    reporter: Reporter | None = None,
    force: bool = False,
    cancel: threading.Event | None = None,
) -> list[ArchiveCheck]:
    """SHA1 of every archive in ``names`` present under ``layout.archives``; one check per name.

    Archives already proven by their verified stamp (same size and mtime) are
    not rehashed unless ``force``. A match writes the stamp; a mismatch
    removes it. Missing and partial archives are reported, not hashed.
    Raises Interrupted when ``cancel`` is set (or on Ctrl-C).
    """
    report: Reporter = ThreadSafeReporter(reporter) if reporter else null_reporter
    stop = cancel or threading.Event()

    def one(name: str) -> ArchiveCheck:
        expected = checksums.get(name)
        path = layout.archive(name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            status = "partial" if layout.part(name).exists() else "missing"
            report(Event("finish", name, data={"status": status, "stage": "verify"}))
            return ArchiveCheck(name, status, expected)
        except OSError as exc:
            return ArchiveCheck(name, "error", expected, detail=str(disk_error(path, exc)))
        if expected is None:
            report(Event("finish", name, data={"status": "unknown", "stage": "verify"}))
            return ArchiveCheck(name, "unknown", size=size)
        if not force and is_verified(layout, name, expected):
            report(
                Event(
                    "finish",
                    name,
                    data={"status": "skipped", "sha1": expected, "stage": "verify", "cached": True},
                )
            )
            return ArchiveCheck(name, "ok", expected, expected, size, cached=True)
        if stop.is_set():
            raise Interrupted("verification interrupted")
        report(Event("start", name, total=size, data={"stage": "verify", "verb": "verify"}))

        def progress(n: int) -> None:
            if stop.is_set():
                raise Interrupted("verification interrupted")
            report(Event("advance", name, done=n))

        try:
            actual = sha1_file(str(path), chunk=CHUNK, progress=progress)
        except OSError as exc:
            err = disk_error(path, exc)
            report(Event("fail", name, data={"error": str(err), "exit_code": int(err.exit_code)}))
            return ArchiveCheck(name, "error", expected, size=size, detail=str(err))
        if actual == expected:
            write_verified(layout, name, actual)
            report(Event("finish", name, data={"status": "ok", "sha1": actual, "stage": "verify"}))
            return ArchiveCheck(name, "ok", expected, actual, size)
        clear_verified(layout, name)
        report(
            Event(
                "fail",
                name,
                data={
                    "error": f"{name}: SHA1 mismatch: expected {expected}, got {actual}",
                    "exit_code": int(ExitCode.CHECKSUM),
                    "stage": "verify",
                },
            )
        )
        return ArchiveCheck(name, "mismatch", expected, actual, size)

    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="verify") as pool:
        futures = [pool.submit(one, n) for n in names]
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            stop.set()
            for f in futures:
                f.cancel()
            raise Interrupted("verification interrupted") from None


# ------------------------------------------------------------------ problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an archive or the extracted tree.

    ``kind``: missing, size, extra, hash, unverified (extracted from bytes whose
    archive SHA1 was never checked), unsafe, corrupt. ``where``:
    ``archive`` (found by :func:`deep_check`) or ``tree`` (:func:`audit_tree`).
    """

    kind: str
    path: str
    archive: str
    detail: str = ""
    where: str = "tree"

    @property
    def exit_code(self) -> int:
        """6 (unsafe or corrupt archive) for archive problems, 5 for tree differences."""
        if self.kind in ("unsafe", "corrupt") or self.where == "archive":
            return int(ExitCode.UNSAFE)
        return int(ExitCode.CHECKSUM)


def problems_exit_code(problems: Iterable[Problem]) -> int:
    return max((p.exit_code for p in problems), default=0)


# ------------------------------------------------------------------ deep check


def _kind_of(ti: tarfile.TarInfo) -> Kind:
    if ti.isreg():
        return Kind.FILE
    if ti.isdir():
        return Kind.DIR
    if ti.issym():
        return Kind.SYMLINK
    if ti.islnk():
        return Kind.HARDLINK
    if ti.ischr():
        return Kind.CHAR
    if ti.isblk():
        return Kind.BLOCK
    if ti.isfifo():
        return Kind.FIFO
    return Kind.OTHER


def deep_check(
    archive_path: Path,
    listing: Listing,
    *,
    name: str | None = None,
    reporter: Reporter | None = None,
    backend: str | None = None,
    cancel: threading.Event | None = None,
) -> list[Problem]:
    """Read the whole archive and compare it with its listing; [] when all is well.

    Problems (``where="archive"``): ``unsafe`` (a name or type extraction
    would refuse, in the archive or the listing), ``corrupt`` (broken gzip or
    tar stream: reading stops there), ``missing`` (listed, not in the
    archive), ``extra`` (in the archive, not listed), ``size`` (size or type
    differs from the listing). Nothing is written anywhere.
    """
    arch = name or archive_path.name
    report = reporter or null_reporter
    problems: list[Problem] = []

    def add(kind: str, path: str, detail: str) -> None:
        problems.append(Problem(kind, path, arch, detail, where="archive"))

    for bad_member, why in check_listing(listing):
        add("unsafe", bad_member.name, f"listing: {why}")
    listed = listing.by_path()
    seen: set[str] = set()
    try:
        total = archive_path.stat().st_size
        fh = open(archive_path, "rb", buffering=0)  # noqa: SIM115
    except OSError as exc:
        raise disk_error(archive_path, exc) from exc
    report(Event("start", arch, total=total, data={"stage": "deep-check", "verb": "check"}))
    last = 0
    try:
        with fh, gz.open_gzip_stream(fh, name=arch, backend=backend) as stream:
            tar = TarStream(stream, name=arch)
            while True:
                if cancel is not None and cancel.is_set():
                    raise Interrupted(f"{arch}: check interrupted")
                ti = tar.next()
                if ti is None:
                    break
                pos = fh.tell()
                if pos - last >= CHUNK:
                    report(Event("advance", arch, done=pos - last))
                    last = pos
                if ti.isdir() and is_root_name(ti.name):
                    continue
                reason = check_member_name(ti.name) or member_type_problem(ti)
                if reason:
                    add("unsafe", ti.name, reason)
                path = normalize_name(ti.name)
                seen.add(path)
                m = listed.get(path)
                if m is None:
                    add("extra", ti.name, "in the archive but not in the listing")
                    continue
                kind = _kind_of(ti)
                if m.kind is not kind:
                    add("size", ti.name, f"a {kind.value} in the archive, listed as {m.kind.value}")
                elif kind is Kind.FILE and m.size != ti.size:
                    add("size", ti.name, f"{ti.size} bytes in the archive, {m.size} listed")
            # The tar ends at its end-of-archive block; drain the rest so the gzip
            # trailer (CRC32, length) of every member is checked too.
            tar.drain()
    except CorruptArchiveError as exc:
        add("corrupt", "", str(exc))
    except OSError as exc:
        raise disk_error(archive_path, exc) from exc
    report(Event("advance", arch, done=max(0, total - last)))
    if not any(p.kind == "corrupt" for p in problems):
        for m in listing.members:
            p = m.path
            if p and p not in seen:
                add("missing", m.name, "listed but not in the archive")
    status = "ok" if not problems else "failed"
    report(
        Event(
            "finish",
            arch,
            data={"status": status, "stage": "deep-check", "problems": len(problems)},
        )
    )
    return problems


# ------------------------------------------------------------------ tree audit


def _top_folders(listings: Mapping[str, Listing]) -> set[str]:
    """First components of the member paths that sit inside a folder (``covid19_posi``)."""
    tops: set[str] = set()
    for listing in listings.values():
        for m in listing.members:
            head, sep, _ = m.path.partition("/")
            if sep and check_member_name(m.name) is None:
                tops.add(head)
    return tops


def audit_tree(
    layout: Layout,
    listings: Mapping[str, Listing],
    selector: Selector,
    *,
    hash: bool = False,
    only_extracted: bool = False,
    extras: bool = True,
    jobs: int = 2,
    reporter: Reporter | None = None,
) -> list[Problem]:
    """Compare ``layout.tree`` with the listings (no network, no archive needed).

    For each archive in ``listings`` the files expected are those ``selector``
    wants plus those its receipt records (with ``only_extracted``, archives
    without a receipt are left out). Each must exist as a regular file with
    the listed size (``missing``, ``size``; a symlink in its place is
    ``unsafe``); with ``hash`` its content is compared to the receipt's
    per-member hash (``hash``). With ``extras``, every file under the listings'
    top folders that no listing names is reported as ``extra`` - including
    leftover ``*.bimcv-tmp`` files of an interrupted extraction (the next
    extraction of that folder removes them). Pass every listing of the
    release, or files of the other archives show up as extra.
    """
    report: Reporter = ThreadSafeReporter(reporter) if reporter else null_reporter
    root = Path(os.path.realpath(layout.tree))
    problems: list[Problem] = []
    to_hash: list[tuple[str, str, Path, str]] = []  # archive, path, file, recorded hash
    for arch in sorted(listings):
        listing = listings[arch]
        receipt: Receipt | None = load_receipt(layout, arch)
        if receipt is not None and receipt.tree != tree_id(layout):
            receipt = None
        if only_extracted and receipt is None:
            continue
        by_path = listing.by_path()
        expected = {m.path for m in plan_members(listing, selector) if m.kind is Kind.FILE}
        if receipt is not None:
            expected |= {p for p in receipt.members if p in by_path}
        for path in sorted(expected):
            m = by_path[path]
            if check_member_name(m.name) is not None or m.kind is not Kind.FILE:
                problems.append(Problem("unsafe", path, arch, "unsafe name or type in listing"))
                continue
            full = root / path
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                problems.append(Problem("missing", path, arch, "not in the tree"))
                continue
            except OSError as exc:
                problems.append(Problem("missing", path, arch, f"cannot stat: {exc}"))
                continue
            if stat.S_ISLNK(st.st_mode):
                problems.append(Problem("unsafe", path, arch, "a symbolic link in the tree"))
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(Problem("size", path, arch, "not a regular file"))
                continue
            if st.st_size != m.size:
                problems.append(
                    Problem("size", path, arch, f"{st.st_size} bytes on disk, {m.size} listed")
                )
                continue
            rec = receipt.members.get(path) if receipt is not None else None
            if rec is not None and rec.unverified:
                # Written by download --extract from bytes whose archive SHA1 was never
                # checked (the transfer stopped first): not proof of anything.
                problems.append(
                    Problem(
                        "unverified",
                        path,
                        arch,
                        "extracted from bytes whose archive SHA1 was never checked; "
                        "rerun download --extract to finish",
                    )
                )
                continue
            if hash and rec is not None:
                to_hash.append((arch, path, full, rec.hash))
    if hash and to_hash:
        problems.extend(_hash_all(to_hash, jobs, report))
    if extras:
        problems.extend(_extras(root, listings))
    return problems


def _hash_all(
    items: list[tuple[str, str, Path, str]], jobs: int, report: Reporter
) -> list[Problem]:
    sizes = {}
    for i in items:
        try:
            sizes[i[2]] = os.path.getsize(i[2])
        except OSError:
            sizes[i[2]] = 0
    report(
        Event("start", "tree", total=sum(sizes.values()), data={"stage": "audit", "verb": "hash"})
    )

    def one(item: tuple[str, str, Path, str]) -> Problem | None:
        arch, path, full, recorded = item
        algo = recorded.partition(":")[0]
        try:
            actual = hash_file(full, algo if algo in ("crc32", "sha1") else "crc32")
        except OSError as exc:
            return Problem("missing", path, arch, f"cannot read: {exc}")
        finally:
            report(Event("advance", "tree", done=sizes[full]))
        if actual != recorded:
            return Problem("hash", path, arch, f"content {actual}, extracted as {recorded}")
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="audit") as pool:
        found = [p for p in pool.map(one, items) if p is not None]
    report(
        Event("finish", "tree", data={"status": "ok" if not found else "failed", "stage": "audit"})
    )
    return found


def _extras(root: Path, listings: Mapping[str, Listing]) -> list[Problem]:
    known: set[str] = set()
    known_dirs: set[str] = set()
    for listing in listings.values():
        for m in listing.members:
            known.add(m.path)
            add_parents(m.path, known_dirs)
    out: list[Problem] = []
    for top in sorted(_top_folders(listings)):
        base = root / top
        if not base.is_dir() or base.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for d in list(dirnames):
                rel = f"{rel_dir}/{d}"
                if os.path.islink(os.path.join(dirpath, d)):
                    dirnames.remove(d)  # never followed
                    if rel not in known:
                        out.append(Problem("extra", rel, "", "a symbolic link no listing names"))
                elif rel not in known and rel not in known_dirs:
                    dirnames.remove(d)
                    out.append(Problem("extra", rel, "", "a folder no listing names"))
            for f in filenames:
                rel = f"{rel_dir}/{f}"
                if rel in known:
                    continue
                if f.startswith(".") and f.endswith(TMP_SUFFIX):
                    detail = "leftover temporary file of an interrupted extraction"
                elif os.path.islink(os.path.join(dirpath, f)):
                    detail = "a symbolic link no listing names"
                else:
                    detail = "no listing names this file"
                out.append(Problem("extra", rel, "", detail))
    return out


def checks_exit_code(checks: Iterable[ArchiveCheck]) -> int:
    return max((c.exit_code for c in checks), default=0)
