"""The small event protocol the core emits; progress.py renders it.

The core never prints. Long-running functions take an optional ``Reporter``
and call it with :class:`Event` objects; the CLI passes a renderer (rich,
plain lines, JSON lines or nothing), the library API a tqdm one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """``kind`` names what happened; ``name`` the archive or file it concerns.

    Kinds used by the core:
      overall    total=bytes to transfer in all, data["files"]=count
      start      name, total=expected size, done=bytes already on disk
      advance    name, done=bytes added since the last advance (negative when a
                 transfer restarts from zero and throws bytes away)
      retry      name, data["reason"], data["delay"]
      finish     name, data["status"] ("ok", "skipped", "failed"), data["sha1"]
      fail       name, data["error"], data["exit_code"]
      message    data["text"]: a line for the human
      summary    data: the command's totals
    """

    kind: str
    name: str = ""
    total: int | None = None
    done: int = 0
    data: dict[str, Any] = field(default_factory=dict)


Reporter = Callable[[Event], None]


def null_reporter(event: Event) -> None:
    return None


class ThreadSafeReporter:
    """Serialises calls from worker threads into one reporter."""

    def __init__(self, inner: Reporter) -> None:
        self._inner = inner
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._inner(event)


class Collector:
    """A reporter that keeps every event (tests, and the library API)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]
