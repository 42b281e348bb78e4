"""The fastest reliable gzip decoder available: python-isal when installed, else zlib.

Two shapes, both multi-member aware and both turning every sign of a broken
stream (bad header, bad deflate data, CRC or length mismatch, truncation,
trailing garbage) into :class:`~bimcv_fetch.errors.CorruptArchiveError`:

* :func:`open_gzip_stream` - a pull-style binary reader over a file object
  (``extract`` and ``verify --deep`` read archives on disk with it), whose
  ``read_chunk()`` hands out the decoder's output buffers without a copy;
* :class:`GzipDecoder` - a push-style incremental decoder (``download
  --extract`` feeds it the bytes as they arrive) whose output comes in bounded
  pieces, so memory stays flat whatever the compression ratio.

Measured on this project's benchmark (see the extract/verify report): isal
inflates 1.8-2.7x faster than zlib on archive-like data (about as fast on
incompressible data), and the ``isal-threaded`` reader overlaps inflating with
the tar parsing and file writes.
"""

from __future__ import annotations

import gzip
import importlib
import io
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol, cast

from bimcv_fetch.errors import CorruptArchiveError

_igzip: Any = None
_isal_zlib: Any = None
try:  # the ``fast`` extra (python-isal)
    _igzip = importlib.import_module("isal.igzip")
    _isal_zlib = importlib.import_module("isal.isal_zlib")
except ImportError:  # pragma: no cover - exercised where isal is missing
    _igzip = _isal_zlib = None

OUT_CHUNK = 1 << 20  # output buffers of the pull reader; the push decoder's pieces are smaller
# The push decoder inflates at most this much input at once into pieces of at most this
# much output. isal grows each output piece from 16 KiB by doubling: measured (two
# archives inflated side by side, 1 GB), 1 MiB pieces page-faulted about once per 10 KiB
# written and cost 20% more CPU; 256 KiB pieces no longer did, but their heaps still
# grew by 20 MiB per thread; 64 KiB pieces kept them flat, at the same CPU time when
# the caller copies them into larger buffers (as download --extract does).
PUSH_CHUNK = 64 << 10
BACKENDS = ("isal-threaded", "isal", "zlib")

_GZIP_MAGIC = b"\x1f\x8b"


def available_backends() -> list[str]:
    """Backends usable here, fastest first."""
    return list(BACKENDS) if _igzip is not None else ["zlib"]


def default_backend() -> str:
    return available_backends()[0]


def _errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    if _isal_zlib is not None:
        errs.append(cast(type[BaseException], _isal_zlib.error))
    return tuple(errs)


_DECODE_ERRORS = _errors()


def _corrupt(name: str, exc: BaseException) -> CorruptArchiveError:
    if isinstance(exc, EOFError):
        what = "gzip stream is truncated"
    else:
        what = f"gzip stream is corrupt ({exc})"
    return CorruptArchiveError(f"{name}: {what}" if name else what)


# ------------------------------------------------------------------ pull

PULL_BUFFERS = 3  # output buffers of the threaded reader: inflating runs up to 2 MiB ahead
_IN_BUFFER = 1 << 20  # compressed bytes read at a time by the isal reader


class _Inflater:
    """Decompressed chunks: ``fill(buffer) -> n`` called in this thread or in a helper thread.

    ``next()`` returns a view of one of ``buffers`` reusable output buffers,
    valid until the following ``next()`` call (empty at the end). With
    ``threaded`` a helper thread fills the other buffers meanwhile (isal and
    zlib release the GIL while they inflate); its errors are raised by the
    ``next()`` that reaches them, so a reader that stops early never sees an
    error in bytes it did not need.
    """

    def __init__(
        self,
        fill: Callable[[memoryview], int],
        *,
        name: str,
        threaded: bool,
        buffers: int = PULL_BUFFERS,
        size: int = OUT_CHUNK,
    ) -> None:
        self._fill = fill
        self._name = name
        self._done = False
        self._held: memoryview | None = None
        self._views = [memoryview(bytearray(size)) for _ in range(buffers if threaded else 1)]
        self._thread: threading.Thread | None = None
        if threaded:
            self._free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
            self._full: queue.SimpleQueue[tuple[memoryview, int] | BaseException] = (
                queue.SimpleQueue()
            )
            for v in self._views:
                self._free.put(v)
            self._stop = False
            self._thread = threading.Thread(target=self._work, name="gunzip", daemon=True)
            self._thread.start()

    def _call(self, view: memoryview) -> int:
        try:
            return self._fill(view) or 0
        except _DECODE_ERRORS as exc:
            raise _corrupt(self._name, exc) from exc

    def _work(self) -> None:
        while True:
            view = self._free.get()
            if view is None or self._stop:
                return
            try:
                n = self._call(view)
            except BaseException as exc:  # handed to the reader
                self._full.put(exc)
                return
            self._full.put((view, n))
            if not n:
                return

    def next(self) -> memoryview:
        if self._done:
            return _EMPTY
        if self._thread is None:
            view = self._views[0]
            n = self._call(view)
        else:
            if self._held is not None:
                self._free.put(self._held)
                self._held = None
            item = self._full.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            view, n = item
            self._held = view
        if not n:
            self._done = True
            return _EMPTY
        return view[:n]

    def close(self) -> None:
        self._done = True
        if self._thread is not None:
            self._stop = True
            self._free.put(None)
            self._thread.join()
            self._thread = None


_EMPTY = memoryview(b"")


