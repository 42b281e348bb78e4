"""What the benches ran on: CPU, memory, kernel, Python, tool versions, isal."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (r.stdout or r.stderr or "").strip()
    return text.splitlines()[0].strip() if text else None


def _cpu() -> dict[str, Any]:
    model, flags = None, ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        model = m.group(1).strip()
    m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if m:
        flags = m.group(1)
    wanted = ("sha_ni", "avx2", "avx512f", "pclmulqdq")
    return {
        "model": model or platform.processor() or None,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "flags": [f for f in wanted if f in flags.split()],
    }


def _memory() -> str | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def _isal() -> str | None:
    try:
        import isal
    except ImportError:
        return None
    return str(getattr(isal, "__version__", "present"))


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _disk(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(path)}
    try:
        st = os.statvfs(path)
        out["free_gib"] = round(st.f_bavail * st.f_frsize / 2**30, 1)
    except OSError:
        pass
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mnt) and len(mnt) >= len(out.get("mount", "")):
                out.update(mount=mnt, device=dev, fstype=fstype)
    except OSError:
        pass
    return out


def describe(repo: Path, work: Path, command: list[str]) -> dict[str, Any]:
    import bimcv_fetch

    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", "src")
    return {
        "cpu": _cpu(),
        "memory": _memory(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "bimcv_fetch": {
            "version": bimcv_fetch.__version__,
            "command": " ".join(command),
            "commit": _git(repo, "rev-parse", "--short", "HEAD"),
            "src_modified": bool(dirty),
        },
        "isal": _isal(),
        "tools": {
            "curl": _first_line(["curl", "--version"]),
            "aria2c": _first_line(["aria2c", "--version"]),
            "tar": _first_line(["tar", "--version"]),
            "pigz": _first_line(["pigz", "--version"]),
            "gzip": _first_line(["gzip", "--version"]),
            "nginx": _first_line(["nginx", "-v"]),
            "openssl": _first_line(["openssl", "version"]),
            "sha1sum": _first_line(["sha1sum", "--version"]),
        },
        "disk": _disk(work),
    }


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(x) for x in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]), idle


def busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy over ``seconds`` (other processes: the harness is idle then)."""
    import time

    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1 - (b[1] - a[1]) / (b[0] - a[0])


def wait_idle(limit: float, timeout: float, echo: Any) -> float | None:
    """Wait (up to ``timeout`` s) until the machine is less than ``limit`` busy; last reading."""
    import time

    deadline = time.monotonic() + timeout
    busy = busy_fraction()
    while busy is not None and busy > limit and time.monotonic() < deadline:
        echo(f"  machine {busy:.0%} busy (other processes); waiting for < {limit:.0%}")
        time.sleep(4)
        busy = busy_fraction()
    return busy
