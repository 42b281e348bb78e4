"""Fault injection: the FaultPlan queue, its file format, and every fault kind on the wire."""

from __future__ import annotations

import email.utils
import http.client
import io
import json
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests

from bimcv_fetch.errors import ConfigError
from bimcv_fetch.server import Fault, FaultPlan, SampleRelease, ShareServer

# ---------------------------------------------------------------- the plan


def test_plan_is_fifo_per_file_and_globs() -> None:
    plan = FaultPlan()
    plan.add("a.tar.gz", Fault.http(503)).add("*.tar.gz", "drop").add("a.tar.gz", "flip_byte")
    assert plan.pending() == 3 and plan.pending("b.tar.gz") == 1 and len(plan) == 3
    first = plan.take("a.tar.gz")
    assert first is not None and first.kind == "status"
    second = plan.take("a.tar.gz")
    assert second is not None and second.kind == "drop"
    assert plan.take("b.tar.gz") is None
    third = plan.take("a.tar.gz")
    assert third is not None and third.kind == "flip_byte"
    assert plan.take("a.tar.gz") is None
    assert [name for name, _ in plan.taken] == ["a.tar.gz"] * 3


def test_plan_times() -> None:
    plan = FaultPlan().add("x", Fault.drop(5), times=3)
    assert plan.pending("x") == 3
    plan.clear()
    assert plan.pending() == 0
    with pytest.raises(ValueError):
        plan.add("x", "drop", times=0)


def test_bad_faults_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Fault("flip_byte", xor=0)
    with pytest.raises(ConfigError):
        Fault.from_dict({"kind": "drop", "bogus": 1})


def test_plan_from_json_and_toml(tmp_path: Path) -> None:
    data = {
        "faults": [
            {"file": "*.tar.gz", "kind": "drop", "after": 1024, "times": 2},
            {"file": "x.tar.gz", "kind": "status", "code": 429, "retry_after": 2},
        ]
    }
    (tmp_path / "plan.json").write_text(json.dumps(data))
    (tmp_path / "plan.toml").write_text(
        '[[faults]]\nfile = "*.tar.gz"\nkind = "drop"\nafter = 1024\ntimes = 2\n\n'
        '[[faults]]\nfile = "x.tar.gz"\nkind = "status"\ncode = 429\nretry_after = "2"\n'
    )
    (tmp_path / "list.json").write_text(json.dumps(data["faults"]))
    for name in ("plan.json", "plan.toml", "list.json"):
        plan = FaultPlan.from_file(tmp_path / name)
        assert plan.pending() == 3
        assert plan.take("x.tar.gz") == Fault("drop", after=1024)
        assert plan.take("x.tar.gz") == Fault("drop", after=1024)
        assert plan.take("x.tar.gz") == Fault("status", code=429, retry_after="2")
    (tmp_path / "bad.json").write_text('{"faults": [{"kind": "drop"}]}')
    with pytest.raises(ConfigError, match="file"):
        FaultPlan.from_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError):
        FaultPlan.from_file(tmp_path / "missing.json")
    (tmp_path / "broken.toml").write_text("[[faults]\n")
    with pytest.raises(ConfigError):
        FaultPlan.from_file(tmp_path / "broken.toml")


# ---------------------------------------------------------------- on the wire


@pytest.fixture
def archive(sample_release: SampleRelease) -> str:
    return sample_release.subject_archives[0]


@pytest.fixture
def data(sample_release: SampleRelease, archive: str) -> bytes:
    return (sample_release.root / archive).read_bytes()