class GzipStream(io.RawIOBase):
    """A read-only binary stream of the decompressed bytes; errors become CorruptArchiveError.

    Besides ``read``/``readinto``, ``read_chunk()`` hands out the decoder's
    own output buffer (a view valid until the next call; empty at the end):
    what :class:`bimcv_fetch.tarstream.TarStream` reads, with no copy.
    """

    def __init__(self, inflater: _Inflater, closer: Callable[[], object], backend: str) -> None:
        super().__init__()
        self._inflater = inflater
        self._closer = closer
        self._rest: memoryview = _EMPTY
        self.backend = backend

    def readable(self) -> bool:
        return True

    def read_chunk(self) -> memoryview:
        if self._rest:
            rest, self._rest = self._rest, _EMPTY
            return rest
        return self._inflater.next()

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        chunk = self.read_chunk()
        n = min(len(out), len(chunk))
        out[:n] = chunk[:n]
        self._rest = chunk[n:] if n < len(chunk) else _EMPTY
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._rest = _EMPTY
                self._inflater.close()
                self._closer()
            finally:
                super().close()


def open_gzip_stream(fileobj: BinaryIO, *, name: str = "", backend: str | None = None) -> BinaryIO:
    """Decompress ``fileobj`` (a gzip file, possibly multi-member) as a readable stream.

    ``backend`` is one of :data:`BACKENDS` (default: the fastest available):
    ``isal-threaded`` inflates in a helper thread, straight into reusable
    buffers (``read_chunk()``); ``isal`` and ``zlib`` in the reading thread.
    Closing the returned stream does not close ``fileobj``.
    """
    backend = backend or default_backend()
    inner: Any
    if backend in ("isal-threaded", "isal") and _igzip is not None:
        reader = getattr(_igzip, "_IGzipReader", None)
        if reader is not None:  # isal's C reader: inflates into the caller's buffer
            inner = reader(fileobj, buffersize=_IN_BUFFER)
        else:  # pragma: no cover - other python-isal versions
            inner = _igzip.IGzipFile(fileobj=fileobj, mode="rb")
    elif backend == "zlib":
        inner = gzip.GzipFile(fileobj=fileobj, mode="rb")
    else:
        raise ValueError(f"unknown or unavailable gzip backend {backend!r}")
    inflater = _Inflater(inner.readinto, name=name, threaded=backend == "isal-threaded")
    return cast(BinaryIO, GzipStream(inflater, inner.close, backend))


# ------------------------------------------------------------------ push


class _Decompress(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    @property
    def unconsumed_tail(self) -> bytes: ...

    def decompress(self, data: bytes | memoryview, max_length: int = ...) -> bytes: ...


def _factory(backend: str) -> Callable[[], _Decompress]:
    if backend.startswith("isal") and _isal_zlib is not None:
        mod: Any = _isal_zlib
    elif backend == "zlib":
        mod = zlib
    else:
        raise ValueError(f"unknown or unavailable gzip backend {backend!r}")
    return lambda: cast(_Decompress, mod.decompressobj(wbits=31))


class GzipDecoder:
    """Incremental gzip decoder: push compressed bytes, get decompressed pieces.

    ``decompress(data)`` yields the output in pieces of at most ``out_chunk``
    bytes (iterate it to the end before the next call). ``finish()`` raises
    :class:`CorruptArchiveError` when the input stopped inside a member.
    Concatenated members are decoded one after the other; zero padding after
    the last member is accepted (as gzip(1) does), anything else is not.
    """

    def __init__(
        self, *, name: str = "", backend: str | None = None, out_chunk: int = PUSH_CHUNK
    ) -> None:
        self.name = name
        self.backend = backend or default_backend()
        self._new = _factory(self.backend)
        self._out_chunk = out_chunk
        self.reset()

    def reset(self) -> None:
        self._d: _Decompress | None = None  # None: between members
        self._head = b""  # bytes seen between members, not yet known to start one
        self._padding = False  # zeros after the last member
        self.members = 0
        self.total_in = 0
        self.total_out = 0

    @property
    def in_member(self) -> bool:
        return self._d is not None

    def _fail(self, exc: BaseException) -> CorruptArchiveError:
        return _corrupt(self.name, exc)

    def decompress(self, data: bytes | memoryview) -> Iterator[bytes]:
        self.total_in += len(data)
        buf: bytes | memoryview = data  # inflated in place: no copy of the input
        while buf:
            if self._d is None:
                buf = bytes(buf)  # between members only
                if self._padding:
                    if buf.count(0) != len(buf):
                        raise self._fail(OSError("garbage after the last gzip member"))
                    return
                buf = self._head + buf
                self._head = b""
                if len(buf) < 2:
                    self._head = buf
                    return
                if buf[:2] != _GZIP_MAGIC:
                    if self.members and buf.count(0) == len(buf):
                        self._padding = True
                        return
                    raise self._fail(
                        OSError(
                            "not a gzip stream"
                            if not self.members
                            else "garbage after a gzip member"
                        )
                    )
                self._d = self._new()
            d = self._d
            limit = self._out_chunk
            view = memoryview(buf)
            rest: bytes | memoryview = b""
            try:
                for start in range(0, len(view), limit):  # slices: a short unconsumed_tail
                    out = d.decompress(view[start : start + limit], limit)
                    while True:
                        if out:
                            self.total_out += len(out)
                            yield out
                        if d.eof:
                            break
                        tail = d.unconsumed_tail
                        if not tail and len(out) < limit:
                            break  # all input used and no output held back
                        out = d.decompress(tail, limit)
                    if d.eof:
                        rest = d.unused_data + view[start + limit :]
                        break
            except _DECODE_ERRORS as exc:
                raise self._fail(exc) from exc
            if d.eof:
                self.members += 1
                self._d = None
            buf = rest

    def finish(self) -> None:
        """Check the stream ended cleanly (after a complete member)."""
        if self._d is not None or self._head:
            raise self._fail(EOFError())
        if self.members == 0:
            raise self._fail(OSError("empty gzip stream"))
