"""How a file's bytes go out, with the faults a GET took applied.

:func:`read_range` reads the bytes (flipping one for a ``flip_byte`` fault);
:func:`shape` sends them, cutting (``drop``, ``truncate``) or pausing
(``stall``) the body, capping the rate and aborting when the server stops;
:func:`status_fault` answers a ``status`` fault (429/503, ``Retry-After``).
See :mod:`bimcv_fetch.server.faults` for the fault kinds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bimcv_fetch.server.faults import Fault
from bimcv_fetch.server.protocol import Headers, StartResponse, error, http_date


class Abort(Exception):
    """Raised from a response body to make cheroot close the connection."""


def read_range(
    path: Path,
    first: int,
    length: int,
    flip: int | None,
    xor: int,
    *,
    chunk: int,
    rate_limit: float | None,
) -> Iterator[bytes]:
    """``length`` bytes of ``path`` from ``first``, the byte at ``flip`` XORed with ``xor``."""
    if rate_limit is not None:
        chunk = max(4096, min(chunk, int(rate_limit / 20)))
    with open(path, "rb", buffering=0) as f:
        f.seek(first)
        pos, left = first, length
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                raise Abort(f"{path.name} shrank while being served")
            if flip is not None and pos <= flip < pos + len(data):
                buf = bytearray(data)
                buf[flip - pos] ^= xor
                data = bytes(buf)
            pos += len(data)
            left -= len(data)
            yield data


def shape(
    chunks: Iterator[bytes],
    fault: Fault | None,
    write: Callable[[bytes], object],
    *,
    rate_limit: float | None,
    stop: threading.Event,
) -> Iterator[bytes]:
    """Send ``chunks``, applying drop/stall faults, the rate limit and server stop."""
    cut = None
    if fault is not None and fault.kind in ("drop", "truncate", "stall"):
        cut = fault.after
    rate = rate_limit
    sent = 0
    t0 = time.monotonic()
    try:
        for block in chunks:
            while True:
                if stop.is_set():
                    raise Abort("server stopping")
                if cut is not None and sent == cut:
                    assert fault is not None
                    write(b"")  # make sure status line and headers are out
                    if fault.kind == "stall":
                        stop.wait(fault.seconds)
                        if not fault.resume or stop.is_set():
                            raise Abort("stall fault")
                        cut = None
                    else:
                        raise Abort("drop fault")
                if not block:
                    break
                piece = block
                if cut is not None and sent + len(piece) > cut:
                    piece = block[: cut - sent]
                block = block[len(piece) :]
                if rate is not None:
                    delay = t0 + (sent + len(piece)) / rate - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        raise Abort("server stopping")
                sent += len(piece)
                yield piece
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def status_fault(start: StartResponse, fault: Fault) -> list[bytes]:
    """Answer a ``status`` fault: its HTTP code, with ``Retry-After`` when it has one."""
    extra: Headers = []
    if fault.retry_after is not None:
        if fault.retry_after_date:
            when = time.time() + float(fault.retry_after)
            extra.append(("Retry-After", http_date(when)))
        else:
            extra.append(("Retry-After", fault.retry_after))
    reason = "TooManyRequests" if fault.code == 429 else "ServiceUnavailable"
    return error(start, fault.code, reason, f"injected fault: HTTP {fault.code}", extra)


ERROR_PAGE = b"<html><body><h1>Service temporarily unavailable</h1></body></html>\n"


def error_page_fault(start: StartResponse) -> list[bytes]:
    """An ``error_page`` fault: a proxy's page sent as ``200 OK`` instead of the file."""
    start(
        "200 OK",
        [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(ERROR_PAGE)))],
    )
    return [ERROR_PAGE]
