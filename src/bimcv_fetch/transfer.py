"""One file from the share to disk, robustly: resume, retries, stalls, checksums.

:func:`fetch_file` writes ``NAME.part`` beside ``NAME.part.state`` (what the
partial file was started from) and, once every byte is there and the size and
SHA1 match, renames it to ``NAME``. What it guards against is described in
``docs/b2drop.md``; in short:

* resume with ``Range: bytes=N-`` and ``If-Range: <etag>``, accepting only a
  ``206`` whose ``Content-Range`` starts exactly at N; a ``200`` means "here is
  the whole file" (start again from zero), a ``206`` elsewhere is never
  appended, a ``416`` on a complete ``.part`` means "verify what you have";
* raw bytes only (``Accept-Encoding: identity``, no decoding of a
  ``Content-Encoding`` the server added);
* a read timeout is the stall timeout: a silent socket is dropped and the
  transfer resumes; connection errors, 429 and 5xx are retried with
  exponential backoff and full jitter, honouring ``Retry-After``;
* the SHA1 (and the caller's consumers) see every byte in order as it lands,
  the prefix of a resumed ``.part`` included; a mismatch is retried once from
  zero, then raised as :class:`ChecksumError`;
* the ``.part`` is only ever appended to with bytes received in order, so a
  ``kill -9`` at any moment leaves a file the next run can resume.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import requests
import urllib3

from bimcv_fetch import store
from bimcv_fetch.errors import ChecksumError, ConfigError, Interrupted, NetworkError
from bimcv_fetch.events import Event, Reporter
from bimcv_fetch.httputil import (
    backoff_delay,
    is_weak_etag,
    parse_content_length,
    parse_content_range,
    parse_oc_checksum,
    parse_retry_after,
    parse_unsatisfied_range,
)
from bimcv_fetch.ratelimit import RateLimiter, parse_rate
from bimcv_fetch.share import GZIP_MAGIC, PROTOCOLS, Share, check_status, looks_like_zip
from bimcv_fetch.store import Layout, PartState
from bimcv_fetch.stream import CHUNK, Consumer, Sha1Consumer

__all__ = [
    "FetchResult",
    "RateLimiter",
    "TransferOptions",
    "fetch_file",
    "parse_rate",
]

_GZIP_SUFFIXES = (".tar.gz", ".tgz", ".gz")
_RETRY_STATUSES = frozenset({408, 425, 429})
_UNKNOWN_SIZE = -1  # PartState.size when the server never said


@dataclass(frozen=True)
class TransferOptions:
    """How hard :func:`fetch_file` tries, and how it paces itself."""

    stall_timeout: float = 60.0  # no byte for this long → drop the request and resume
    connect_timeout: float = 20.0
    max_attempts: int = 8  # failures in a row; reset whenever a request delivered bytes
    backoff_base: float = 1.0  # exponential backoff with full jitter, in seconds
    backoff_max: float = 60.0
    max_retry_after: float = 300.0  # cap on a server's Retry-After
    chunk: int = CHUNK  # read, write and hash size
    min_rate: float = 1024.0  # bytes/s over a stall_timeout window, or the request is dropped
    sync_every: int = 256 << 20  # fsync the .part every this many bytes (0: only at the end)
    hash_thread: bool = True  # hash (and feed consumers) in a helper thread beside the writer


@dataclass(frozen=True)
class FetchResult:
    name: str
    size: int
    sha1: str
    resumed_from: int  # bytes of an earlier .part that made it into the file
    restarts: int  # times the transfer started again from zero
    attempts: int  # HTTP requests made
    bytes_transferred: int  # bytes received over the network by this call


# --------------------------------------------------------------------------- control flow


class _Retry(Exception):
    """This request failed; count it and try again after a pause."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Cancelled(Exception):
    pass


# --------------------------------------------------------------------------- byte feeding


