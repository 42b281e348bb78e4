"""Safe streaming extraction of the wanted members of an archive into the MIDS tree.

One pass over the gzip'd tar (:class:`~bimcv_fetch.tarstream.TarStream`: the
decompressor's buffers are hashed and written as they are, unwanted members
are skipped without touching their bytes), writing only the members a
:class:`~bimcv_fetch.mids.Selector` wants, each to a temporary name beside its
final path and renamed when complete; reading stops after the last wanted
member. Every member is checked against the archive's listing and the
safety rules (:mod:`bimcv_fetch.safety`) before a byte of it is written.

What was written is recorded in a receipt (:mod:`bimcv_fetch.receipts`, which
describes its JSON), rewritten every few seconds while extracting and a last
time, complete, at the end; a rerun skips the members it lists that are still
on disk unchanged.

``download --extract`` uses :class:`~bimcv_fetch.extract_stream.StreamingExtractor`:
the same extraction fed by the bytes of the transfer, committed only after the
SHA1 check (:mod:`bimcv_fetch.extract_hook` plugs it into the download).

The names of :mod:`bimcv_fetch.members`, :mod:`bimcv_fetch.receipts`,
:mod:`bimcv_fetch.extract_stream` and :mod:`bimcv_fetch.extract_hook` can also
be imported from here (the last two are loaded on first use, since they build
on this module).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import socket
import stat
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bimcv_fetch import gz
from bimcv_fetch.errors import (
    BimcvError,
    CorruptArchiveError,
    ExitCode,
    Interrupted,
    UnsafeArchiveError,
)
from bimcv_fetch.events import Event, Reporter, ThreadSafeReporter, null_reporter
from bimcv_fetch.manifest import Kind, Listing
from bimcv_fetch.members import HASH_ALGO, MemberHash, hash_file, last_wanted_index, plan_members
from bimcv_fetch.mids import Selector
from bimcv_fetch.receipts import (
    RECEIPT_VERSION,
    MemberRecord,
    Receipt,
    Selection,
    add_selection,
    load_receipt,
    receipt_covers,
    tree_id,
)
from bimcv_fetch.safety import (
    SafeTree,
    check_member_name,
    is_root_name,
    member_type_problem,
    normalize_name,
    raise_for_listing,
)
from bimcv_fetch.store import FileLock, Layout, clear_verified, disk_error
from bimcv_fetch.tarstream import Source, TarStream

if TYPE_CHECKING:
    from bimcv_fetch.extract_hook import DownloadExtractHook, cached_listing, extract_hook_factory
    from bimcv_fetch.extract_stream import StreamingExtractor

__all__ = [
    "COPY_CHUNK",
    "HASH_ALGO",
    "RECEIPT_INTERVAL",
    "RECEIPT_VERSION",
    "TMP_SUFFIX",
    "DownloadExtractHook",
    "ExtractJob",
    "ExtractResult",
    "MemberHash",
    "MemberRecord",
    "Receipt",
    "Selection",
    "StaleFilesError",
    "StreamingExtractor",
    "add_selection",
    "cached_listing",
    "extract_archive",
    "extract_hook_factory",
    "extract_many",
    "hash_file",
    "last_wanted_index",
    "load_receipt",
    "plan_members",
    "receipt_covers",
    "temp_path",
    "tree_id",
]

TMP_SUFFIX = ".bimcv-tmp"
# A member's bytes are hashed and written straight from the decompressor's output
# buffers (pieces of up to 1 MiB, one os.write each): no copy in between.
COPY_CHUNK = 1 << 20  # progress is reported in steps of this many bytes
RECEIPT_INTERVAL = 2.0  # seconds between incremental receipt writes (at least)

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def _writer_tag() -> str:
    """Who writes a temporary file: host and pid, so a cleaner can tell live from stale."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_")[:32] or "host"
    return f"{host}-{os.getpid()}"


def temp_path(final: Path) -> Path:
    """Where a member is written before it is renamed to ``final``.

    ``.NAME.HOST-PID.bimcv-tmp``: unique to this process, so two archives (or
    two hosts sharing the tree) never write the same temporary file, and
    :func:`is_stale_temp` can leave a live writer's files alone.
    """
    tag = _writer_tag()
    name = f".{final.name}.{tag}{TMP_SUFFIX}"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        digest = hashlib.sha1(final.name.encode("utf-8", "surrogateescape")).hexdigest()
        name = f".{digest}.{tag}{TMP_SUFFIX}"
    return final.with_name(name)


