"""Renderers of core events: rich bars, plain lines, JSON lines, tqdm, or nothing.

The only module that imports rich or tqdm.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from bimcv_fetch.events import Event


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def json_line(obj: dict[str, Any], stream: IO[str] | None = None) -> None:
    out = stream or sys.stdout
    out.write(json.dumps(obj, default=str, sort_keys=False) + "\n")
    out.flush()


class JsonReporter:
    """One JSON object a line on stdout; byte advances at most once a second per file."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 1.0) -> None:
        self.stream = stream or sys.stdout
        self.interval = interval
        self._done: dict[str, int] = {}
        self._total: dict[str, int | None] = {}
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, e: Event) -> None:
        with self._lock:
            if e.kind == "start":
                self._done[e.name] = e.done
                self._total[e.name] = e.total
            if e.kind == "advance":
                self._done[e.name] = self._done.get(e.name, 0) + e.done
                now = time.monotonic()
                if now - self._last.get(e.name, 0.0) < self.interval:
                    return
                self._last[e.name] = now
                json_line(
                    {
                        "event": "progress",
                        "name": e.name,
                        "done": self._done[e.name],
                        "total": self._total.get(e.name),
                    },
                    self.stream,
                )
                return
            obj: dict[str, Any] = {"event": e.kind}
            if e.name:
                obj["name"] = e.name
            if e.total is not None:
                obj["total"] = e.total
            if e.done:
                obj["done"] = e.done
            obj.update(e.data)
            json_line(obj, self.stream)


class PlainReporter:
    """Plain lines on stderr (not a terminal): starts, ends, retries, a percent now and then."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._done: dict[str, int] = {}
        self._total: dict[str, int | None] = {}
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def _say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, e: Event) -> None:
        with self._lock:
            if e.kind == "start":
                self._done[e.name] = e.done
                self._total[e.name] = e.total
                verb = str(e.data.get("verb") or e.data.get("stage") or "fetch")
                resumed = ""
                if e.done and verb == "fetch":
                    resumed = f", resuming at {human_bytes(e.done)}"
                self._say(f"{verb:<6} {e.name} ({human_bytes(e.total)}{resumed})")
            elif e.kind == "advance":
                self._done[e.name] = self._done.get(e.name, 0) + e.done
                now = time.monotonic()
                if now - self._last >= self.interval:
                    self._last = now
                    parts = []
                    for name, done in self._done.items():
                        total = self._total.get(name)
                        pct = f"{100 * done / total:.0f}%" if total else human_bytes(done)
                        parts.append(f"{name} {pct}")
                    self._say("       " + ", ".join(parts))
            elif e.kind == "finish":
                self._done.pop(e.name, None)
                self._total.pop(e.name, None)
                status = "verified earlier" if e.data.get("cached") else e.data.get("status", "ok")
                self._say(f"done   {e.name} ({status})")
            elif e.kind == "retry":
                self._say(
                    f"retry  {e.name}: {e.data.get('reason', '')}; again in "
                    f"{float(e.data.get('delay', 0)):.1f}s"
                )
            elif e.kind == "fail":
                self._done.pop(e.name, None)
                self._say(f"FAILED {e.name}: {e.data.get('error', '')}")
            elif e.kind == "message":
                self._say(str(e.data.get("text", "")))


class RichReporter:
    """A bar per active file and an overall bar with bytes, rate and ETA (a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._overall: Any = None
        self._lock = threading.Lock()
        self._started = False

    def _ensure(self) -> None:
        if not self._started:
            self.progress.start()
            self._started = True

    def __call__(self, e: Event) -> None:
        with self._lock:
            if e.kind == "overall":
                self._ensure()
                self._overall = self.progress.add_task("[bold]total", total=e.total or None)
            elif e.kind == "start":
                self._ensure()
                tid = self.progress.add_task(e.name, total=e.total or None, completed=e.done)
                self._tasks[e.name] = tid
                if self._overall is not None and e.done:
                    self.progress.advance(self._overall, e.done)
            elif e.kind == "advance":
                task = self._tasks.get(e.name)
                if task is not None:
                    self.progress.advance(task, e.done)
                if self._overall is not None:
                    self.progress.advance(self._overall, e.done)
            elif e.kind in ("finish", "fail"):
                tid = self._tasks.pop(e.name, None)
                if tid is not None:
                    self.progress.remove_task(tid)
                if e.kind == "fail":
                    self.console.print(f"[red]FAILED[/red] {e.name}: {e.data.get('error', '')}")
                elif e.data.get("status") not in (None, "ok"):
                    self.console.print(f"{e.name}: {e.data.get('status')}")
            elif e.kind == "retry":
                self.console.print(
                    f"[yellow]retry[/yellow] {e.name}: {e.data.get('reason', '')} "
                    f"(again in {float(e.data.get('delay', 0)):.1f}s)"
                )
            elif e.kind == "message":
                self.console.print(str(e.data.get("text", "")))

    def close(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False


class TqdmReporter:
    """tqdm bars for the library API (renders in notebooks via tqdm.auto)."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, e: Event) -> None:
        with self._lock:
            if e.kind == "start":
                self._bars[e.name] = self._tqdm(
                    total=e.total,
                    initial=e.done,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=e.name,
                    leave=False,
                )
            elif e.kind == "advance" and e.name in self._bars:
                self._bars[e.name].update(e.done)
            elif e.kind in ("finish", "fail") and e.name in self._bars:
                self._bars.pop(e.name).close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def make_reporter(*, json_mode: bool, quiet: bool) -> Any:
    """The CLI's choice: JSON lines, nothing, rich on a terminal, plain lines otherwise."""
    if json_mode:
        return JsonReporter()
    if quiet:
        return None
    if sys.stderr.isatty():
        return RichReporter()
    return PlainReporter()