class _Feeder:
    """Feeds the SHA1 and the caller's consumers, inline or from a helper thread.

    With a thread, the writer hands each chunk over a small bounded queue and
    goes back to the socket while the chunk is hashed (hashlib and most I/O
    release the GIL). An exception in a consumer is re-raised in the writer's
    thread at the next hand-over, or by :meth:`drain`.
    """

    _DEPTH = 4  # 4 MiB in flight between the writer and the hasher: enough to overlap

    def __init__(self, consumers: Sequence[Consumer], threaded: bool) -> None:
        self.consumers = list(consumers)
        self._threaded = threaded
        self._error: BaseException | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(self._DEPTH)
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            try:
                if data is None:
                    return
                if self._error is None:
                    for c in self.consumers:
                        c.feed(data)
            except BaseException as exc:
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error  # stays set (later chunks are skipped) until reset()

    def feed(self, data: bytes) -> None:
        if not self._threaded:
            for c in self.consumers:
                c.feed(data)
            return
        self._raise_error()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bimcv-hash", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def drain(self) -> None:
        """Wait until every chunk handed over has been fed; re-raise a consumer's error."""
        if self._thread is not None:
            self._queue.join()
        self._raise_error()

    def reset(self) -> None:
        with contextlib.suppress(Exception):
            self.drain()
        self._error = None
        for c in self.consumers:
            c.reset()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.join()
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None


# --------------------------------------------------------------------------- the transfer


