"""Locks: exclusive create, stale takeover (atomic), heartbeat, other hosts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from bimcv_fetch.errors import LockedError
from bimcv_fetch.store import FileLock, _read_lock


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_second_lock_is_refused_with_pid_and_host(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    with FileLock(path), pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        FileLock(path).acquire()
    assert not path.exists()


def test_stale_lock_of_dead_process_taken_over(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "a.lock"
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}))
    lock = FileLock(path)
    lock.acquire()
    info = _read_lock(path)
    assert info is not None and info.pid == os.getpid() and info.token == lock.token
    lock.release()
    assert not path.exists()


def test_takeover_gives_back_a_lock_that_changed_meanwhile(tmp_path: Path) -> None:
    """The race: B judged the lock stale, A replaced it with a live one, B must not steal it."""
    import socket

    path = tmp_path / "a.lock"
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}
    path.write_text(json.dumps(stale))
    judged = _read_lock(path)
    a = FileLock(path)
    path.unlink()
    a.acquire()  # A got there first
    b = FileLock(path)
    assert b._take_over(judged) is False
    assert _read_lock(path) is not None and _read_lock(path).token == a.token  # type: ignore[union-attr]
    a.release()


def test_other_host_lock_honoured_while_its_heartbeat_lives(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    path.write_text(json.dumps({"pid": 1, "host": "node017", "since": 0}))
    with pytest.raises(LockedError, match="node017"):
        FileLock(path, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))  # the heartbeat stopped two minutes ago
    lock = FileLock(path, stale_after=60)
    lock.acquire()
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    lock = FileLock(path, heartbeat=0.05)
    lock.acquire()
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.monotonic() + 5
    while time.time() - path.stat().st_mtime > 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert time.time() - path.stat().st_mtime < 100
    lock.release()
