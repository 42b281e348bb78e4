"""A small sequential tar reader: headers parsed, member data handed out without copies.

:class:`TarStream` replaces ``tarfile``'s stream mode (``"r|"``) in the hot
paths (extraction, ``verify --deep``). tarfile's ``_Stream`` builds and joins
a bytes object for every read and skips unwanted members by reading them into
fresh bytes as well; here the bytes come in large chunks (a decompressor's
output buffers, or ``readinto`` into one reusable buffer) and member data is
handed out as :class:`memoryview` slices of those chunks, to be hashed and
written from the same memory. Skipping a member touches none of its bytes.

Headers are parsed by ``tarfile.TarInfo.frombuf`` (checksums, octal and
base-256 numbers, ustar prefixes) and the members come out as
:class:`tarfile.TarInfo` objects, so the checks that look at them are the same
as with tarfile:

* GNU long names and link targets (``L``/``K``), pax extended (``x``, and
  Solaris ``X``) and global (``g``) headers: ``path``, ``linkpath``, ``size``,
  ``mtime``, ``uid``, ``gid``, ``uname``, ``gname`` (UTF-8, undecodable bytes
  kept as surrogates); a pax ``size`` sets both the member's size and its data
  length;
* sparse members (old GNU ``S``, or pax ``GNU.sparse.*``) come out with
  :meth:`~tarfile.TarInfo.issparse` true (their data is skipped, never
  rebuilt); every other type comes out as it is, for the caller to refuse;
* the archive ends at its first all-zero block (as GNU tar and tarfile do;
  what follows is not read) or, like both of them, when the stream ends at a
  header boundary without one;
* anything else is :class:`~bimcv_fetch.errors.CorruptArchiveError`: an empty
  stream, a bad header checksum or number, a stream that ends inside a header,
  an extended header or member data, an oversized extended header.

A chunk source is a callable returning the next chunk (any bytes-like object,
empty at the end), which needs to stay valid only until the next call; an
object with ``read_chunk()`` (see :func:`bimcv_fetch.gz.open_gzip_stream`) or
a binary stream with ``readinto()`` can be given instead.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol, TypeAlias

from bimcv_fetch.errors import CorruptArchiveError

__all__ = [
    "BLOCK",
    "BUFFER_SIZE",
    "MAX_EXTENDED",
    "Chunk",
    "Source",
    "TarStream",
    "chunk_source",
]

BLOCK = 512
BUFFER_SIZE = 1 << 20  # the reusable buffer of a readinto() source
MAX_EXTENDED = 1 << 20  # largest GNU long name or pax header accepted (real ones: < 1 KiB)
ENCODING = "utf-8"
ERRORS = "surrogateescape"

Chunk: TypeAlias = bytes | bytearray | memoryview

_ZERO_BLOCK = bytes(BLOCK)
_EMPTY = memoryview(b"")
_DATA_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
_GNU_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


class _ReadInto(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class _ChunkReader(Protocol):
    def read_chunk(self) -> Chunk: ...


# What TarStream reads: a chunk source, an object with read_chunk(), or a binary stream.
Source: TypeAlias = Callable[[], Chunk] | _ChunkReader | _ReadInto | BinaryIO


def chunk_source(source: Source, *, buffer_size: int = BUFFER_SIZE) -> Callable[[], Chunk]:
    """A chunk source for ``source`` (see the module docstring)."""
    read_chunk = getattr(source, "read_chunk", None)
    if callable(read_chunk):
        return read_chunk  # type: ignore[no-any-return]
    readinto = getattr(source, "readinto", None)
    if callable(readinto):
        view = memoryview(bytearray(buffer_size))

        def pull() -> Chunk:
            n = readinto(view)
            return view[:n] if n else _EMPTY

        return pull
    if callable(source):
        return source
    raise TypeError(f"not a chunk source: {source!r}")


def _number(field: bytes) -> int:
    """A numeric header field (octal, or base-256 with the high bit set), as tar writes them."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def _text(raw: bytes) -> str:
    """A NUL-terminated name from a GNU long-name block."""
    return raw.split(b"\0", 1)[0].decode(ENCODING, ERRORS)


def _pax_value(raw: bytes) -> str:
    """A pax keyword or value: UTF-8, raw bytes kept as surrogates when it is not."""
    try:
        return raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        return raw.decode(ENCODING, ERRORS)