class _Transfer:
    def __init__(
        self,
        session: requests.Session,
        share: Share,
        name: str,
        layout: Layout,
        *,
        size: int | None,
        sha1: str | None,
        etag: str | None,
        consumers: Sequence[Consumer],
        options: TransferOptions,
        limiter: RateLimiter | None,
        reporter: Reporter | None,
        cancel: threading.Event | None,
    ) -> None:
        if size is not None and size < 0:
            raise ValueError("size must be non-negative")
        self.session = session
        self.share = share
        self.name = name
        self.layout = layout
        self.opts = options
        self.limiter = limiter
        self.reporter = reporter
        self.cancel = cancel if cancel is not None else threading.Event()
        self.url = share.file_url(name)
        self.state_url = share.redact(self.url)
        self.part_path = layout.part(name)
        self.state_path = layout.part_state(name)
        self.final_path = layout.archive(name)

        self.expected_sha1 = sha1.lower() if sha1 else None
        self.size = size  # expected size: the caller's (authoritative) or learned from the server
        self.size_known = size is not None
        self.caller_etag = etag
        self.etag: str | None = etag  # the validator the bytes in the .part came from
        self.oc_sha1: str | None = None  # OC-Checksum seen on a response (cross-check only)

        self.sha = Sha1Consumer()
        self.caller_consumers = list(consumers)
        self.feeder = _Feeder([self.sha, *consumers], options.hash_thread)

        self.fd: int | None = None
        self.offset = 0  # bytes in the .part, all of them fed to the consumers
        self.unsynced = 0
        self.state: PartState | None = None
        self.reused = 0
        self.restarts = 0
        self.attempts = 0
        self.transferred = 0
        self.failures = 0  # in a row
        self.checksum_retried = False
        self.range_ok = True  # False after a 206 at the wrong start: the next request has no Range
        self.rng = random.Random()
        self.current: requests.Response | None = None
        self.done = threading.Event()

    # ------------------------------------------------------------------ helpers

    def emit(self, event: Event) -> None:
        if self.reporter is not None:
            self.reporter(event)

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled

    def redact(self, text: str) -> str:
        return self.share.redact(text)

    def fail_disk(self, path: Path, exc: OSError) -> NoReturn:
        raise store.disk_error(path, exc) from exc

    # ------------------------------------------------------------------ the .part file

    def state_matches(self, state: PartState | None, part_size: int) -> bool:
        if state is None:
            return False
        if (state.sha1.lower() if state.sha1 else None) != self.expected_sha1:
            return False
        candidates = {self.redact(self.share.file_url(self.name, p)) for p in PROTOCOLS}
        # Another server or address (a mirror, a new port) holds the same bytes only
        # if the published SHA1, which the state must carry, says so.
        if state.url not in candidates and (
            self.expected_sha1 is None or _url_file_name(state.url) != self.name
        ):
            return False
        if self.size_known and state.size != self.size:
            return False
        if state.size >= 0 and part_size > state.size:
            return False
        return not (self.caller_etag and state.etag and state.etag != self.caller_etag)

    def prepare(self) -> None:
        store.mkdirs(self.layout.archives)
        try:
            part_size = self.part_path.stat().st_size
        except FileNotFoundError:
            part_size = -1
        except OSError as exc:
            self.fail_disk(self.part_path, exc)
        state = PartState.load(self.state_path)
        if part_size > 0 and self.state_matches(state, part_size):
            assert state is not None
            self.state = state
            self.etag = state.etag or self.caller_etag
            if not self.size_known and state.size >= 0:
                self.size = state.size
            self.open_part(truncate=False)
            self.feed_prefix(part_size)
            self.reused = part_size
        else:
            self.discard_files()
            self.save_state(self.caller_etag)
            self.open_part(truncate=True)

    def save_state(self, etag: str | None) -> None:
        state = PartState(
            url=self.state_url,
            size=self.size if self.size is not None else _UNKNOWN_SIZE,
            etag=etag,
            sha1=self.expected_sha1,
        )
        if state != self.state:
            state.save(self.state_path)
            self.state = state
        self.etag = etag

    def open_part(self, *, truncate: bool) -> None:
        try:
            fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if truncate:
                os.ftruncate(fd, 0)
            self.offset = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            self.fail_disk(self.part_path, exc)
        self.fd = fd

    def close_part(self, *, sync: bool) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if sync:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
        finally:
            os.close(fd)

    def feed_prefix(self, length: int) -> None:
        """Feed the bytes already in the .part to every consumer (a resume)."""
        chunk = self.opts.chunk
        done = 0
        try:
            with open(self.part_path, "rb", buffering=0) as fh:
                while done < length:
                    self.check_cancel()
                    data = fh.read(min(chunk, length - done))
                    if not data:
                        break
                    self.feeder.feed(data)
                    done += len(data)
        except OSError as exc:
            self.fail_disk(self.part_path, exc)
        if done != length:  # the file shrank under us: trust only what was read
            self.truncate_to(done)
        self.offset = done

    def truncate_to(self, length: int) -> None:
        assert self.fd is not None
        try:
            os.ftruncate(self.fd, length)
            os.lseek(self.fd, length, os.SEEK_SET)
        except OSError as exc:
            self.fail_disk(self.part_path, exc)
        self.offset = length

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            # Keep the .part as it is: every byte in it was received in order.
            self.fail_disk(self.part_path, exc)
        self.unsynced += len(data)
        if self.opts.sync_every and self.unsynced >= self.opts.sync_every:
            self.sync()

    def sync(self) -> None:
        if self.fd is not None and self.unsynced:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self.fail_disk(self.part_path, exc)
            self.unsynced = 0

    def discard_files(self) -> None:
        self.close_part(sync=False)
        for p in (self.part_path, self.state_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.fail_disk(p, exc)
        self.state = None

    def restart(self, reason: str) -> None:
        """Throw away the .part's bytes and start again from zero."""
        discarded = self.offset
        self.truncate_to(0)
        self.feeder.reset()
        self.reused = 0
        self.restarts += 1
        self.unsynced = 0
        if not self.size_known:
            self.size = None
        self.emit(Event("retry", self.name, data={"reason": reason, "delay": 0.0, "restart": True}))
        self.emit_discarded(discarded)

    def emit_discarded(self, n: int) -> None:
        """Progress goes back: a negative ``advance`` (renderers just add it up)."""
        if n:
            self.emit(Event("advance", self.name, done=-n))

    # ------------------------------------------------------------------ main loop

    def run(self) -> FetchResult:
        self.prepare()
        self.emit(Event("start", self.name, total=self.size, done=self.offset))
        while True:
            self.check_cancel()
            try:
                complete = self.attempt()
            except _Retry as r:
                self.failed(r)
                continue
            finally:
                self.current = None
            if complete and self.verify():
                return self.finalize()

    def failed(self, r: _Retry) -> None:
        self.failures += 1
        reason = self.redact(r.reason)
        if self.failures >= self.opts.max_attempts:
            raise NetworkError(
                f"{self.name}: giving up after {self.failures} failed attempts in a row "
                f"(last: {reason})",
                hint="run the same command again to resume",
            )
        if r.retry_after is not None:
            delay = min(r.retry_after, self.opts.max_retry_after)
        else:
            delay = backoff_delay(
                self.failures, self.opts.backoff_base, self.opts.backoff_max, self.rng
            )
        self.emit(
            Event(
                "retry",
                self.name,
                data={"reason": reason, "delay": delay, "attempt": self.failures},
            )
        )
        if delay > 0 and self.cancel.wait(delay):
            raise _Cancelled

    def attempt(self) -> bool:
        """One request; True when the .part holds the whole file."""
        self.attempts += 1
        use_range = self.offset > 0 and self.range_ok
        if self.offset > 0 and not use_range:
            self.restart(
                "the server answered a range request with the wrong bytes; "
                "downloading again from zero"
            )
        self.range_ok = True
        headers = {"Accept-Encoding": "identity"}
        if use_range:
            headers["Range"] = f"bytes={self.offset}-"
            if self.etag and not is_weak_etag(self.etag):
                headers["If-Range"] = self.etag
        follow = self.share.protocol == "https"
        try:
            resp = self.session.get(
                self.url,
                headers=headers,
                stream=True,
                auth=self.share.auth(),
                verify=self.share.verify,
                timeout=(self.opts.connect_timeout, self.opts.stall_timeout),
                allow_redirects=follow,
            )
        except requests.exceptions.SSLError as exc:
            if _is_cert_error(exc):
                raise NetworkError(
                    f"TLS error talking to {self.share.base}: {_short(exc)}",
                    hint="pass --ca-bundle FILE if the server uses a private CA",
                ) from exc
            raise _Retry(f"TLS error: {_short(exc)}") from exc
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ) as exc:
            raise ConfigError(f"invalid server address {self.share.base!r}: {_short(exc)}") from exc
        except requests.exceptions.TooManyRedirects as exc:
            raise ConfigError(
                f"{self.name}: too many redirects from {self.share.base}",
                hint="check --server, or try --protocol webdav",
            ) from exc
        except requests.exceptions.ConnectTimeout as exc:
            raise _Retry(f"connection timed out after {self.opts.connect_timeout:g} s") from exc
        except requests.exceptions.ReadTimeout as exc:
            raise _Retry(f"stalled: no answer for {self.opts.stall_timeout:g} s") from exc
        except requests.exceptions.RequestException as exc:
            raise _Retry(f"connection failed: {_short(exc)}") from exc
        except OSError as exc:
            raise _Retry(f"connection failed: {_short(exc)}") from exc
        self.current = resp
        with contextlib.closing(resp):
            if self.cancel.is_set():
                raise _Cancelled
            return self.handle(resp, use_range)

    def handle(self, resp: requests.Response, use_range: bool) -> bool:
        code = resp.status_code
        h = resp.headers
        if 300 <= code < 400:
            where = self.redact(h.get("Location", "?"))
            raise ConfigError(
                f"{self.name}: the server redirected the download ({code}) to {where}",
                hint="check --server (use the final https:// address) or try --protocol webdav",
            )
        if code in (401, 403, 404):
            check_status(self.share, resp, f"download of {self.name}")
        if code in _RETRY_STATUSES or code >= 500:
            wait = parse_retry_after(h.get("Retry-After"), time.time())
            raise _Retry(f"server answered {code} {resp.reason or ''}".strip(), wait)
        if code == 416:
            total = parse_unsatisfied_range(h.get("Content-Range"))
            if (
                use_range
                and self.size is not None
                and self.offset == self.size
                and total in (None, self.size)
            ):
                return True  # already complete: verify it
            self.restart(f"the server refused the range bytes={self.offset}- (416)")
            raise _Retry("range not satisfiable (416); starting again from zero")
        if code >= 400:
            check_status(self.share, resp, f"download of {self.name}")
        if code not in (200, 206):
            raise _Retry(f"unexpected answer {code} {resp.reason or ''}".strip())

        resp_etag = h.get("ETag") or None
        oc = parse_oc_checksum(h.get("OC-Checksum"))
        if oc:
            self.oc_sha1 = oc
        if self.share.protocol == "https" and looks_like_zip(h.get("Content-Type"), b""):
            self.refuse_zip()

        if code == 206:
            cr = parse_content_range(h.get("Content-Range"))
            if cr is None or cr[0] != self.offset:
                got = h.get("Content-Range", "no Content-Range")
                if self.offset > 0:
                    self.range_ok = False  # next request: from zero, without Range
                raise _Retry(f"the server sent {got!r} for bytes={self.offset}-; discarded")
            total = cr[2]
            if self.size is not None and total is not None and total != self.size:
                # A proxy's lie or a changed file: either way keep the .part (the
                # published size is the authority) and ask again.
                raise _Retry(f"the server says the file is {total} bytes, not {self.size}")
            if self.offset > 0 and resp_etag and self.etag and resp_etag != self.etag:
                self.restart("the file on the server changed (new ETag)")
                raise _Retry("the file on the server changed; starting again from zero")
            if self.size is None and total is not None:
                self.size = total
        else:  # 200: the whole file, from byte 0
            length = parse_content_length(h.get("Content-Length"))
            ctype = (h.get("Content-Type") or "").split(";")[0].strip().lower()
            # Nothing on disk is touched before the answer looks like the file: an
            # error page sent as "200 OK" by a proxy must not wipe a resumable .part.
            if ctype in ("text/html", "application/xhtml+xml"):
                raise _Retry(f"the server sent a web page ({ctype}) instead of the file")
            if self.size is not None and length is not None and length != self.size:
                if self.size_known:
                    raise _Retry(f"the server sent {length} bytes, not the {self.size} published")
                self.size = length
            if self.size is None:
                self.size = length
            if self.offset > 0:
                why = "changed (new ETag)" if use_range and resp_etag != self.etag else "ignored"
                self.restart(f"the server {why} the range request and sent the whole file")
        if self.offset == 0:  # the state is on disk before the first byte
            self.save_state(resp_etag or self.caller_etag)
        return self.stream(resp)

    def refuse_zip(self, *, gzip_expected: bool = False) -> NoReturn:
        """The share link answered with something other than the file: never save it."""
        if self.offset == 0:
            self.discard_files()
        what = (
            "something that is not a gzip archive (a zip built on the fly?)"
            if gzip_expected
            else "a zip archive built on the fly"
        )
        raise ConfigError(
            f"{self.name}: the share link sent {what} instead of the file",
            hint="this server does not serve single files on share links; use --protocol webdav",
        )

    def _pieces(self, resp: requests.Response, chunk: int, start: int) -> Iterator[bytes]:
        """The body in pieces of about ``chunk`` bytes, as they arrive.

        Reads whatever the socket has (``read1``) and hands it on once a chunk
        has gathered or half a second has passed, so a slow server's bytes land
        on disk as they come. A server that trickles (less than
        ``min_rate`` bytes/s over ``stall_timeout`` seconds) is dropped like a
        stalled one: the read timeout alone never fires while a byte arrives
        now and then.
        """
        raw = resp.raw
        pending: list[bytes] = []
        size = 0
        flushed = window = time.monotonic()
        window_bytes = 0
        while True:
            if self.cancel.is_set() and pending:
                yield b"".join(pending)  # what arrived is kept: the rerun need not fetch it
                pending, size = [], 0
            self.check_cancel()
            try:
                data = raw.read1(chunk - size, decode_content=False)
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                self.check_cancel()
                if pending:
                    yield b"".join(pending)  # keep what did arrive
                got = self.offset - start
                raise _Retry(_describe_read_error(exc, got, self.opts.stall_timeout)) from exc
            now = time.monotonic()
            if data:
                pending.append(data)
                size += len(data)
                window_bytes += len(data)
            if pending and (not data or size >= chunk or now - flushed >= 0.5):
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, size, flushed = [], 0, now
            if not data:
                return
            if now - window >= self.opts.stall_timeout:
                rate = window_bytes / (now - window)
                if rate < self.opts.min_rate:
                    raise _Retry(
                        f"too slow: {rate:.0f} bytes/s for {now - window:.0f} s "
                        f"after {self.offset - start} bytes"
                    )
                window, window_bytes = now, 0

    def stream(self, resp: requests.Response) -> bool:
        chunk = self.limiter.read_size(self.opts.chunk) if self.limiter else self.opts.chunk
        start = self.offset
        first = True
        for data in self._pieces(resp, chunk, start):
            if first and self.offset == 0 and self.share.protocol == "https":
                head = data[:4]
                if looks_like_zip(resp.headers.get("Content-Type"), head):
                    self.refuse_zip()
                if self.name.endswith(_GZIP_SUFFIXES) and not head.startswith(GZIP_MAGIC):
                    self.refuse_zip(gzip_expected=True)
            first = False
            if self.size is not None and self.offset + len(data) > self.size:
                return self.verify_failed("size", str(self.size), f"more than {self.size} bytes")
            self.write(data)
            self.feeder.feed(data)
            self.offset += len(data)
            self.transferred += len(data)
            self.failures = 0
            self.emit(Event("advance", self.name, done=len(data)))
            if self.limiter is not None and not self.limiter.consume(len(data), self.cancel):
                raise _Cancelled
        if self.size is None:
            self.size = self.offset  # no length announced: a clean end is the end
        if self.offset >= self.size:
            return True
        if self.offset == start:
            raise _Retry("the server closed the connection before sending any data")
        return False  # a shorter range than asked for: ask for the rest

    # ------------------------------------------------------------------ the end

    def verify(self) -> bool:
        """True when the .part is the file; False after scheduling the one retry from zero."""
        self.feeder.drain()
        if self.size is not None and self.offset != self.size:
            return self.verify_failed("size", str(self.size), str(self.offset))
        actual = self.sha.hexdigest()
        expected = self.expected_sha1 or self.oc_sha1
        if expected is not None and actual != expected:
            return self.verify_failed("SHA1", expected, actual)
        return True

    def verify_failed(self, what: str, expected: str, actual: str) -> bool:
        discarded = self.offset
        self.discard_files()
        self.offset = 0
        self.feeder.reset()
        if self.checksum_retried:
            raise ChecksumError(self.name, expected, actual, what=what)
        self.checksum_retried = True
        self.restarts += 1
        self.reused = 0
        if not self.size_known:
            self.size = None
        self.emit(
            Event(
                "retry",
                self.name,
                data={
                    "reason": f"{what} mismatch (expected {expected}, got {actual}); "
                    "downloading again from zero",
                    "delay": 0.0,
                    "restart": True,
                },
            )
        )
        self.emit_discarded(discarded)
        self.save_state(self.caller_etag)
        self.open_part(truncate=True)
        return False

    def finalize(self) -> FetchResult:
        sha1 = self.sha.hexdigest()
        assert self.fd is not None
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.fail_disk(self.part_path, exc)
        self.close_part(sync=False)
        store.clear_verified(self.layout, self.name)
        try:
            os.replace(self.part_path, self.final_path)
        except OSError as exc:
            self.fail_disk(self.final_path, exc)
        store.fsync_dir(self.final_path.parent)
        with contextlib.suppress(OSError):
            self.state_path.unlink()
        if self.expected_sha1 is not None:
            store.write_verified(self.layout, self.name, self.expected_sha1)
        self.feeder.close()
        for c in self.caller_consumers:
            c.finish()
        size = self.offset
        self.emit(
            Event("finish", self.name, total=size, done=size, data={"status": "ok", "sha1": sha1})
        )
        return FetchResult(
            name=self.name,
            size=size,
            sha1=sha1,
            resumed_from=self.reused,
            restarts=self.restarts,
            attempts=self.attempts,
            bytes_transferred=self.transferred,
        )

    def give_up(self) -> None:
        """Leave the .part (and state) resumable, and tell the consumers to stop."""
        self.feeder.close()
        if self.fd is not None:
            empty = self.offset == 0
            self.close_part(sync=True)
            if empty:
                with contextlib.suppress(OSError):
                    self.part_path.unlink()
                with contextlib.suppress(OSError):
                    self.state_path.unlink()
        for c in self.caller_consumers:
            with contextlib.suppress(Exception):
                c.abort()

    # ------------------------------------------------------------------ cancellation watcher

    def watch_cancel(self) -> None:
        """Unblock a read stuck on a silent socket as soon as ``cancel`` is set."""
        shut: requests.Response | None = None
        while not self.done.is_set():
            if self.cancel.wait(0.2) and not self.done.is_set():
                resp = self.current
                if resp is not None and resp is not shut:
                    _shutdown(resp)
                    shut = resp
                self.done.wait(0.2)


