"""fetch_file against the real local share server, over real sockets, with injected faults.

Every fault the server offers must end in a correct file (or the documented
error); the server's request log shows what the client actually asked for.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bimcv_fetch.errors import (
    ChecksumError,
    ConfigError,
    DiskError,
    Interrupted,
    NetworkError,
)
from bimcv_fetch.events import Collector
from bimcv_fetch.ratelimit import RateLimiter, parse_rate
from bimcv_fetch.server import Fault, FaultPlan, ShareServer, TlsFiles
from bimcv_fetch.share import Protocol, Share, new_session
from bimcv_fetch.store import Layout, PartState, is_verified
from bimcv_fetch.stream import CHUNK
from bimcv_fetch.transfer import FetchResult, TransferOptions, fetch_file

TOKEN = "Tok-en_42"
NAME = "data.tar.gz"  # gzip magic, then seeded random bytes: 3 MiB and a bit
SIZE = 3 * CHUNK + 12_345
PLAIN = "plain.tar.gz"  # named like an archive, but not gzip
EMPTY = "empty.txt"

FAST = TransferOptions(
    stall_timeout=1.0,
    connect_timeout=5.0,
    max_attempts=6,
    backoff_base=0.01,
    backoff_max=0.1,
    max_retry_after=5.0,
)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def share_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("txshare")
    rng = random.Random(1234)
    (root / NAME).write_bytes(b"\x1f\x8b" + rng.randbytes(SIZE - 2))
    (root / PLAIN).write_bytes(b"this is not a gzip file\n" * 100)
    (root / EMPTY).write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def data(share_dir: Path) -> bytes:
    return (share_dir / NAME).read_bytes()


@pytest.fixture(scope="module")
def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture
def server(share_dir: Path) -> Iterator[ShareServer]:
    with ShareServer(share_dir, token=TOKEN, faults=FaultPlan(), threads=8) as srv:
        yield srv


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "dest")


class Recorder:
    """A consumer that keeps every byte it is fed, and counts the calls."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.resets = 0
        self.finished = 0
        self.aborted = 0

    def reset(self) -> None:
        self.buf.clear()
        self.resets += 1

    def feed(self, data: bytes | memoryview) -> None:
        self.buf += data

    def finish(self) -> None:
        self.finished += 1

    def abort(self) -> None:
        self.aborted += 1


def fetch(
    server: ShareServer,
    layout: Layout,
    *,
    sha1: str | None,
    protocol: Protocol = "webdav",
    name: str = NAME,
    size: int | None = SIZE,
    token: str = TOKEN,
    verify: bool | str = True,
    options: TransferOptions = FAST,
    **kw: Any,
) -> FetchResult:
    share = Share(server.url, token, protocol=protocol, verify=verify)
    return fetch_file(
        new_session(), share, name, layout, size=size, sha1=sha1, options=options, **kw
    )


def gets(server: ShareServer, name: str = NAME) -> list[tuple[str | None, int]]:
    """(Range header, status) of every GET of ``name``, oldest first."""
    return [(r.range, r.status) for r in server.requests.for_file(name)]


def assert_done(layout: Layout, data: bytes, name: str = NAME) -> None:
    assert layout.archive(name).read_bytes() == data
    assert not layout.part(name).exists()
    assert not layout.part_state(name).exists()


def assert_progress_adds_up(events: Collector) -> None:
    """One start; advances (negative after a restart from zero) end at the size."""
    (start,) = events.of("start")
    done = start.done
    for e in events.events:
        if e.kind == "advance":
            done += e.done
            assert 0 <= done <= SIZE
    assert done == SIZE


def partial_run(server: ShareServer, layout: Layout, sha1: str, after: int) -> int:
    """A first run that dies after ``after`` bytes: returns the .part size it left."""
    server.faults.add(NAME, Fault.drop(after=after))
    opts = TransferOptions(**{**FAST.__dict__, "max_attempts": 1})
    with pytest.raises(NetworkError):
        fetch(server, layout, sha1=sha1, options=opts)
    assert layout.part_state(NAME).exists()
    return layout.part(NAME).stat().st_size


# ---------------------------------------------------------------- plain downloads