class TarStream:
    """Members of a tar stream, one after the other (see the module docstring).

    ``next()`` returns the next member's :class:`tarfile.TarInfo` (None at the
    end), skipping whatever of the previous member's data was not taken;
    ``data()`` yields the current member's data in pieces. ``name`` prefixes
    error messages (the archive's name).
    """

    def __init__(self, source: Source, *, name: str = "", buffer_size: int = BUFFER_SIZE) -> None:
        self._pull = chunk_source(source, buffer_size=buffer_size)
        self.name = name
        self._chunk: memoryview = _EMPTY
        self._pos = 0
        self._eof = False
        self.offset = 0  # bytes of the tar stream consumed so far
        self.ended = False  # the end of the archive was reached
        self.member: tarfile.TarInfo | None = None
        self._left = 0  # data bytes of the current member not taken yet
        self._pad = 0  # then padding up to the next block
        self._global: dict[str, str] = {}  # pax global header records

    # ------------------------------------------------------------------ bytes

    def _corrupt(self, what: str) -> CorruptArchiveError:
        where = f"{self.name}: " if self.name else ""
        return CorruptArchiveError(f"{where}broken tar stream ({what})")

    def _available(self) -> int:
        """Bytes left in the current chunk, pulling the next one when it is used up."""
        left = len(self._chunk) - self._pos
        while left <= 0:
            if self._eof:
                return 0
            chunk = self._pull()
            if not len(chunk):
                self._eof = True
                self._chunk, self._pos = _EMPTY, 0
                return 0
            view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
            self._chunk, self._pos = view.cast("B") if view.format != "B" else view, 0
            left = len(view)
        return left

    def _read(self, n: int) -> bytes:
        """``n`` bytes (fewer only at the end of the stream), copied."""
        avail = self._available()
        if avail >= n:
            pos = self._pos
            self._pos = pos + n
            self.offset += n
            return bytes(self._chunk[pos : pos + n])
        parts: list[bytes] = []
        while n > 0 and avail > 0:
            k = min(n, avail)
            pos = self._pos
            parts.append(bytes(self._chunk[pos : pos + k]))
            self._pos = pos + k
            self.offset += k
            n -= k
            if n:
                avail = self._available()
        return b"".join(parts)

    def _skip(self, n: int) -> int:
        """Skip ``n`` bytes without looking at them; returns how many there were."""
        done = 0
        while done < n:
            avail = self._available()
            if not avail:
                break
            k = min(n - done, avail)
            self._pos += k
            done += k
        self.offset += done
        return done

    # ------------------------------------------------------------------ members

    def data(self) -> Iterator[memoryview]:
        """The current member's data not taken yet, in pieces of at most one chunk.

        A piece is a view of the source's chunk, valid until the next piece is
        asked for. Raises CorruptArchiveError when the stream ends early.
        """
        while self._left > 0:
            avail = self._available()
            if not avail:
                member = self.member.name if self.member is not None else "?"
                raise self._corrupt(f"the stream ends inside {member!r}")
            k = min(avail, self._left)
            pos = self._pos
            self._pos = pos + k
            self._left -= k
            self.offset += k
            yield self._chunk[pos : pos + k]

    def skip(self) -> None:
        """Skip the rest of the current member's data and its padding."""
        want = self._left + self._pad
        if want:
            got = self._skip(want)
            self._left = self._pad = 0
            if got < want:
                member = self.member.name if self.member is not None else "?"
                raise self._corrupt(f"the stream ends inside {member!r}")

    def drain(self) -> int:
        """Read the stream to its end (the decompressor then checks its trailer); bytes read."""
        n = self._skip(1 << 62)
        self._left = self._pad = 0
        return n

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        while (ti := self.next()) is not None:
            yield ti

    def next(self) -> tarfile.TarInfo | None:
        """The next member (its data is then available from :meth:`data`), or None at the end."""
        if self.ended:
            return None
        self.skip()
        self.member = None
        start = self.offset
        extended: list[tuple[bytes, bytes]] = []  # (type, payload) in archive order
        while True:
            at = self.offset
            buf = self._read(BLOCK)
            if not buf:
                if at == 0:
                    raise self._corrupt("empty stream")
                if extended:
                    raise self._corrupt(f"the stream ends after an extended header at byte {start}")
                self.ended = True  # no end-of-archive blocks: GNU tar and tarfile accept that
                return None
            if len(buf) < BLOCK:
                raise self._corrupt(f"the stream ends inside the header at byte {at}")
            if buf == _ZERO_BLOCK:
                if extended:
                    raise self._corrupt(f"nothing follows the extended header at byte {start}")
                self.ended = True
                return None
            try:
                ti = tarfile.TarInfo.frombuf(buf, ENCODING, ERRORS)
            except tarfile.HeaderError as exc:
                raise self._corrupt(f"{exc} at byte {at}") from None
            kind = ti.type
            if kind in _GNU_LONG or kind in _PAX or kind == tarfile.XGLTYPE:
                size = ti.size
                if size < 0 or size > MAX_EXTENDED:
                    raise self._corrupt(f"extended header of {size} bytes at byte {at}")
                payload = self._read(size)
                if len(payload) < size or self._skip(-size % BLOCK) < -size % BLOCK:
                    raise self._corrupt(f"the stream ends inside the extended header at byte {at}")
                if kind == tarfile.XGLTYPE:
                    self._global.update(self._pax_records(payload))
                else:
                    extended.append((kind, payload))
                continue
            break

        stored = ti.size
        if kind == tarfile.GNUTYPE_SPARSE:
            origsize = self._sparse_blocks(buf, at)
        pax = dict(self._global)
        if self._global:
            self._apply_pax(ti, self._global)
        for ext_kind, payload in reversed(extended):  # the outermost header wins, as in tarfile
            if ext_kind == tarfile.GNUTYPE_LONGNAME:
                ti.name = _text(payload)
            elif ext_kind == tarfile.GNUTYPE_LONGLINK:
                ti.linkname = _text(payload)
            else:
                records = self._pax_records(payload)
                self._apply_pax(ti, records)
                pax.update(records)
        if "size" in pax:
            stored = self._size("size", pax["size"])
        if kind == tarfile.GNUTYPE_SPARSE:
            ti.size = origsize
            ti.sparse = b""  # issparse(); the map itself is of no use here
        elif any(k.startswith("GNU.sparse.") for k in pax):
            ti.sparse = b""
        if pax:
            ti.pax_headers = pax
        if ti.isdir():
            ti.name = ti.name.rstrip("/")
        ti.offset = start
        ti.offset_data = self.offset
        # Data follows regular files and types tarfile does not know (as tarfile reads them).
        has_data = kind in _DATA_TYPES or kind not in tarfile.SUPPORTED_TYPES
        self._left = stored if has_data else 0
        self._pad = -self._left % BLOCK
        self.member = ti
        return ti

    # ------------------------------------------------------------------ extensions

    def _sparse_blocks(self, header: bytes, at: int) -> int:
        """Skip an old-GNU sparse member's extension blocks; its real size."""
        extended = header[482]
        while extended:
            blk = self._read(BLOCK)
            if len(blk) < BLOCK:
                raise self._corrupt(f"the stream ends inside the sparse header at byte {at}")
            extended = blk[504]
        return _number(header[483:495])  # frombuf() already checked it is a number

    def _pax_records(self, payload: bytes) -> dict[str, str]:
        """The records of a pax header (``"%d %s=%s\\n"``), decoded as tarfile does (UTF-8)."""
        records: dict[str, str] = {}
        pos = 0
        while (m := _PAX_RECORD.match(payload, pos)) is not None:
            length = int(m.group(1))
            end = m.start(1) + length
            if length <= 0 or end > len(payload) or payload[end - 1 : end] != b"\n":
                raise self._corrupt("invalid pax header record")
            records[_pax_value(m.group(2))] = _pax_value(payload[m.end(2) + 1 : end - 1])
            pos = end
        return records

    def _apply_pax(self, ti: tarfile.TarInfo, records: dict[str, str]) -> None:
        """Set the fields pax records override (bad numbers are 0, as in tarfile, but sizes)."""
        for key, value in records.items():
            if key in ("path", "GNU.sparse.name"):
                ti.name = value.rstrip("/")
            elif key == "linkpath":
                ti.linkname = value
            elif key in ("size", "GNU.sparse.size", "GNU.sparse.realsize"):
                ti.size = self._size(key, value)
            elif key == "mtime":
                try:
                    ti.mtime = float(value)
                except ValueError:
                    ti.mtime = 0
            elif key in ("uid", "gid"):
                try:
                    setattr(ti, key, int(value))
                except ValueError:
                    setattr(ti, key, 0)
            elif key in ("uname", "gname"):
                setattr(ti, key, value)

    def _size(self, key: str, value: str) -> int:
        try:
            size = int(value)
        except ValueError:
            size = -1
        if size < 0:
            raise self._corrupt(f"invalid pax {key} {value!r}")
        return size
