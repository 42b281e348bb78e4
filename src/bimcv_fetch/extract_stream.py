"""Extraction fed by the bytes of a transfer as they land (``download --extract``).

:class:`StreamingExtractor` inflates the bytes in the transfer's thread that
feeds it (the hashing thread of :mod:`bimcv_fetch.transfer`) into a few
reusable buffers, and runs the extraction of :mod:`bimcv_fetch.extract` (tar
parsing, hashing and writing the members) on them in a background thread;
files it writes are marked unverified in the receipt until ``commit(sha1)``
(after the archive's SHA1 check) or removed by ``discard()``.
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
from bimcv_fetch.tarstream import Chunk

__all__ = ["BUFFER_SIZE", "QUEUE_BYTES", "StreamingExtractor"]

# Decompressed bytes go to the parser in reusable buffers: QUEUE_BYTES of them, in
# buffers of BUFFER_SIZE. The decoder's own pieces (gz.PUSH_CHUNK, 64 KiB) are copied
# in and freed at once: handing them over as they are (256 KiB pieces, freed by the
# parser thread) made the heap of each inflating thread grow by about 20 MiB (peak RSS
# of download --extract --jobs 2: 90 MiB, now 60). 256 KiB buffers were faster than
# 1 MiB ones (-12% CPU: the bytes are still in cache when they are hashed and written).
BUFFER_SIZE = 256 << 10
QUEUE_BYTES = 3 << 20


class _Stopped(BaseException):
    """Raised inside a streaming parser thread to unwind it (reset/abort/discard)."""


class _Stop:
    """The marker asking the parser to stop."""


_STOP = _Stop()
_Item = tuple[bytearray, int] | BaseException | _Stop | None  # bytes, error, stop, end


class _Pipe:
    """Reusable buffers going from the inflating thread to the parser thread and back.

    The producer ``take()``s a free buffer, fills it and ``give()``s it (or
    an error to raise in the parser, the stop marker, None for the end); the
    parser's ``get()`` returns its previous buffer to the free list. When all
    buffers are in use the producer waits: memory stays flat and a slow
    extraction holds back the transfer.
    """

    def __init__(self, buffers: int, size: int) -> None:
        self._cond = threading.Condition()
        self._free = [bytearray(size) for _ in range(max(1, buffers))]
        self._full: deque[_Item] = deque()
        self._held: bytearray | None = None
        self.closed = False  # the parser is gone: nothing more is given

    def take(self, alive: Callable[[], bool]) -> bytearray | None:
        """A free buffer; None when the parser is gone."""
        with self._cond:
            while not self._free and not self.closed:
                self._cond.wait(0.1)
                if not alive():
                    return None
            return None if self.closed else self._free.pop()

    def give(self, item: _Item) -> None:
        with self._cond:
            if self.closed:
                if isinstance(item, tuple):
                    self._free.append(item[0])
                return
            self._full.append(item)
            self._cond.notify_all()

    def get(self) -> _Item:
        with self._cond:
            if self._held is not None:
                self._free.append(self._held)
                self._held = None
                self._cond.notify_all()
            while not self._full:
                self._cond.wait()
            item = self._full.popleft()
            if isinstance(item, tuple):
                self._held = item[0]
            return item

    def _drop_full(self) -> None:
        while self._full:
            item = self._full.popleft()
            if isinstance(item, tuple):
                self._free.append(item[0])

    def close(self) -> None:
        """The parser is done: drop what was given; later gives are dropped."""
        with self._cond:
            self.closed = True
            self._drop_full()
            self._cond.notify_all()

    def interrupt(self) -> None:
        """Make the parser's next get() return the stop marker at once."""
        with self._cond:
            self._drop_full()
            self._full.append(_STOP)
            self._cond.notify_all()