@pytest.mark.parametrize("protocol", ["webdav", "dav", "https"])
def test_plain_download(
    server: ShareServer, layout: Layout, data: bytes, sha1: str, protocol: Protocol
) -> None:
    events = Collector()
    rec = Recorder()
    result = fetch(server, layout, sha1=sha1, protocol=protocol, reporter=events, consumers=[rec])
    assert_done(layout, data)
    assert result == FetchResult(NAME, SIZE, sha1, 0, 0, 1, SIZE)
    assert is_verified(layout, NAME, sha1)
    assert bytes(rec.buf) == data and rec.finished == 1 and rec.resets == 0
    assert gets(server) == [(None, 200)]
    (start,) = events.of("start")
    assert (start.total, start.done) == (SIZE, 0)
    assert_progress_adds_up(events)
    (finish,) = events.of("finish")
    assert finish.data == {"status": "ok", "sha1": sha1}


def test_empty_file(server: ShareServer, layout: Layout) -> None:
    empty_sha1 = hashlib.sha1(b"").hexdigest()
    result = fetch(server, layout, sha1=empty_sha1, size=0, name=EMPTY)
    assert_done(layout, b"", name=EMPTY)
    assert (result.size, result.sha1) == (0, empty_sha1)


def test_https_with_private_ca(
    share_dir: Path, tls_files: TlsFiles, layout: Layout, data: bytes, sha1: str
) -> None:
    with ShareServer(share_dir, token=TOKEN, tls=tls_files.server_pair) as srv:
        assert srv.url.startswith("https://")
        fetch(srv, layout, sha1=sha1, verify=str(tls_files.ca))
        assert_done(layout, data)
        # Without the CA the certificate is refused at once, with a hint, never retried.
        other = Layout(layout.dest.parent / "other")
        with pytest.raises(NetworkError, match="TLS") as err:
            fetch(srv, other, sha1=sha1, verify=True)
        assert "--ca-bundle" in str(err.value)
        assert len(srv.requests.for_file(NAME)) == 1
        assert not other.archive(NAME).exists()


def test_share_link_zip_is_refused(share_dir: Path, layout: Layout, sha1: str) -> None:
    with ShareServer(share_dir, token=TOKEN, share_link_mode="zip") as srv:
        with pytest.raises(ConfigError, match="zip") as err:
            fetch(srv, layout, sha1=sha1, protocol="https")
        assert "--protocol webdav" in str(err.value)
        assert TOKEN not in str(err.value)
    assert not layout.archive(NAME).exists()
    assert not layout.part(NAME).exists()
    assert not layout.part_state(NAME).exists()


def test_share_link_non_gzip_is_refused(server: ShareServer, layout: Layout) -> None:
    with pytest.raises(ConfigError, match="not a gzip") as err:
        fetch(server, layout, sha1=None, size=None, protocol="https", name=PLAIN)
    assert "--protocol webdav" in str(err.value)
    assert not layout.archive(PLAIN).exists()
    assert not layout.part(PLAIN).exists()