def is_stale_temp(file_name: str) -> bool:
    """A temporary file of a writer that is gone (a dead process on this host)."""
    if not (file_name.startswith(".") and file_name.endswith(TMP_SUFFIX)):
        return False
    tag = file_name[: -len(TMP_SUFFIX)].rpartition(".")[2]
    host, _, pid_text = tag.rpartition("-")
    mine = _writer_tag().rpartition("-")[0]
    if not pid_text.isdigit() or host != mine:
        return not pid_text.isdigit()  # an old-style name: nobody owns it any more
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ------------------------------------------------------------------ the extraction


class StaleFilesError(CorruptArchiveError):
    """Files extracted earlier from unverified bytes differ from this archive's.

    Their receipt entries are dropped; extracting again (from the verified
    archive) rewrites them.
    """


class Extraction:
    """The member loop shared by :func:`extract_archive` and :class:`StreamingExtractor`.

    Internal to this module and :mod:`bimcv_fetch.extract_stream`.
    """

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

    def run(self, stream: Source) -> None:
        """Read the tar stream until every wanted member has been seen.

        ``stream`` is the decompressed tar: a chunk source or a binary stream
        (see :class:`~bimcv_fetch.tarstream.TarStream`).
        """
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
        tar = TarStream(stream, name=self.name)
        try:
            while self.remaining:
                if self.cancel is not None and self.cancel.is_set():
                    raise Interrupted(f"{self.name}: extraction interrupted")
                ti = tar.next()
                if ti is None:
                    break
                self._member(tar, ti)
                self.save()
            self.advance(0, flush=True)
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

    def _member(self, tar: TarStream, ti: tarfile.TarInfo) -> None:
        name = ti.name
        if ti.isdir() and is_root_name(name):
            return
        reason = check_member_name(name) or member_type_problem(ti)
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

    def _pieces(self, tar: TarStream) -> Iterator[memoryview]:
        """The current member's bytes (views valid until the next piece), checking cancel."""
        cancel = self.cancel
        for piece in tar.data():
            if cancel is not None and cancel.is_set():
                raise Interrupted(f"{self.name}: extraction interrupted")
            yield piece

    def _confirm(self, tar: TarStream, ti: tarfile.TarInfo, rec: MemberRecord) -> bool:
        """Hash a member's bytes without writing them; True when they match the record."""
        algo = rec.hash.partition(":")[0]
        h = MemberHash(algo if algo in ("crc32", "sha1") else HASH_ALGO)
        for piece in self._pieces(tar):
            h.update(piece)
            self.advance(len(piece))
        return h.text() == rec.hash

    def _write(self, tar: TarStream, ti: tarfile.TarInfo, path: str) -> None:
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
            try:
                for piece in self._pieces(tar):
                    h.update(piece)
                    _write_all(fd, piece)
                    self.advance(len(piece))
                mtime = int(ti.mtime)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
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
                if is_stale_temp(e.name) and (e.is_file(follow_symlinks=False) or e.is_symlink()):
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


def _write_all(fd: int, data: memoryview) -> None:
    n = os.write(fd, data)
    while n < len(data):
        data = data[n:]
        n = os.write(fd, data)


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


def extract_lock(layout: Layout, name: str) -> FileLock:
    """The lock one extraction of archive ``name`` holds (streaming or not)."""
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
    lk = extract_lock(layout, name) if lock else None
    try:
        if lk is not None:
            lk.acquire()
        try:
            ex = Extraction(
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


# ------------------------------------------------------------------ the streaming side

_LAZY = {
    "StreamingExtractor": "bimcv_fetch.extract_stream",
    "DownloadExtractHook": "bimcv_fetch.extract_hook",
    "cached_listing": "bimcv_fetch.extract_hook",
    "extract_hook_factory": "bimcv_fetch.extract_hook",
}

if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """Load the streaming names on first use (their modules import this one)."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)
