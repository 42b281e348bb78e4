"""A total download rate cap shared by every transfer (``--limit-rate``)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from bimcv_fetch.errors import ConfigError

_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?(?:/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_rate(text: str) -> int:
    """``"10M"`` → bytes per second, as curl's ``--limit-rate`` reads it.

    A number with an optional suffix K, M, G or T (powers of 1024, any case);
    a trailing ``B``, ``iB`` or ``/s`` is tolerated (``10MB/s``, ``1.5MiB``).
    Raises :class:`ConfigError` on anything else, and on zero.
    """
    m = _RATE.match(text or "")
    if m is None:
        raise ConfigError(
            f"invalid rate {text!r}",
            hint="use bytes per second with an optional K, M or G suffix, e.g. 10M",
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    rate = int(value)
    if rate < 1:
        raise ConfigError(f"invalid rate {text!r}: must be at least 1 byte per second")
    return rate


class RateLimiter:
    """A thread-safe token bucket: all transfers together get at most ``rate`` bytes/s.

    Callers report the bytes they just received with :meth:`consume`, which
    sleeps as long as needed to keep the average under the cap. Tokens may
    go negative (a debt), so one big chunk never blocks forever and threads
    that share the bucket queue up fairly. ``burst`` (default: one second's
    worth) is how much unused allowance may be saved up.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._rate = float(rate)
        self._burst = float(burst) if burst is not None else self._rate
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self._burst
        self._last = clock()

    @property
    def rate(self) -> float:
        return self._rate

    def read_size(self, chunk: int) -> int:
        """A read size that keeps the flow smooth under this cap (about 1/8 s of data)."""
        return max(16 << 10, min(chunk, int(self._rate / 8)))

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes from the bucket; returns the seconds to wait before using them."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        return debt / self._rate if debt > 0 else 0.0

    def consume(self, n: int, cancel: threading.Event | None = None) -> bool:
        """Account for ``n`` bytes, sleeping if over the cap. False if ``cancel`` was set."""
        delay = self.reserve(n)
        if delay <= 0:
            return not (cancel is not None and cancel.is_set())
        if cancel is not None:
            return not cancel.wait(delay)
        time.sleep(delay)
        return True
