"""Pure helpers for the HTTP headers a ranged download depends on.

No I/O and no clock of their own: every function takes what it needs as
arguments, so each branch can be tested on its own.
"""

from __future__ import annotations

import email.utils
import math
import re
from datetime import timezone
from typing import Protocol

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)\s*-\s*(\d+)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*\s*/\s*(\d+)\s*$", re.IGNORECASE)
_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes START-END/TOTAL`` → ``(start, end, total)``; ``total`` is None for ``/*``.

    None for anything else: a missing header, another unit, the unsatisfied
    form ``bytes */TOTAL``, an end before the start, or an end at or beyond the total.
    """
    if not value:
        return None
    m = _CONTENT_RANGE.match(value)
    if m is None:
        return None
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start:
        return None
    if total is not None and end >= total:
        return None
    return start, end, total


def parse_unsatisfied_range(value: str | None) -> int | None:
    """The size in a 416's ``Content-Range: bytes */SIZE``, or None."""
    if not value:
        return None
    m = _UNSATISFIED_RANGE.match(value)
    return int(m.group(1)) if m else None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header at time ``now`` (Unix seconds).

    Accepts delta-seconds (``120``) and an HTTP-date (``Wed, 21 Oct 2015
    07:28:00 GMT``); a date in the past gives 0. None when missing or unparsable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if re.fullmatch(r"[+-]?\d+(\.\d+)?", text):
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # very old Pythons return None instead of raising
        return None  # pragma: no cover
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


class Random(Protocol):
    def random(self) -> float: ...


def backoff_delay(attempt: int, base: float, maximum: float, rng: Random) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(maximum, base·2^(attempt-1)))``.

    ``attempt`` counts failures in a row, from 1. Never negative, never above ``maximum``.
    """
    if attempt < 1 or base <= 0 or maximum <= 0:
        return 0.0
    exponent = min(attempt - 1, 62)  # 2**62 · base is beyond any sane maximum
    ceiling = min(maximum, base * float(2**exponent))
    return ceiling * rng.random()


def parse_oc_checksum(value: str | None, algorithm: str = "SHA1") -> str | None:
    """The hex digest for ``algorithm`` in Nextcloud's ``OC-Checksum`` header, lower-case.

    The header holds one or more ``ALGO:hex`` items separated by spaces
    (``SHA1:… MD5:… ADLER32:…``). Only a well-formed 40-digit SHA1 is returned.
    """
    if not value:
        return None
    wanted = algorithm.upper()
    for item in value.replace(",", " ").split():
        algo, sep, digest = item.partition(":")
        if sep and algo.strip().upper() == wanted:
            digest = digest.strip()
            if wanted == "SHA1" and not _HEX40.match(digest):
                return None
            return digest.lower()
    return None


def parse_content_length(value: str | None) -> int | None:
    """A non-negative ``Content-Length``, or None when missing or malformed."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        return None
    return int(text)


def is_weak_etag(etag: str) -> bool:
    """``W/"…"``: a weak validator, which ``If-Range`` must not carry (RFC 9110 13.1.5)."""
    return etag.strip().startswith("W/")