def test_unknown_size_and_sha1_uses_oc_checksum(
    server: ShareServer, layout: Layout, data: bytes
) -> None:
    # No published SHA1: the server's OC-Checksum catches a flipped byte.
    server.faults.add(NAME, Fault("flip_byte", offset=SIZE // 2))
    result = fetch(server, layout, sha1=None, size=None)
    assert_done(layout, data)
    assert result.sha1 == hashlib.sha1(data).hexdigest()
    assert result.restarts == 1


class _Refuses(Recorder):
    def feed(self, data: bytes | memoryview) -> None:
        super().feed(data)
        if len(self.buf) > CHUNK:
            raise ValueError("unsafe member")


@pytest.mark.parametrize("threaded", [True, False])
def test_consumer_error_stops_the_transfer(
    server: ShareServer, layout: Layout, data: bytes, sha1: str, threaded: bool
) -> None:
    bad = _Refuses()
    opts = TransferOptions(**{**FAST.__dict__, "hash_thread": threaded})
    with pytest.raises(ValueError, match="unsafe member"):
        fetch(server, layout, sha1=sha1, consumers=[bad], options=opts)
    assert bad.aborted == 1 and bad.finished == 0
    assert not layout.archive(NAME).exists()
    have = layout.part(NAME).stat().st_size
    assert have > CHUNK and layout.part(NAME).read_bytes() == data[:have]
    assert len(gets(server)) == 1  # not retried


# ---------------------------------------------------------------- refusals


def test_wrong_token_is_one_request(server: ShareServer, layout: Layout, sha1: str) -> None:
    with pytest.raises(ConfigError, match="401") as err:
        fetch(server, layout, sha1=sha1, token="wrong-token")
    assert "wrong-token" not in str(err.value)
    assert len(server.requests.for_file(NAME)) == 1
    assert not layout.part(NAME).exists()


def test_wrong_token_dav_is_404(server: ShareServer, layout: Layout, sha1: str) -> None:
    with pytest.raises(ConfigError, match="404"):
        fetch(server, layout, sha1=sha1, token="wrong-token", protocol="dav")
    assert len(server.requests.snapshot()) == 1


def test_missing_file_is_404(server: ShareServer, layout: Layout) -> None:
    with pytest.raises(ConfigError, match="not found"):
        fetch(server, layout, sha1=None, name="nope.tar.gz")
    assert len(server.requests.for_file("nope.tar.gz")) == 1


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "https://elsewhere.example/login")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


def test_webdav_redirect_is_an_error(layout: Layout) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        share = Share(f"http://127.0.0.1:{httpd.server_address[1]}", TOKEN)
        with pytest.raises(ConfigError, match="redirected") as err:
            fetch_file(new_session(), share, NAME, layout, size=SIZE, sha1=None, options=FAST)
        assert "elsewhere.example" in str(err.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------- faults survived


def test_drop_resumes_with_range(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    server.faults.add(NAME, Fault.drop(after=1_500_000))
    events = Collector()
    rec = Recorder()
    result = fetch(server, layout, sha1=sha1, reporter=events, consumers=[rec])
    assert_done(layout, data)
    assert gets(server) == [(None, 200), ("bytes=1500000-", 206)]
    assert result.bytes_transferred == SIZE and result.restarts == 0
    assert bytes(rec.buf) == data and rec.resets == 0
    (retry,) = events.of("retry")
    assert "dropped after 1500000 bytes" in retry.data["reason"]


def test_stall_is_aborted_and_resumed(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    server.faults.add(NAME, Fault.stall(after=2 * CHUNK, seconds=30))
    events = Collector()
    t0 = time.monotonic()
    fetch(server, layout, sha1=sha1, reporter=events)
    assert time.monotonic() - t0 < 10
    assert_done(layout, data)
    assert gets(server) == [(None, 200), (f"bytes={2 * CHUNK}-", 206)]
    assert "stalled" in events.of("retry")[0].data["reason"]


@pytest.mark.parametrize(("code", "date"), [(429, False), (429, True), (503, False)])
def test_retry_after_is_honoured(
    server: ShareServer, layout: Layout, data: bytes, sha1: str, code: int, date: bool
) -> None:
    server.faults.add(NAME, Fault.http(code, "2" if date else "1", date=date))
    events = Collector()
    t0 = time.monotonic()
    fetch(server, layout, sha1=sha1, reporter=events)
    elapsed = time.monotonic() - t0
    assert_done(layout, data)
    assert gets(server) == [(None, code), (None, 200)]
    (retry,) = events.of("retry")
    assert str(code) in retry.data["reason"]
    delay = retry.data["delay"]
    if date:  # an HTTP-date has a one-second resolution
        assert 0.5 <= delay <= 2.1
    else:
        assert delay == 1.0
    assert elapsed >= delay


def test_retry_after_is_capped(server: ShareServer, layout: Layout, sha1: str) -> None:
    server.faults.add(NAME, Fault.http(503, "3600"))
    events = Collector()
    opts = TransferOptions(**{**FAST.__dict__, "max_retry_after": 0.2})
    fetch(server, layout, sha1=sha1, reporter=events, options=opts)
    assert events.of("retry")[0].data["delay"] == 0.2


def test_200_on_range_restarts_from_zero(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    server.faults.add(NAME, Fault.drop(after=1_500_000)).add(NAME, "ignore_range")
    rec = Recorder()
    events = Collector()
    result = fetch(server, layout, sha1=sha1, consumers=[rec], reporter=events)
    assert_done(layout, data)
    assert gets(server) == [(None, 200), ("bytes=1500000-", 200)]
    assert result.restarts == 1
    assert rec.resets == 1 and bytes(rec.buf) == data
    assert_progress_adds_up(events)


def test_206_at_wrong_start_is_never_appended(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    server.faults.add(NAME, Fault.drop(after=1_500_000)).add(NAME, Fault("wrong_start", delta=512))
    rec = Recorder()
    result = fetch(server, layout, sha1=sha1, consumers=[rec])
    assert_done(layout, data)
    # The lying 206 is discarded; the next request starts again from zero, without Range.
    assert gets(server) == [(None, 200), ("bytes=1500000-", 206), (None, 200)]
    assert result.restarts == 1
    assert bytes(rec.buf) == data


def test_flipped_byte_is_retried_once_from_zero(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    server.faults.add(NAME, Fault("flip_byte", offset=12_345))
    rec = Recorder()
    events = Collector()
    result = fetch(server, layout, sha1=sha1, consumers=[rec], reporter=events)
    assert_done(layout, data)
    assert gets(server) == [(None, 200), (None, 200)]
    assert result.restarts == 1 and result.bytes_transferred == 2 * SIZE
    assert rec.resets == 1 and bytes(rec.buf) == data and rec.finished == 1
    assert "SHA1 mismatch" in events.of("retry")[0].data["reason"]
    assert_progress_adds_up(events)


def test_flipped_twice_raises_and_leaves_nothing(
    server: ShareServer, layout: Layout, sha1: str
) -> None:
    server.faults.add(NAME, Fault("flip_byte", offset=SIZE - 1), times=2)
    rec = Recorder()
    with pytest.raises(ChecksumError) as err:
        fetch(server, layout, sha1=sha1, consumers=[rec])
    assert err.value.expected == sha1 and err.value.exit_code == 5
    assert not layout.archive(NAME).exists()
    assert not layout.part(NAME).exists()
    assert not layout.part_state(NAME).exists()
    assert rec.finished == 0 and rec.aborted == 1
    assert len(gets(server)) == 2


def test_gzip_content_encoding_is_not_decoded(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    server.faults.add(NAME, "gzip_header")
    fetch(server, layout, sha1=sha1)
    assert_done(layout, data)


def test_wrong_size_is_refused(server: ShareServer, layout: Layout, sha1: str) -> None:
    with pytest.raises(NetworkError, match="not the 3158074 published"):
        fetch(server, layout, sha1=sha1, size=SIZE + 1)
    assert not layout.archive(NAME).exists()


def test_a_lying_answer_never_wipes_a_resumable_part(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    """A 206 or a 200 whose size is not the published one leaves the .part alone."""
    server.faults.add(NAME, Fault.drop(after=1_500_000))
    with pytest.raises(NetworkError):
        fetch(
            server,
            layout,
            sha1=sha1,
            options=TransferOptions(**{**FAST.__dict__, "max_attempts": 1}),
        )
    part = layout.part(NAME).read_bytes()
    assert len(part) >= 1_000_000 and data.startswith(part)
    opts = TransferOptions(**{**FAST.__dict__, "max_attempts": 2})
    # A proxy's error page sent as "200 OK", twice: retried, and the .part is untouched.
    server.faults.add(NAME, "error_page", times=2)
    with pytest.raises(NetworkError, match="web page"):
        fetch(server, layout, sha1=sha1, options=opts)
    assert layout.part(NAME).read_bytes() == part
    # A good answer again: it resumes from the kept bytes and finishes.
    fetch(server, layout, sha1=sha1)
    assert_done(layout, data)


def test_failures_exhaust_the_budget(server: ShareServer, layout: Layout, sha1: str) -> None:
    server.faults.add(NAME, Fault.http(503), times=3)
    opts = TransferOptions(**{**FAST.__dict__, "max_attempts": 3})
    with pytest.raises(NetworkError, match="503") as err:
        fetch(server, layout, sha1=sha1, options=opts)
    assert err.value.exit_code == 4
    assert gets(server) == [(None, 503)] * 3
    assert not layout.archive(NAME).exists()


def test_budget_resets_while_bytes_arrive(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    server.faults.add(NAME, Fault.drop(after=300_000), times=5)
    opts = TransferOptions(**{**FAST.__dict__, "max_attempts": 2})
    result = fetch(server, layout, sha1=sha1, options=opts)
    assert_done(layout, data)
    assert result.attempts == 6
    assert [r for r, _ in gets(server)] == [None] + [f"bytes={300_000 * i}-" for i in range(1, 6)]


# ---------------------------------------------------------------- resuming across runs


def test_resume_from_partial_part(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    have = partial_run(server, layout, sha1, after=1_500_000)
    assert layout.part(NAME).read_bytes() == data[:have]
    assert 1_500_000 - CHUNK < have <= 1_500_000  # kept what it received, at most a chunk lost
    server.requests.clear()
    rec = Recorder()
    events = Collector()
    result = fetch(server, layout, sha1=sha1, consumers=[rec], reporter=events)
    assert_done(layout, data)
    assert gets(server) == [(f"bytes={have}-", 206)]
    assert result.resumed_from == have and result.bytes_transferred == SIZE - have
    assert 1_500_000 + result.bytes_transferred - SIZE <= CHUNK  # re-fetched at most a chunk
    assert bytes(rec.buf) == data and rec.resets == 0
    assert events.of("start")[0].done == have
    assert_progress_adds_up(events)


def test_state_mismatch_starts_again(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    partial_run(server, layout, sha1, after=1_500_000)
    server.requests.clear()
    # The published SHA1 changed (a new release of the file): the .part is worthless.
    other = "0" * 40
    with pytest.raises(ChecksumError):
        fetch(server, layout, sha1=other)
    assert gets(server)[0] == (None, 200)


def test_changed_etag_between_runs_restarts(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    have = partial_run(server, layout, sha1, after=1_500_000)
    old = PartState.load(layout.part_state(NAME))
    assert old is not None and old.etag
    server.requests.clear()
    server.faults.add(NAME, "change_etag")  # If-Range no longer matches: the server sends 200
    rec = Recorder()
    events = Collector()
    result = fetch(server, layout, sha1=sha1, consumers=[rec], reporter=events)
    assert_done(layout, data)
    assert gets(server) == [(f"bytes={have}-", 200)]
    assert result.restarts == 1 and result.resumed_from == 0
    assert rec.resets == 1 and bytes(rec.buf) == data
    assert_progress_adds_up(events)
    new = PartState.load(layout.part_state(NAME))
    assert new is None  # gone with the finished file


def test_changed_listing_etag_restarts_without_range(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    partial_run(server, layout, sha1, after=1_500_000)
    server.requests.clear()
    fetch(server, layout, sha1=sha1, etag='"a-new-etag"')
    assert_done(layout, data)
    assert gets(server) == [(None, 200)]


def test_complete_part_is_verified_not_downloaded(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    share = Share(server.url, TOKEN)
    layout.archives.mkdir(parents=True)
    layout.part(NAME).write_bytes(data)
    PartState(share.redact(share.file_url(NAME)), SIZE, None, sha1).save(layout.part_state(NAME))
    result = fetch(server, layout, sha1=sha1)
    assert_done(layout, data)
    assert gets(server) == [(f"bytes={SIZE}-", 416)]
    assert result.bytes_transferred == 0 and result.resumed_from == SIZE


def test_complete_but_corrupt_part_is_fetched_again(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    share = Share(server.url, TOKEN)
    layout.archives.mkdir(parents=True)
    layout.part(NAME).write_bytes(data[:-1] + b"\x00")
    PartState(share.redact(share.file_url(NAME)), SIZE, None, sha1).save(layout.part_state(NAME))
    result = fetch(server, layout, sha1=sha1)
    assert_done(layout, data)
    assert gets(server) == [(f"bytes={SIZE}-", 416), (None, 200)]
    assert result.restarts == 1


def test_416_on_a_too_long_part_restarts(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    # A state that never learned the size, and more bytes than the file has.
    share = Share(server.url, TOKEN)
    layout.archives.mkdir(parents=True)
    layout.part(NAME).write_bytes(b"\x00" * (SIZE + 100))
    PartState(share.redact(share.file_url(NAME)), -1, None, sha1).save(layout.part_state(NAME))
    rec = Recorder()
    result = fetch(server, layout, sha1=sha1, size=None, consumers=[rec])
    assert_done(layout, data)
    assert gets(server) == [(f"bytes={SIZE + 100}-", 416), (None, 200)]
    assert result.restarts == 1 and rec.resets == 1 and bytes(rec.buf) == data


def test_part_without_state_is_not_trusted(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    layout.archives.mkdir(parents=True)
    layout.part(NAME).write_bytes(b"\x00" * 100_000)
    fetch(server, layout, sha1=sha1)
    assert_done(layout, data)
    assert gets(server) == [(None, 200)]


# ---------------------------------------------------------------- cancellation


@pytest.fixture
def slow_server(share_dir: Path) -> Iterator[ShareServer]:
    """About 2 s for the whole file, so a cancel or a kill lands mid-way."""
    with ShareServer(share_dir, token=TOKEN, rate_limit=1.6e6, threads=4) as srv:
        yield srv


def test_cancel_keeps_the_part(
    slow_server: ShareServer, server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    cancel = threading.Event()

    def reporter(event: Any) -> None:
        if event.kind == "advance":
            cancel.set()

    rec = Recorder()
    with pytest.raises(Interrupted) as err:
        fetch(slow_server, layout, sha1=sha1, reporter=reporter, cancel=cancel, consumers=[rec])
    assert err.value.exit_code == 130
    have = layout.part(NAME).stat().st_size
    assert have > 0 and layout.part(NAME).read_bytes() == data[:have]
    assert layout.part_state(NAME).exists() and not layout.archive(NAME).exists()
    assert rec.aborted == 1
    result = fetch(server, layout, sha1=sha1)
    assert_done(layout, data)
    assert gets(server) == [(f"bytes={have}-", 206)]
    assert result.resumed_from == have


def test_keyboard_interrupt_keeps_the_part(
    slow_server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    def reporter(event: Any) -> None:
        if event.kind == "advance":
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        fetch(slow_server, layout, sha1=sha1, reporter=reporter)
    have = layout.part(NAME).stat().st_size
    assert have > 0 and layout.part(NAME).read_bytes() == data[:have]
    assert layout.part_state(NAME).exists()


def test_cancel_interrupts_a_stalled_read(server: ShareServer, layout: Layout, sha1: str) -> None:
    server.faults.add(NAME, Fault.stall(after=CHUNK, seconds=30))
    cancel = threading.Event()
    opts = TransferOptions(**{**FAST.__dict__, "stall_timeout": 30.0})
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        fetch(server, layout, sha1=sha1, cancel=cancel, options=opts)
    assert time.monotonic() - t0 < 5
    assert layout.part(NAME).stat().st_size == CHUNK


def test_cancel_interrupts_the_backoff(server: ShareServer, layout: Layout, sha1: str) -> None:
    server.faults.add(NAME, Fault.http(503, "60"))
    cancel = threading.Event()
    opts = TransferOptions(**{**FAST.__dict__, "max_retry_after": 120.0})
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        fetch(server, layout, sha1=sha1, cancel=cancel, options=opts)
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------- other processes: kill -9, full disk

_CHILD = """
import json, resource, signal, sys
args = json.loads(sys.argv[1])
if args.get("fsize"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (args["fsize"], args["fsize"]))
from pathlib import Path
from bimcv_fetch.errors import BimcvError
from bimcv_fetch.share import Share, new_session
from bimcv_fetch.store import Layout
from bimcv_fetch.transfer import TransferOptions, fetch_file
try:
    fetch_file(new_session(), Share(args["url"], args["token"]), args["name"],
               Layout(Path(args["dest"])), size=args["size"], sha1=args["sha1"],
               options=TransferOptions(stall_timeout=5, backoff_base=0.01, max_attempts=2))
    print(json.dumps({"ok": True}))
except BimcvError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                      "exit_code": int(exc.exit_code)}))
"""


def _child(server: ShareServer, layout: Layout, sha1: str, **extra: Any) -> subprocess.Popen[str]:
    args = {
        "url": server.url,
        "token": TOKEN,
        "name": NAME,
        "dest": str(layout.dest),
        "size": SIZE,
        "sha1": sha1,
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_mid_transfer_then_resume(
    slow_server: ShareServer, server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    proc = _child(slow_server, layout, sha1)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            part = layout.part(NAME)
            if part.exists() and part.stat().st_size >= CHUNK:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        else:
            pytest.fail("the child never got a chunk")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    have = layout.part(NAME).stat().st_size
    assert 0 < have < SIZE
    assert layout.part(NAME).read_bytes() == data[:have]
    assert layout.part_state(NAME).exists()
    result = fetch(server, layout, sha1=sha1)
    assert_done(layout, data)
    assert gets(server) == [(f"bytes={have}-", 206)]
    assert result.resumed_from == have and result.bytes_transferred == SIZE - have


def test_full_disk_keeps_the_part(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    limit = CHUNK + 300_000  # EFBIG in the middle of the second chunk
    proc = _child(server, layout, sha1, fsize=limit)
    out, err = proc.communicate(timeout=30)
    if not out.strip():
        pytest.skip(f"RLIMIT_FSIZE not usable here: {err[-500:]}")
    outcome = json.loads(out)
    assert outcome["error"] == DiskError.__name__, outcome
    assert outcome["exit_code"] == 7
    assert "file size limit" in outcome["message"]
    have = layout.part(NAME).stat().st_size
    assert have == limit
    assert layout.part(NAME).read_bytes() == data[:have]  # intact, never truncated
    assert layout.part_state(NAME).exists()
    server.requests.clear()
    fetch(server, layout, sha1=sha1)
    assert_done(layout, data)
    assert gets(server) == [(f"bytes={have}-", 206)]


# ---------------------------------------------------------------- rate limit


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100", 100),
        ("10K", 10 << 10),
        ("10k", 10 << 10),
        ("10M", 10 << 20),
        ("1.5M", int(1.5 * (1 << 20))),
        ("2G", 2 << 30),
        ("10MB", 10 << 20),
        ("10MiB/s", 10 << 20),
        (" 5 m ", 5 << 20),
    ],
)
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "10X", "-1M", "0", "0.0001", "1M2", "M"])
def test_parse_rate_garbage(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_rate(text)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_bucket() -> None:
    clock = _Clock()
    lim = RateLimiter(1000, burst=500, clock=clock)
    assert lim.reserve(500) == 0.0  # the burst is free
    assert lim.reserve(1000) == pytest.approx(1.0)  # then a debt, paid at the rate
    assert lim.reserve(500) == pytest.approx(1.5)  # a second caller queues behind
    clock.now += 1.5
    assert lim.reserve(0) == pytest.approx(0.0)
    clock.now += 100  # idle time saves up at most the burst
    assert lim.reserve(600) == pytest.approx(0.1)


def test_rate_limiter_caps_a_download(
    server: ShareServer, layout: Layout, data: bytes, sha1: str
) -> None:
    limiter = RateLimiter(6 << 20, burst=64 << 10)
    t0 = time.monotonic()
    fetch(server, layout, sha1=sha1, limiter=limiter)
    assert time.monotonic() - t0 >= (SIZE - (64 << 10)) / (6 << 20) * 0.95
    assert_done(layout, data)


def test_rate_limiter_is_shared_by_concurrent_transfers(
    server: ShareServer, tmp_path: Path, data: bytes, sha1: str
) -> None:
    limiter = RateLimiter(8 << 20, burst=64 << 10)
    session = new_session()
    share = Share(server.url, TOKEN)
    layouts = [Layout(tmp_path / f"d{i}") for i in range(2)]
    errors: list[BaseException] = []

    def one(lay: Layout) -> None:
        try:
            fetch_file(
                session, share, NAME, lay, size=SIZE, sha1=sha1, options=FAST, limiter=limiter
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(lay,)) for lay in layouts]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert time.monotonic() - t0 >= (2 * SIZE - (64 << 10)) / (8 << 20) * 0.95
    for lay in layouts:
        assert_done(lay, data)


def test_rate_limiter_cancel() -> None:
    lim = RateLimiter(10, burst=1)
    cancel = threading.Event()
    cancel.set()
    assert lim.consume(1000, cancel) is False


def test_options_are_plain_data() -> None:
    opts = TransferOptions()
    assert opts.chunk == CHUNK and opts.stall_timeout == 60.0 and opts.max_attempts == 8
    assert os.fspath(Layout(Path("x")).part(NAME)).endswith(".part")


def test_a_trickling_server_is_dropped_and_bytes_land_as_they_come(
    tmp_path: Path, data: bytes, sha1: str, layout: Layout
) -> None:
    """Bytes now and then never trip a read timeout: the low-speed abort must."""
    root = tmp_path / "share"
    root.mkdir()
    (root / NAME).write_bytes(data)
    opts = TransferOptions(**{**FAST.__dict__, "stall_timeout": 1.0, "min_rate": 200_000.0})
    cancel = threading.Event()
    reasons: list[str] = []

    def reporter(event: Any) -> None:
        if event.kind == "retry":
            reasons.append(str(event.data.get("reason", "")))
            cancel.set()  # seen it: stop here rather than crawl to the end

    with ShareServer(root, token=TOKEN, rate_limit=50_000) as slow, pytest.raises(Interrupted):
        fetch(slow, layout, sha1=sha1, options=opts, reporter=reporter, cancel=cancel)
    assert reasons and "too slow" in reasons[0]
    have = layout.part(NAME).stat().st_size
    assert 0 < have < len(data) and data.startswith(layout.part(NAME).read_bytes())
