"""Zips built on the fly: ``GET <folder>/?accept=zip&files=…`` and share-link downloads.

The members are stored (no compression), with ZIP64 when needed, and the zip
is streamed as it is written: nothing is buffered beyond one read chunk.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Iterator, Sequence
from urllib.parse import quote

from bimcv_fetch.server.files import Entry
from bimcv_fetch.server.protocol import V2_ROOT


class _ZipSink:
    """A write-only, non-seekable stream collecting what zipfile writes."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def zip_name(entries: Sequence[Entry]) -> str:
    """The download's file name: ``NAME.zip`` for one file, else ``download.zip``."""
    return entries[0].name + ".zip" if len(entries) == 1 else "download.zip"


def zip_chunks(entries: Sequence[Entry], chunk_size: int) -> Iterator[bytes]:
    """The bytes of a zip of ``entries``, as it is written."""
    sink = _ZipSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for e in entries:
            stamp = time.gmtime(max(e.st.st_mtime, 315532800))[:6]
            info = zipfile.ZipInfo(e.name, date_time=stamp)
            info.file_size = e.st.st_size
            info.compress_type = zipfile.ZIP_STORED
            with open(e.path, "rb") as f, zf.open(info, "w") as out:
                while data := f.read(chunk_size):
                    out.write(data)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


def zip_location(token: str, raw_files: Sequence[str]) -> str:
    """Where a share link in ``"zip"`` mode redirects: the v2 ``?accept=zip`` URL."""
    location = f"{V2_ROOT}{quote(token)}/?accept=zip"
    for v in raw_files:
        location += "&files=" + quote(v, safe="")
    return location
