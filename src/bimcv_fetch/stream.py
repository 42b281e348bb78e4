"""Consumers of a file's bytes as they land: the SHA1, and (download --extract) a tar reader.

A transfer feeds every byte of a file, in order from offset 0, to each consumer.
On resume it first feeds the prefix already on disk; when the server forces a
restart from zero it calls ``reset()``. ``finish()`` is called once the whole
file has been fed; ``abort()`` when the transfer gives up for now (the
consumer must release threads and files, keeping what it proved done).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Protocol


class Consumer(Protocol):
    def reset(self) -> None: ...

    def feed(self, data: bytes | memoryview) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class Sha1Consumer:
    """Streaming SHA1 (hashlib releases the GIL on large buffers)."""

    def __init__(self) -> None:
        self._h = hashlib.sha1()
        self.size = 0

    def reset(self) -> None:
        self._h = hashlib.sha1()
        self.size = 0

    def feed(self, data: bytes | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def finish(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def hexdigest(self) -> str:
        return self._h.hexdigest()


CHUNK = 1 << 20  # 1 MiB: reads, writes and hashing all use large buffers


def file_chunks(path: str | os.PathLike[str], chunk: int = CHUNK) -> Iterator[memoryview]:
    """A file's bytes in large reads, each a view of one reused buffer (use it at once)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                return
            yield view[:n]


def sha1_file(path: str, *, chunk: int = CHUNK, progress: object = None) -> str:
    """SHA1 of a file read in large chunks (``progress``, if callable, gets byte counts)."""
    h = hashlib.sha1()
    for piece in file_chunks(path, chunk):
        h.update(piece)
        if callable(progress):
            progress(len(piece))
    return h.hexdigest()