def _puller(pipe: _Pipe) -> Callable[[], Chunk]:
    """The parser thread's chunk source (see :class:`bimcv_fetch.tarstream.TarStream`)."""

    def pull() -> Chunk:
        item = pipe.get()
        if item is None:
            return b""
        if isinstance(item, _Stop):
            raise _Stopped()
        if isinstance(item, BaseException):
            raise item  # the gzip error met by feed()/finish(), now that the parser needs bytes
        buf, n = item
        return memoryview(buf)[:n]

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

    ``feed()`` inflates in the caller's thread into reusable buffers
    (``queue_bytes`` of them, handed over at the end of each call at the
    latest); parsing, hashing and writing run in one background thread on
    them, so memory stays flat and a slow extraction holds back the transfer.
    Errors of the archive itself (unsafe, corrupt) never escape ``feed()``
    or ``finish()``: later bytes are dropped and ``commit()`` raises the
    error. A gzip error is raised in the parser only when it needs the bytes
    past it (a parser that already has every wanted member never sees it).
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
        self._pipe: _Pipe | None = None
        self._decoder: gz.GzipDecoder | None = None  # None once the gzip stream broke
        self._buf: bytearray | None = None  # the buffer being filled
        self._fill = 0
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
        buffers = -(-self.queue_bytes // BUFFER_SIZE)
        pipe = self._pipe = _Pipe(buffers, min(BUFFER_SIZE, max(self.queue_bytes, 1 << 16)))
        self._decoder = gz.GzipDecoder(name=self.name, backend=self.backend)
        self._buf, self._fill = None, 0
        ex = self._ex
        pull = _puller(pipe)

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
                pipe.close()
                with contextlib.suppress(BimcvError):
                    ex.save(force=True)

        self._thread = threading.Thread(target=work, name=f"extract-{self.name}", daemon=True)
        self._thread.start()

    def _stop_thread(self, *, drain: bool = False) -> None:
        if self._thread is not None:
            assert self._pipe is not None
            if drain:
                self._hand_over()
                self._pipe.give(_STOP)
            else:
                self._pipe.interrupt()
            self._thread.join()
        self._thread = None
        self._pipe = None
        self._decoder = None
        self._buf = None

    def _hand_over(self) -> None:
        """Give the parser the buffer being filled, if it holds anything."""
        if self._buf is not None and self._fill and self._pipe is not None:
            self._pipe.give((self._buf, self._fill))
            self._buf, self._fill = None, 0

    def _inflate(self, data: bytes | memoryview, pipe: _Pipe, dec: gz.GzipDecoder) -> None:
        """Inflate ``data`` into the pipe's buffers (every decoder piece is copied and freed)."""
        buf, fill = self._buf, self._fill
        try:
            for piece in dec.decompress(data):
                view = memoryview(piece)
                while view:
                    if buf is None:
                        buf, fill = pipe.take(self._alive), 0
                        if buf is None:
                            return  # the parser is gone (early stop or failure)
                    k = min(len(view), len(buf) - fill)
                    buf[fill : fill + k] = view[:k]
                    fill += k
                    view = view[k:]
                    if fill == len(buf):
                        pipe.give((buf, fill))
                        buf = None
        finally:
            self._buf, self._fill = buf, fill

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
        pipe, dec = self._pipe, self._decoder
        assert pipe is not None
        if pipe.closed or dec is None:
            return  # the parser is done (early stop) or failed, or the gzip stream broke
        try:
            self._inflate(data, pipe, dec)
        except CorruptArchiveError as exc:
            self._decoder = None  # later bytes are dropped; the parser gets the error
            self._hand_over()
            pipe.give(exc)
        else:
            self._hand_over()  # what this call inflated goes to the parser now

    def finish(self) -> None:
        """All bytes were fed: wait for the parser to finish (errors wait for commit())."""
        if self._thread is not None:
            pipe, dec = self._pipe, self._decoder
            assert pipe is not None
            self._hand_over()
            if dec is not None:
                try:
                    dec.finish()
                except CorruptArchiveError as exc:
                    pipe.give(exc)
            pipe.give(None)
            self._thread.join()
            self._thread = None
            self._pipe = None
            self._decoder = None
            self._buf = None
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
