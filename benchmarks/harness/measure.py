"""Run commands, timed, and collect paired measurements.

Every command runs as a child process in its own session. Its wall time is
taken around spawn and wait; its CPU time (user + sys) comes from ``os.wait4``,
whose ``rusage`` covers the child *and every descendant it waited for* (a shell
script's curl/tar/pigz processes included).

Peak memory does **not** come from that ``wait4``: Linux's ``ru_maxrss`` of a
process includes the RSS high-water mark of the memory image it had before
``exec`` — for a child spawned by this harness (vfork/fork), the harness's own
RSS (tens of MiB, growing with the share server's threads). So every command
is started through GNU ``/usr/bin/time -f %M``: ``time`` (about 1 MiB) forks
the command, and reports the command's ``ru_maxrss`` from its own ``wait4``.
That is the largest RSS of any single process of the command's tree, not the
sum: right for bimcv-fetch (one process, threads), and for anchors that run
tools one after another; for anchors that run processes side by side it is the
largest of them (the anchors have no memory target). Without ``/usr/bin/time``
the peak RSS is reported as unknown.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Measurement:
    wall: float  # seconds
    user: float  # seconds of user CPU (child + waited-for descendants)
    sys: float  # seconds of system CPU
    maxrss_kib: int  # peak RSS of the largest process of the tree, KiB
    rc: int  # exit code (negative: killed by that signal)
    error: str | None = None  # tail of the output when rc != 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_kib / 1024 if self.maxrss_kib >= 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wall_s": round(self.wall, 4),
            "user_s": round(self.user, 4),
            "sys_s": round(self.sys, 4),
            "cpu_s": round(self.cpu, 4),
            "maxrss_mib": round(self.maxrss_mib, 2) if self.maxrss_kib >= 0 else None,
            "rc": self.rc,
        }
        if self.error:
            out["error"] = self.error
        if self.extra:
            out["extra"] = self.extra
        return out


# A command that exists on the CLI but whose implementation has not landed yet.
_NOT_THERE = re.compile(r"ImportError|ModuleNotFoundError|NotImplementedError|No such command")


def _find_time() -> str | None:
    """GNU time (``-f %M``), or None."""
    path = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if path is None:
        return None
    try:
        r = subprocess.run(
            [path, "-f", "%M", "true"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path if r.returncode == 0 and r.stderr.strip().isdigit() else None


TIME = _find_time()


def _read_rss(path: Path) -> int:
    """The command's ru_maxrss in KiB as GNU time wrote it (-1: unknown)."""
    try:
        lines = path.read_text().split()
    except OSError:
        return -1
    for tok in reversed(lines):
        if tok.isdigit():
            return int(tok)
    return -1


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-limit:].decode("utf-8", "replace").strip()
    return text


