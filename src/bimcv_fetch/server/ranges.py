"""Byte ranges: ``Range``, ``If-Range`` and the 416 answer.

One ``Range: bytes=N-``, ``bytes=N-M`` or ``bytes=-S`` is served (206 with an
exact ``Content-Range``); a start at or past the end is unsatisfiable (416
with ``bytes */SIZE``); several ranges or bad syntax are ignored (200 and the
whole file). ``If-Range`` is compared exactly (quotes included) with the ETag,
or as an HTTP date with the file's mtime.
"""

from __future__ import annotations

import email.utils
import re
from typing import Literal

from bimcv_fetch.server.protocol import StartResponse, sabre_error, status_line

_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One byte range → ``(first, last)`` inclusive, ``"unsatisfiable"``, or None (ignore)."""
    m = _RANGE_RE.fullmatch(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return (start, min(end, size - 1))


def if_range_ok(header: str | None, etag: str, mtime: float) -> bool:
    """Whether an ``If-Range`` header (None: absent) lets the Range apply."""
    if header is None:
        return True
    value = str(header).strip()
    if value.startswith(('"', "W/")):
        return value == etag
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return int(mtime) <= parsed.timestamp()


def content_range(first: int, last: int, size: int) -> tuple[str, str]:
    """The ``Content-Range`` header of a 206 answer."""
    return ("Content-Range", f"bytes {first}-{last}/{size}")


def unsatisfiable(start: StartResponse, size: int, etag: str) -> list[bytes]:
    """The 416 answer to a range that starts at or past the end of the file."""
    body = sabre_error(
        "RequestedRangeNotSatisfiable",
        "The start offset should be less than the size of the file",
    )
    start(
        status_line(416),
        [
            ("Content-Type", "application/xml; charset=utf-8"),
            ("Content-Range", f"bytes */{size}"),
            ("Content-Length", str(len(body))),
            ("ETag", etag),
        ],
    )
    return [body]