def _shutdown(resp: requests.Response) -> None:
    conn = getattr(resp.raw, "connection", None)
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            # The plain socket's shutdown: SSLSocket.shutdown would pull the
            # SSL object from under the reading thread.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _url_file_name(url: str) -> str | None:
    """The file a download URL names (the share link's ``files=``, else the last segment)."""
    parts = urlsplit(url)
    files = parse_qs(parts.query).get("files")
    if files:
        return files[0]
    last = parts.path.rsplit("/", 1)[-1]
    return unquote(last) if last else None


def _is_cert_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "certificate" in text or "hostname" in text


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _describe_read_error(exc: BaseException, got: int, stall: float) -> str:
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return f"stalled: no data for {stall:g} s after {got} bytes"
    cause: BaseException = exc
    if isinstance(exc, urllib3.exceptions.ProtocolError) and len(exc.args) > 1:
        inner = exc.args[1]
        if isinstance(inner, BaseException):
            cause = inner
    return f"connection dropped after {got} bytes ({type(cause).__name__})"


# --------------------------------------------------------------------------- public entry


def fetch_file(
    session: requests.Session,
    share: Share,
    name: str,
    layout: Layout,
    *,
    size: int | None,
    sha1: str | None,
    etag: str | None = None,
    consumers: Sequence[Consumer] = (),
    options: TransferOptions = TransferOptions(),
    limiter: RateLimiter | None = None,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
) -> FetchResult:
    """Download ``name`` from ``share`` to ``layout.archive(name)``, resuming a ``.part``.

    ``size`` and ``sha1`` are the published values (listing, ``sha1sums``);
    ``etag`` the listing's, if known. ``consumers`` get every byte of the
    file in order (the resumed prefix first), ``reset()`` on a restart from
    zero, ``finish()`` once the file is in place, ``abort()`` on failure.

    Raises :class:`ConfigError` (401/403/404, a redirect on WebDAV, a zip
    from a share link), :class:`NetworkError` (retries exhausted, TLS),
    :class:`ChecksumError` (size or SHA1 wrong twice), :class:`DiskError`
    and :class:`Interrupted` (``cancel`` set, or Ctrl-C). On every failure
    the ``.part`` and its state stay on disk, intact, for the next run — except
    after a checksum mismatch, which deletes them.
    """
    t = _Transfer(
        session,
        share,
        name,
        layout,
        size=size,
        sha1=sha1,
        etag=etag,
        consumers=consumers,
        options=options,
        limiter=limiter,
        reporter=reporter,
        cancel=cancel,
    )
    watcher: threading.Thread | None = None
    if cancel is not None:
        watcher = threading.Thread(target=t.watch_cancel, name="bimcv-cancel", daemon=True)
        watcher.start()
    ok = False
    try:
        result = t.run()
        ok = True
        return result
    except _Cancelled:
        raise Interrupted(f"{name}: interrupted; the partial file is kept for resuming") from None
    except KeyboardInterrupt:
        raise Interrupted(f"{name}: interrupted; the partial file is kept for resuming") from None
    finally:
        t.done.set()
        if not ok:
            t.give_up()
        # The watcher (a daemon) sees ``done`` within 0.2 s and ends; waiting for it
        # would add that much to every file.