def run_measured(
    argv: Sequence[str],
    *,
    log: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Measurement:
    """Run ``argv`` (stdout and stderr to ``log``), wait for it with ``os.wait4``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log.with_suffix(".rss")
    with contextlib.suppress(FileNotFoundError):
        rss_file.unlink()
    full = list(argv)
    if TIME is not None:
        full = [TIME, "-f", "%M", "-o", str(rss_file), "--", *full]
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # Popen must not wait for it again
    # Anything the command left running in its session (it should not) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    error = None
    if rc != 0:
        error = _tail(log) or f"exit code {rc}"
        if timed_out.is_set():
            error = f"timed out after {timeout:.0f} s; " + error
    return Measurement(
        wall=wall,
        user=ru.ru_utime,
        sys=ru.ru_stime,
        maxrss_kib=_read_rss(rss_file),
        rc=rc,
        error=error,
    )


# --------------------------------------------------------------------------- statistics


def summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# --------------------------------------------------------------------------- paired rows


@dataclass
class Side:
    """One command of a bench row. The first side of a row is bimcv-fetch."""

    key: str  # short id: "bimcv-fetch", "aria2c", "tar-pigz", …
    label: str  # the command, as shown in the report
    argv: Callable[[], list[str]]
    prepare: Callable[[], None] | None = None  # untimed, before each run
    inspect: Callable[[], dict[str, Any]] | None = None  # untimed, after each run
    cleanup: Callable[[], None] | None = None  # untimed, after each run
    unavailable: str | None = None  # why this side cannot run (None: it can)


@dataclass
class SideResult:
    key: str
    label: str
    status: str = "ok"  # ok | not available | failed
    reason: str | None = None
    warmup: list[Measurement] = field(default_factory=list)
    runs: list[Measurement] = field(default_factory=list)
    inspect: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        ok = [m for m in self.runs if m.rc == 0]
        return {
            "wall_s": summary([m.wall for m in ok]),
            "cpu_s": summary([m.cpu for m in ok]),
            "maxrss_mib": summary([m.maxrss_mib for m in ok if m.maxrss_kib >= 0]),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "command": self.label,
            "status": self.status,
            "reason": self.reason,
            "stats": self.stats(),
            "inspect": self.inspect,
            "warmup": [m.to_json() for m in self.warmup],
            "runs": [m.to_json() for m in self.runs],
        }


def run_pairs(
    sides: Sequence[Side],
    *,
    runs: int,
    warmup: int,
    log_dir: Path,
    timeout: float,
    env: dict[str, str],
    echo: Callable[[str], None],
    name: str,
) -> list[SideResult]:
    """Warm-up rounds, then ``runs`` rounds; each round runs every available side once.

    The order inside a round rotates (A B C, B C A, C A B, …) so that no side
    always runs right after the same other side; round i of every side forms the
    i-th pair. A side that fails is dropped from later rounds (its result says why).
    """
    results = [SideResult(s.key, s.label) for s in sides]
    active = []
    for s, r in zip(sides, results, strict=True):
        if s.unavailable:
            r.status, r.reason = "not available", s.unavailable
        else:
            active.append((s, r))
    total_rounds = warmup + runs
    for rnd in range(total_rounds):
        live = [(s, r) for s, r in active if r.status == "ok"]
        if not live:
            break
        k = rnd % len(live)
        order = live[k:] + live[:k]
        for s, r in order:
            if s.prepare is not None:
                s.prepare()
            tag = f"{name}.{s.key}.{rnd}"
            m = run_measured(s.argv(), log=log_dir / f"{tag}.log", timeout=timeout, env=env)
            if m.rc == 0 and s.inspect is not None:
                m.extra = s.inspect()
                if not r.inspect:
                    r.inspect = m.extra
            if s.cleanup is not None:
                s.cleanup()
            # Write back (and discard) what this run left before the next one starts, so
            # no side pays for the previous side's writeback. Untimed.
            os.sync()
            phase = "warm-up" if rnd < warmup else f"run {rnd - warmup + 1}/{runs}"
            echo(
                f"  {name:<16} {s.key:<14} {phase:<10} "
                f"wall {m.wall:7.2f} s  cpu {m.cpu:7.2f} s  rss {m.maxrss_mib:7.1f} MiB"
                + ("" if m.rc == 0 else f"  FAILED rc={m.rc}")
            )
            (r.warmup if rnd < warmup else r.runs).append(m)
            if m.rc != 0:
                r.status = "failed"
                r.reason = m.error
                if not any(x.rc == 0 for x in r.warmup + r.runs) and _NOT_THERE.search(
                    m.error or ""
                ):
                    r.status = "not available"
                    r.reason = "not implemented yet: " + (m.error or "").strip().splitlines()[-1]
    return results


def paired_ratios(a: SideResult, b: SideResult, attr: str = "wall") -> list[float]:
    """``a ÷ b`` round by round, over the rounds both completed."""
    out = []
    for ma, mb in zip(a.runs, b.runs, strict=False):
        if ma.rc == 0 and mb.rc == 0:
            va, vb = getattr(ma, attr), getattr(mb, attr)
            if vb > 0:
                out.append(va / vb)
    return out
