"""Extraction fed by the bytes of a transfer as they land (``download --extract``).

:class:`StreamingExtractor` inflates the bytes in the transfer's thread that
feeds it (the hashing thread of :mod:`bimcv_fetch.transfer`) and runs the
extraction of :mod:`bimcv_fetch.extract` (tar parsing, hashing and writing the
members) in a background thread, fed the decompressed pieces through a bounded
queue; files it writes are marked unverified in the receipt until
``commit(sha1)`` (after the archive's SHA1 check) or removed by ``discard()``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from bimcv_fetch import gz
from bimcv_fetch.errors import BimcvError, CorruptArchiveError
from bimcv_fetch.events import Reporter, null_reporter
from bimcv_fetch.extract import Extraction, extract_lock
from bimcv_fetch.manifest import Listing
from bimcv_fetch.mids import Selector
from bimcv_fetch.receipts import Receipt
from bimcv_fetch.store import Layout, disk_error

__all__ = ["QUEUE_BYTES", "StreamingExtractor"]

# Decompressed bytes queued for the parser: enough to ride out a slow file creation;
# more only costs memory (2 archives at a time: 2 queues).
QUEUE_BYTES = 4 << 20


class _Stopped(BaseException):
    """Raised inside a streaming parser thread to unwind it (reset/abort/discard)."""


_Item = bytes | BaseException | None  # a piece, an error to raise there, or the end


class _ByteQueue:
    """A bounded FIFO of decompressed pieces between the feeding thread and the parser thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[_Item] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.closed = False  # the consumer is gone: puts are dropped

    def put(self, item: _Item, *, alive: Callable[[], bool]) -> None:
        with self._cond:
            while self._items and self._bytes >= self.limit and not self.closed:
                self._cond.wait(0.1)
                if not alive():
                    return
            if self.closed:
                return
            self._items.append(item)
            if isinstance(item, bytes):
                self._bytes += len(item)
            self._cond.notify_all()

    def get(self) -> _Item:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            if isinstance(item, bytes):
                self._bytes -= len(item)
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


def _puller(q: _ByteQueue) -> Callable[[], bytes]:
    """The parser thread's chunk source (see :class:`bimcv_fetch.tarstream.TarStream`)."""

    def pull() -> bytes:
        item = q.get()
        if item is None:
            return b""
        if item is _STOP:
            raise _Stopped()
        if isinstance(item, BaseException):
            raise item  # the gzip error met by feed()/finish(), now that the parser needs bytes
        return item

    return pull


class StreamingExtractor:
    """Extract an archive from its bytes as they are downloaded (``download --extract``).

    Implements :class:`bimcv_fetch.stream.Consumer`. The transfer calls
    ``feed()`` with every byte in order (``reset()`` when it restarts from
    byte 0) and ``finish()`` after the last one; then the caller checks the
    archive SHA1 and calls ``commit(sha1)`` (complete receipt, returns it) or
    ``discard()`` (removes what this archive's unverified bytes produced).
    ``abort()`` stops for now, keeping finished files and the receipt (a later
    run skips them once it sees the same bytes again).

    ``feed()`` inflates in the caller's thread; parsing, hashing and writing
    run in one background thread fed the decompressed pieces through a
    bounded queue (``queue_bytes``), so memory stays flat. Errors of the
    archive itself (unsafe, corrupt) never escape ``feed()`` or ``finish()``:
    later bytes are dropped and ``commit()`` raises the error. A gzip error
    is raised in the parser only when it needs the bytes past it (a parser
    that already has every wanted member never sees it).
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
        queue_bytes: int = QUEUE_BYTES,
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
        self._lock = extract_lock(layout, name) if lock else None
        self._ex = Extraction(
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
        self._decoder: gz.GzipDecoder | None = None
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
        self._decoder = gz.GzipDecoder(name=self.name, backend=self.backend)
        ex = self._ex
        q = self._queue
        pull = _puller(q)

        def work() -> None:
            try:
                ex.run(pull)
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
        self._decoder = None

    # -- Consumer protocol

    def reset(self) -> None:
        """The byte stream restarts from 0: drop the parser state, keep finished files."""
        self._stop_thread()
        self._error = None
        self._finished = False
        receipt = self._ex.receipt
        self._ex = Extraction(
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
        q, dec = self._queue, self._decoder
        assert q is not None
        if q.closed or dec is None:
            return  # the parser is done (early stop) or failed, or the gzip stream broke
        try:
            for piece in dec.decompress(data):
                q.put(piece, alive=self._alive)
                if q.closed:
                    return
        except CorruptArchiveError as exc:
            self._decoder = None  # later bytes are dropped; the parser gets the error
            q.put(exc, alive=self._alive)

    def finish(self) -> None:
        """All bytes were fed: wait for the parser to finish (errors wait for commit())."""
        if self._thread is not None:
            q, dec = self._queue, self._decoder
            assert q is not None
            if dec is not None:
                try:
                    dec.finish()
                except CorruptArchiveError as exc:
                    q.put(exc, alive=self._alive)
            q.put(None, alive=self._alive)
            self._thread.join()
            self._thread = None
            self._decoder = None
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
