"""The dataset folder on disk: layout, partial-file state, locks, stamps, receipts.

<dest>/archives/NAME                 finished archives, under their server names
<dest>/archives/NAME.part            bytes in flight
<dest>/archives/NAME.part.state      JSON: url, size, etag, sha1 (beside the .part)
<dest>/manifests/                    sha1sums*.txt, *.tar-tvf.txt, share.json (cached)
<dest>/<top folder>/…                the extracted MIDS tree (or under --out)
<dest>/.bimcv-fetch/locks/NAME.lock  one per archive being written (exclusive create)
<dest>/.bimcv-fetch/verified/NAME.json   proof an archive's SHA1 was checked
<dest>/.bimcv-fetch/receipts/NAME.json   what extraction wrote from an archive
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bimcv_fetch.errors import DiskError, LockedError

PART_SUFFIX = ".part"
STATE_SUFFIX = ".part.state"
STATE_DIR = ".bimcv-fetch"


@dataclass(frozen=True)
class Layout:
    dest: Path
    out: Path | None = None

    @property
    def archives(self) -> Path:
        return self.dest / "archives"

    @property
    def manifests(self) -> Path:
        return self.dest / "manifests"

    @property
    def state(self) -> Path:
        return self.dest / STATE_DIR

    @property
    def tree(self) -> Path:
        """Where member paths (``covid19_posi/…``) are extracted to."""
        return self.out if self.out is not None else self.dest

    def archive(self, name: str) -> Path:
        return self.archives / name

    def part(self, name: str) -> Path:
        return self.archives / (name + PART_SUFFIX)

    def part_state(self, name: str) -> Path:
        return self.archives / (name + STATE_SUFFIX)

    def lock(self, name: str) -> Path:
        return self.state / "locks" / (name + ".lock")

    def verified_stamp(self, name: str) -> Path:
        return self.state / "verified" / (name + ".json")

    def receipt(self, name: str) -> Path:
        return self.state / "receipts" / (name + ".json")

    def manifest(self, name: str) -> Path:
        return self.manifests / name

    def ensure(self) -> None:
        for d in (self.archives, self.manifests, self.state):
            mkdirs(d)


def mkdirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiskError(f"cannot create {path}: {exc.strerror or exc}") from exc


def disk_error(path: Path, exc: OSError) -> DiskError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(f"no space left on the device holding {path}")
    if exc.errno == errno.EFBIG:
        return DiskError(f"file too large for {path} (file size limit reached)")
    return DiskError(f"I/O error on {path}: {exc.strerror or exc}")


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one."""
    mkdirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(path, exc) from exc
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (never raises)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ partial files


@dataclass(frozen=True)
class PartState:
    """What a ``.part`` file was started from; a resume needs all of it to still hold."""

    url: str
    size: int
    etag: str | None
    sha1: str | None

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> PartState | None:
        raw = read_json(path)
        if not isinstance(raw, dict):
            return None
        try:
            return cls(
                url=str(raw["url"]),
                size=int(raw["size"]),
                etag=raw.get("etag"),
                sha1=raw.get("sha1"),
            )
        except (KeyError, TypeError, ValueError):
            return None


# ------------------------------------------------------------------ verified stamps


def write_verified(layout: Layout, name: str, sha1: str) -> None:
    st = layout.archive(name).stat()
    atomic_write_json(
        layout.verified_stamp(name),
        {"name": name, "sha1": sha1, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
    )


def is_verified(layout: Layout, name: str, sha1: str | None) -> bool:
    """True when a stamp proves this very file (size, mtime) had the published SHA1."""
    stamp = read_json(layout.verified_stamp(name))
    if not isinstance(stamp, dict) or sha1 is None or stamp.get("sha1") != sha1:
        return False
    try:
        st = layout.archive(name).stat()
    except OSError:
        return False
    return bool(stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns)


def clear_verified(layout: Layout, name: str) -> None:
    with contextlib.suppress(OSError):
        layout.verified_stamp(name).unlink()


# ------------------------------------------------------------------ locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    since: float
    command: str = ""
    token: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}"