def _raw(server: ShareServer, name: str, headers: dict[str, str] | None = None) -> Any:
    """GET with http.client on v2; returns (response, bytes read before any error, error)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", f"/public.php/dav/files/{server.token}/{name}", headers=headers or {})
    resp = conn.getresponse()
    try:
        return resp, resp.read(), None
    except http.client.IncompleteRead as exc:
        return resp, exc.partial, exc
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["drop", "truncate"])
@pytest.mark.parametrize("after", [0, 1000, 70_000 - 1])
def test_drop(share_server: ShareServer, archive: str, data: bytes, kind: str, after: int) -> None:
    after = min(after, len(data) - 1)
    share_server.faults.add(archive, Fault(kind, after=after))  # type: ignore[arg-type]
    resp, got, err = _raw(share_server, archive)
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(data)
    assert isinstance(err, http.client.IncompleteRead)
    assert got == data[:after]
    # The next GET is served normally.
    resp, got, err = _raw(share_server, archive)
    assert err is None and got == data


def test_drop_seen_by_requests(client: Any, archive: str) -> None:
    client.server.faults.add(archive, Fault.drop(500))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        client.get(archive)


def test_drop_on_a_range_counts_body_bytes(
    share_server: ShareServer, archive: str, data: bytes
) -> None:
    share_server.faults.add(archive, Fault.drop(100))
    resp, got, err = _raw(share_server, archive, {"Range": "bytes=2000-"})
    assert resp.status == 206 and err is not None
    assert got == data[2000:2100]


def test_stall_then_close(share_server: ShareServer, archive: str, data: bytes) -> None:
    share_server.faults.add(archive, Fault.stall(after=300, seconds=0.5))
    t0 = time.monotonic()
    _resp, got, err = _raw(share_server, archive)
    assert time.monotonic() - t0 >= 0.45
    assert err is not None and got == data[:300]


def test_stall_then_resume(share_server: ShareServer, archive: str, data: bytes) -> None:
    share_server.faults.add(archive, Fault.stall(after=300, seconds=0.4, resume=True))
    t0 = time.monotonic()
    _resp, got, err = _raw(share_server, archive)
    assert time.monotonic() - t0 >= 0.35
    assert err is None and got == data


def test_stall_is_seen_as_a_read_timeout(client: Any, archive: str) -> None:
    client.server.faults.add(archive, Fault.stall(after=0, seconds=5))
    with pytest.raises(requests.exceptions.ConnectionError):
        r = client.get(archive, stream=True, timeout=(5, 0.3))
        r.content  # noqa: B018


def test_stop_interrupts_a_stall(sample_release: SampleRelease, archive: str) -> None:
    server = ShareServer(sample_release.root, token=sample_release.token).start()
    server.faults.add(archive, Fault.stall(after=10, seconds=60))
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            requests.get(server.dav_url + archive, timeout=30, verify=True)
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.faults.taken and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 3
    thread.join(timeout=10)
    assert errors


def test_status_retry_after_seconds(client: Any, archive: str) -> None:
    client.server.faults.add(archive, Fault.http(429, "2"))
    r = client.get(archive)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"


def test_status_retry_after_date(client: Any, archive: str) -> None:
    client.server.faults.add(archive, Fault.http(503, "30", date=True))
    r = client.get(archive, "v2")
    assert r.status_code == 503
    when = email.utils.parsedate_to_datetime(r.headers["Retry-After"]).timestamp()
    assert 25 < when - time.time() < 35


def test_fail_twice_then_serve(client: Any, archive: str, data: bytes) -> None:
    client.server.faults.add(archive, Fault.http(503, "1"), times=2)
    statuses = [client.get(archive).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    log = client.server.requests.for_file(archive)
    assert [r.status for r in log] == [503, 503, 200]


def test_head_and_propfind_do_not_consume(client: Any, archive: str) -> None:
    client.server.faults.add(archive, Fault.http(503))
    assert client.head(archive).status_code == 200
    assert client.propfind(archive, depth="0").status_code == 207
    assert client.server.faults.pending(archive) == 1
    assert client.get(archive).status_code == 503


def test_other_files_are_untouched(
    client: Any, archive: str, sample_release: SampleRelease
) -> None:
    client.server.faults.add(archive, Fault.http(503))
    assert client.get(sample_release.subject_archives[1]).status_code == 200
    assert client.server.faults.pending() == 1


def test_ignore_range(client: Any, archive: str, data: bytes) -> None:
    client.server.faults.add(archive, "ignore_range")
    r = client.get(archive, headers={"Range": "bytes=1000-"})
    assert r.status_code == 200 and "Content-Range" not in r.headers
    assert r.content == data
    assert client.get(archive, headers={"Range": "bytes=1000-"}).status_code == 206


@pytest.mark.parametrize("delta", [512, -300])
def test_wrong_start(client: Any, archive: str, data: bytes, delta: int) -> None:
    client.server.faults.add(archive, Fault("wrong_start", delta=delta))
    r = client.get(archive, "v2", headers={"Range": "bytes=1000-"})
    start = 1000 + delta
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {start}-{len(data) - 1}/{len(data)}"
    assert r.content == data[start:]


def test_flip_byte(client: Any, archive: str, data: bytes) -> None:
    client.server.faults.add(archive, Fault("flip_byte", offset=4321))
    r = client.get(archive)
    assert r.status_code == 200 and len(r.content) == len(data)
    diff = [i for i in range(len(data)) if r.content[i] != data[i]]
    assert diff == [4321] and r.content[4321] == data[4321] ^ 0xFF
    client.server.faults.add(archive, Fault("flip_byte", offset=4321, xor=1))
    r = client.get(archive, headers={"Range": "bytes=4000-"})
    assert r.content[321] == data[4321] ^ 1
    assert r.content[:321] == data[4000:4321] and r.content[322:] == data[4322:]
    assert client.get(archive).content == data


def test_change_etag(client: Any, archive: str, multistatus: Any) -> None:
    old = client.head(archive).headers["ETag"]
    client.server.faults.add(archive, "change_etag")
    r = client.get(archive, headers={"Range": "bytes=10-", "If-Range": old})
    new = r.headers["ETag"]
    assert new != old and r.status_code == 200
    assert client.head(archive, "v2").headers["ETag"] == new
    entries = multistatus(client.propfind(archive, depth="0"))
    assert entries[0]["{DAV:}getetag"].text == new
    assert client.get(archive, headers={"Range": "bytes=10-", "If-Range": old}).status_code == 200
    assert client.get(archive, headers={"Range": "bytes=10-", "If-Range": new}).status_code == 206


def test_gzip_header(client: Any, archive: str, data: bytes) -> None:
    client.server.faults.add(archive, "gzip_header")
    r = client.get(archive, stream=True, headers={"Accept-Encoding": "identity"})
    assert r.headers["Content-Encoding"] == "gzip"
    assert r.raw.read(decode_content=False) == data
    assert "Content-Encoding" not in client.get(archive).headers


@pytest.mark.parametrize("endpoint", ["legacy", "v2", "link"])
def test_faults_on_every_endpoint(client: Any, archive: str, endpoint: str) -> None:
    client.server.faults.add(archive, Fault.http(503))
    assert client.get(archive, endpoint).status_code == 503
    assert client.get(archive, endpoint).status_code == 200


def test_drop_on_the_zip_stream(sample_release: SampleRelease, archive: str) -> None:
    token = sample_release.token
    with ShareServer(sample_release.root, token=token, share_link_mode="zip") as server:
        server.faults.add(archive, Fault.drop(2000))
        url = server.share_link(archive)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(url, timeout=10, verify=True)
        r = requests.get(url, timeout=10, verify=True)
        with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
            assert zf.namelist() == [archive]


def test_drop_over_https(https_client: Any, archive: str) -> None:
    https_client.server.faults.add(archive, Fault.drop(1500))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        https_client.get(archive)
    assert https_client.get(archive).status_code == 200


def test_resume_after_drop_refetches_only_the_rest(client: Any, archive: str, data: bytes) -> None:
    client.server.faults.add(archive, Fault.drop(3000))
    r = client.get(archive, stream=True)
    got = bytearray()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in r.iter_content(1):
            got += chunk
    assert len(got) == 3000
    r = client.get(archive, headers={"Range": f"bytes={len(got)}-"})
    assert bytes(got) + r.content == data
    log = client.server.requests.for_file(archive)
    assert [(x.range, x.status) for x in log] == [(None, 200), ("bytes=3000-", 206)]
