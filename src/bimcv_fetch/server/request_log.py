"""The record of the requests a share server answered (what tests and benchmarks inspect)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple
from urllib.parse import parse_qs, quote

from bimcv_fetch.server.protocol import files_list


class RequestRecord(NamedTuple):
    """One answered request: ``path`` is the decoded path plus ``?query`` if any."""

    method: str
    path: str
    range: str | None
    status: int


class RequestLog:
    """Thread-safe record of the requests a server answered, oldest first."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._items: deque[RequestRecord] = deque(maxlen=maxlen)

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._items.append(record)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def for_file(self, name: str, method: str | None = "GET") -> list[RequestRecord]:
        """Requests for one file on any endpoint (``method=None``: every method)."""
        quoted = quote(name)
        out = []
        for r in self.snapshot():
            if method is not None and r.method != method:
                continue
            path, _, query = r.path.partition("?")
            last = path.rsplit("/", 1)[-1]
            files = parse_qs(query).get("files", [])
            listed = [n for f in files for n in files_list(f)]
            if last in (name, quoted) or name in listed:
                out.append(r)
        return out