def _read_lock(path: Path) -> LockInfo | None:
    raw = read_json(path)
    if not isinstance(raw, dict):
        return None
    try:
        return LockInfo(
            int(raw["pid"]),
            str(raw["host"]),
            float(raw["since"]),
            str(raw.get("command", "")),
            str(raw.get("token", "")),
        )
    except (KeyError, TypeError, ValueError):
        return None


class FileLock:
    """An exclusive-create lock file holding pid, host and a token; works on NFS and Lustre.

    While held, a heartbeat thread touches the file every ``heartbeat`` seconds.
    A lock is stale when its holder is a dead process on this host, or, from
    another host (whose processes we cannot see), when its heartbeat stopped
    ``stale_after`` seconds ago. A stale lock is taken over atomically: it is
    renamed aside, and given back if what was moved is not what was judged stale.
    """

    def __init__(
        self,
        path: Path,
        *,
        command: str = "",
        stale_after: float = 600.0,
        heartbeat: float = 30.0,
    ) -> None:
        self.path = path
        self.command = command
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.held = False
        self.token = f"{os.getpid()}-{threading.get_ident()}-{time.time_ns()}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _age(self, path: Path) -> float | None:
        try:
            return time.time() - path.stat().st_mtime
        except OSError:
            return None

    def _is_stale(self, info: LockInfo | None, age: float | None) -> bool:
        if age is None:
            return True  # gone already
        if info is None:
            return age > 30  # half-written (a crash between create and write)
        if info.host == socket.gethostname() and info.pid == os.getpid():
            return False  # this process holds it (another thread)
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return True
        # Another host, or a live pid that may be a reused one: trust the heartbeat.
        return age > self.stale_after

    def _take_over(self, judged: LockInfo | None) -> bool:
        """Move a stale lock aside; False (and the lock given back) if it changed meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone removed it: just try to create ours
        except OSError as exc:
            raise disk_error(self.path, exc) from exc
        moved = _read_lock(aside)
        if moved != judged:
            # A live holder's fresh lock was moved: give it back (unless yet another exists).
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            with contextlib.suppress(OSError):
                aside.unlink()
            return False
        with contextlib.suppress(OSError):
            aside.unlink()
        return True

    def acquire(self) -> None:
        mkdirs(self.path.parent)
        payload = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.time(),
                "command": self.command,
                "token": self.token,
            }
        ).encode()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_lock(self.path)
                if self._is_stale(info, self._age(self.path)) and self._take_over(info):
                    continue
                info = _read_lock(self.path) or info
                who = info.describe() if info else "another process"
                raise LockedError(
                    f"{self.path.name[:-5]} is locked by {who}",
                    hint=f"wait for it, or remove {self.path} if that process is gone",
                ) from None
            except OSError as exc:
                raise disk_error(self.path, exc) from exc
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            self._start_heartbeat()
            return
        raise LockedError(f"could not take the lock {self.path}")

    def _mine(self) -> bool:
        raw = read_json(self.path)
        return isinstance(raw, dict) and raw.get("token") == self.token

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat):
                if not self._mine():
                    return  # taken over: do not keep someone else's lock alive
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._beat = threading.Thread(target=beat, name="bimcv-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        if self.held:
            self.held = False
            self._stop.set()
            if self._mine():
                with contextlib.suppress(OSError):
                    self.path.unlink()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def archive_lock(layout: Layout, name: str, command: str = "") -> Iterator[FileLock]:
    lock = FileLock(layout.lock(name), command=command)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


# ------------------------------------------------------------------ local state


def local_state(layout: Layout, name: str, sha1: str | None) -> str:
    """missing / partial / downloaded / verified / extracted, from disk alone."""
    receipt = read_json(layout.receipt(name))
    if isinstance(receipt, dict) and receipt.get("complete"):
        return "extracted"
    if layout.archive(name).exists():
        return "verified" if is_verified(layout, name, sha1) else "downloaded"
    if layout.part(name).exists():
        return "partial"
    return "missing"


def free_space(path: Path) -> int:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize
