"""Fault injection for the local share server.

A :class:`FaultPlan` is a FIFO queue of ``(file name or glob, Fault)``. Every GET
that would send a file's bytes (on any of the three endpoints, including the zip
stream of the share link) takes the first queued fault whose pattern matches the
file name, so "fail twice, then serve" is two ``add`` calls (or ``times=2``).
HEAD, PROPFIND and the share link's 302 redirect never consume faults. A fault
that does not apply to the request that took it (``wrong_start`` without a
``Range``, a header fault on a zip stream) is consumed without effect.

Kinds and their parameters:

==================  ==============================================================
``drop``            send ``after`` body bytes, then close the connection abruptly
``truncate``        alias of ``drop``
``stall``           send ``after`` bytes, go silent for ``seconds`` (interrupted by
                    server stop), then close (or go on when ``resume=True``)
``status``          answer ``code`` (429, 503 …) with ``Retry-After: retry_after``
                    (seconds) or, with ``retry_after_date=True``, the HTTP-date
                    now + ``retry_after`` seconds
``ignore_range``    answer 200 and the whole body to a Range request
``wrong_start``     answer 206 starting ``delta`` bytes after (or before) the asked start
``flip_byte``       XOR the byte at absolute file offset ``offset`` with ``xor``
``change_etag``     give the file a new ETag from now on (persistent)
``gzip_header``     add ``Content-Encoding: gzip`` without changing the bytes
``error_page``      a proxy's HTML page sent as ``200 OK`` instead of the file
==================  ==============================================================

Plans can be loaded from JSON or TOML (:meth:`FaultPlan.from_file`)::

    [[faults]]
    file = "covid19_posi_subjects_part*.tar.gz"
    kind = "drop"
    after = 1048576
    times = 2

    [[faults]]
    file = "covid19_posi_head.tar.gz"
    kind = "status"
    code = 429
    retry_after = "2"

(JSON: ``{"faults": [{...}, ...]}`` or a bare list of the same objects.)
"""

from __future__ import annotations

import fnmatch
import json
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from bimcv_fetch.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Fault", "FaultKind", "FaultPlan"]

FaultKind = Literal[
    "drop",
    "truncate",
    "stall",
    "status",
    "ignore_range",
    "wrong_start",
    "flip_byte",
    "change_etag",
    "gzip_header",
    "error_page",
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


@dataclass(frozen=True)
class Fault:
    """One misbehaviour. Only the parameters of its ``kind`` matter."""

    kind: FaultKind
    after: int = 0  # drop / truncate / stall: body bytes sent first
    seconds: float = 5.0  # stall: how long to stay silent
    resume: bool = False  # stall: go on sending after the silence instead of closing
    code: int = 503  # status
    retry_after: str | None = None  # status: Retry-After seconds ("2")
    retry_after_date: bool = False  # status: send now + retry_after as an HTTP-date
    delta: int = 512  # wrong_start: Content-Range start = asked start + delta
    offset: int = 0  # flip_byte: absolute file offset
    xor: int = 0xFF  # flip_byte: mask

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ConfigError(f"unknown fault kind {self.kind!r}", hint=", ".join(FAULT_KINDS))
        if self.after < 0 or self.seconds < 0 or self.offset < 0:
            raise ConfigError(f"fault {self.kind}: negative parameter")
        if not 0 < self.xor < 256:
            raise ConfigError(f"fault {self.kind}: xor must be 1..255")
        if self.kind == "status" and not 100 <= self.code <= 599:
            raise ConfigError(f"fault status: bad HTTP code {self.code}")

    @property
    def closes_early(self) -> bool:
        """True for the kinds that cut the body short."""
        return self.kind in ("drop", "truncate") or (self.kind == "stall" and not self.resume)

    # Shorthands -------------------------------------------------------------

    @classmethod
    def drop(cls, after: int = 0) -> Fault:
        return cls("drop", after=after)

    @classmethod
    def stall(cls, after: int = 0, seconds: float = 5.0, *, resume: bool = False) -> Fault:
        return cls("stall", after=after, seconds=seconds, resume=resume)

    @classmethod
    def http(cls, code: int = 503, retry_after: str | None = None, *, date: bool = False) -> Fault:
        return cls("status", code=code, retry_after=retry_after, retry_after_date=date)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"fault: unknown parameter(s) {', '.join(unknown)}")
        if "kind" not in data:
            raise ConfigError("fault: missing 'kind'")
        values = dict(data)
        if values.get("retry_after") is not None:
            values["retry_after"] = str(values["retry_after"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"fault: {exc}") from exc


@dataclass(frozen=True)
class _Entry:
    pattern: str
    fault: Fault


class FaultPlan:
    """A thread-safe FIFO of faults keyed by file name or glob."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Entry] = []
        self._taken: list[tuple[str, Fault]] = []

    def add(self, pattern: str, fault: Fault | FaultKind, times: int = 1) -> FaultPlan:
        """Queue ``fault`` ``times`` times for files matching ``pattern``; returns self."""
        if isinstance(fault, str):
            fault = Fault(fault)
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._queue.extend(_Entry(pattern, fault) for _ in range(times))
        return self

    def take(self, name: str) -> Fault | None:
        """Remove and return the first queued fault matching ``name`` (None if none)."""
        with self._lock:
            for i, entry in enumerate(self._queue):
                if entry.pattern == name or fnmatch.fnmatchcase(name, entry.pattern):
                    del self._queue[i]
                    self._taken.append((name, entry.fault))
                    return entry.fault
        return None

    def pending(self, name: str | None = None) -> int:
        """How many faults are still queued (for ``name`` only, when given)."""
        with self._lock:
            if name is None:
                return len(self._queue)
            return sum(
                1 for e in self._queue if e.pattern == name or fnmatch.fnmatchcase(name, e.pattern)
            )

    @property
    def taken(self) -> list[tuple[str, Fault]]:
        """The faults consumed so far, as (file name, fault), oldest first."""
        with self._lock:
            return list(self._taken)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._taken.clear()

    def __len__(self) -> int:
        return self.pending()

    # Loading ----------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Any) -> FaultPlan:
        """Build from ``{"faults": [...]}`` or a bare list of fault tables.

        Each table has ``file`` (name or glob), ``kind``, optional ``times`` and the
        kind's parameters.
        """
        items = data.get("faults", []) if isinstance(data, Mapping) else data
        if not isinstance(items, list):
            raise ConfigError("fault plan: expected a list of faults")
        plan = cls()
        for n, item in enumerate(items, start=1):
            if not isinstance(item, Mapping):
                raise ConfigError(f"fault plan: entry {n} is not a table")
            raw = dict(item)
            pattern = raw.pop("file", None)
            times = raw.pop("times", 1)
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"fault plan: entry {n} needs a 'file' name or glob")
            if not isinstance(times, int) or times < 1:
                raise ConfigError(f"fault plan: entry {n}: 'times' must be a positive integer")
            try:
                plan.add(pattern, Fault.from_dict(raw), times=times)
            except ConfigError as exc:
                raise ConfigError(f"fault plan: entry {n}: {exc.message}") from exc
        return plan

    @classmethod
    def from_file(cls, path: Path | str) -> FaultPlan:
        """Load a plan from a ``.json`` or ``.toml`` file (decided by the suffix,
        JSON when the suffix is neither)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read fault plan {path}: {exc.strerror}") from exc
        try:
            data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"fault plan {path}: {exc}") from exc
        return cls.from_data(data)
