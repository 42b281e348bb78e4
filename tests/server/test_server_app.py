"""The share server: endpoints, auth, PROPFIND, ranges and headers, over HTTP and HTTPS."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import io
import logging
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest
import requests

from bimcv_fetch.server import SampleRelease, ShareServer

DAV = "{DAV:}"
XRW = {"X-Requested-With": "XMLHttpRequest"}


def _name(href: str) -> str:
    return unquote(href.rstrip("/").rsplit("/", 1)[-1])


def _raw_get(server: ShareServer, path: str, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, dict(resp.getheaders()), body
    finally:
        conn.close()


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


# ---------------------------------------------------------------- lifecycle


def test_port_zero_picks_a_real_port(share_server: ShareServer) -> None:
    assert share_server.port > 0
    assert share_server.url == f"http://127.0.0.1:{share_server.port}"
    assert share_server.running


def test_stop_is_prompt_and_idempotent(sample_release: SampleRelease) -> None:
    server = ShareServer(sample_release.root, token=sample_release.token).start()
    port = server.port
    t0 = time.monotonic()
    server.stop()
    server.stop()
    assert time.monotonic() - t0 < 3
    assert not server.running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=2, verify=True)


def test_serve_forever_returns_after_stop(sample_release: SampleRelease) -> None:
    server = ShareServer(sample_release.root, token=sample_release.token)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.running and time.monotonic() < deadline:
        time.sleep(0.02)
    r = requests.get(server.dav_url + "LICENSE.md", timeout=10, verify=True)
    assert r.status_code == 200
    server.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_missing_root_is_a_config_error(tmp_path: Path) -> None:
    from bimcv_fetch.errors import ConfigError

    with pytest.raises(ConfigError):
        ShareServer(tmp_path / "nope", token="t")


# ---------------------------------------------------------------- auth


def test_legacy_needs_basic_auth(client: Any, sample_release: SampleRelease) -> None:
    name = "LICENSE.md"
    r = client.get(name, auth=None)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith('Basic realm="')
    assert client.get(name, auth=("wrong-token", "")).status_code == 401
    assert client.get(name, auth=(sample_release.token, "")).status_code == 200
    assert client.get(name, auth=(sample_release.token, "whatever")).status_code == 200
    url = client.url(name)
    for header in (_basic(sample_release.token + ":"), _basic(sample_release.token)):
        r = client.request("GET", url, headers={"Authorization": header})
        assert r.status_code == 200


def test_password_share(sample_release: SampleRelease) -> None:
    token = sample_release.token
    with ShareServer(sample_release.root, token=token, password="s3cret") as server:
        legacy = server.webdav_url + "LICENSE.md"
        v2 = server.dav_url + "LICENSE.md"
        get = requests.get
        assert get(legacy, auth=(token, ""), timeout=10, verify=True).status_code == 401
        assert get(legacy, auth=(token, "s3cret"), timeout=10, verify=True).status_code == 200
        assert get(v2, timeout=10, verify=True).status_code == 401
        r = get(v2, auth=("anonymous", "s3cret"), timeout=10, verify=True)
        assert r.status_code == 200
        link = server.share_link("LICENSE.md")
        assert get(link, timeout=10, verify=True).status_code == 401


def test_v2_needs_no_auth_but_the_right_token(client: Any, share_server: ShareServer) -> None:
    assert client.get("LICENSE.md", "v2").status_code == 200
    bad = f"{share_server.url}/public.php/dav/files/not-the-token/LICENSE.md"
    assert client.request("GET", bad).status_code == 404


# ---------------------------------------------------------------- GET / HEAD


@pytest.mark.parametrize("endpoint", ["legacy", "v2", "link"])
def test_get_whole_file(client: Any, sample_release: SampleRelease, endpoint: str) -> None:
    name = sample_release.subject_archives[0]
    r = client.get(name, endpoint)
    assert r.status_code == 200
    assert r.content == (sample_release.root / name).read_bytes()
    h = r.headers
    assert int(h["Content-Length"]) == sample_release.sizes[name]
    assert h["ETag"].startswith('"') and h["ETag"].endswith('"')
    assert email.utils.parsedate_to_datetime(h["Last-Modified"]).year == 2020
    assert h["Content-Type"] in ("application/octet-stream", "application/gzip")
    assert "Accept-Ranges" not in h
    assert "Content-Encoding" not in h
    if endpoint == "link":
        assert h["Content-Disposition"].startswith("attachment")
        assert name in h["Content-Disposition"]


def test_oc_checksum_on_archives_only(client: Any, sample_release: SampleRelease) -> None:
    for archive in sample_release.archives:
        r = client.head(archive)
        assert r.headers["OC-Checksum"] == "SHA1:" + sample_release.sha1[archive]
    listing = sample_release.listings[sample_release.archives[0]]
    assert "OC-Checksum" not in client.head(listing).headers
    assert "OC-Checksum" not in client.head("LICENSE.md").headers


def test_oc_checksum_can_be_off(sample_release: SampleRelease) -> None:
    with ShareServer(sample_release.root, token=sample_release.token, oc_checksum=False) as s:
        r = requests.head(s.dav_url + sample_release.archives[0], timeout=10, verify=True)
        assert r.status_code == 200 and "OC-Checksum" not in r.headers


def test_head_matches_get(client: Any, sample_release: SampleRelease) -> None:
    name = sample_release.metadata_archives[0]
    head = client.head(name)
    get = client.get(name)
    assert head.status_code == 200 and head.content == b""
    for key in ("Content-Length", "ETag", "Last-Modified", "Content-Type"):
        assert head.headers[key] == get.headers[key]
    assert "Accept-Ranges" not in head.headers


def test_options_advertises_ranges_and_dav(client: Any) -> None:
    r = client.request("OPTIONS", client.url(""), auth=(client.token, ""))
    assert r.status_code == 200
    assert r.headers["Accept-Ranges"] == "bytes"
    assert "1" in r.headers["DAV"] and "3" in r.headers["DAV"]


def test_missing_and_unsafe_paths(client: Any, share_server: ShareServer) -> None:
    assert client.get("nope.tar.gz").status_code == 404
    assert client.get("nope.tar.gz", "v2").status_code == 404
    assert client.get("nope.tar.gz", "link").status_code == 404
    auth = {"Authorization": _basic(client.token + ":")}
    for path in (
        "/public.php/webdav/../../../etc/passwd",
        "/public.php/webdav/..%2F..%2Fetc%2Fpasswd",
        "/public.php/webdav/%2e%2e/%2e%2e/etc/passwd",
        f"/public.php/dav/files/{client.token}/../../etc/passwd",
        "/public.php/webdav/.hidden",
        "/etc/passwd",
    ):
        status, _headers, body = _raw_get(share_server, path, auth)
        assert status in (400, 404), path
        assert b"root:" not in body


def test_flat_share_hides_subfolders_and_dotfiles(tmp_path: Path) -> None:
    (tmp_path / "a.tar.gz").write_bytes(b"x" * 10)
    (tmp_path / ".hidden").write_bytes(b"secret")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.txt").write_bytes(b"inner")
    with ShareServer(tmp_path, token="tok") as server:
        r = requests.request(
            "PROPFIND", server.dav_url, headers={**XRW, "Depth": "1"}, timeout=10, verify=True
        )
        assert r.status_code == 207
        assert b"hidden" not in r.content and b"sub" not in r.content
        for name in (".hidden", "sub", "sub/inner.txt"):
            r = requests.get(server.dav_url + name, timeout=10, verify=True)
            assert r.status_code == 404


def test_write_methods_are_refused(client: Any) -> None:
    url = client.url("new.txt")
    auth = (client.token, "")
    assert client.request("PUT", url, data=b"x", auth=auth, headers=XRW).status_code == 403
    r = client.request("DELETE", client.url("LICENSE.md"), auth=auth, headers=XRW)
    assert r.status_code == 403


# ---------------------------------------------------------------- PROPFIND


@pytest.mark.parametrize("endpoint", ["legacy", "v2"])
def test_propfind_depth_1(
    client: Any, sample_release: SampleRelease, multistatus: Any, endpoint: str
) -> None:
    r = client.propfind("", endpoint)
    assert r.headers["Content-Type"].startswith("application/xml")
    assert b"<d:multistatus" in r.content and b"<d:response>" in r.content
    entries = multistatus(r)
    folder, files = entries[0], entries[1:]
    base = urlsplit(client.url("", endpoint)).path
    assert folder["href"] == base
    assert folder[f"{DAV}resourcetype"].find(f"{DAV}collection") is not None
    assert f"{DAV}getcontentlength" not in folder
    assert sorted(_name(e["href"]) for e in files) == sorted(sample_release.files)
    for e in files:
        name = _name(e["href"])
        assert e["href"] == base + quote(name)
        assert int(e[f"{DAV}getcontentlength"].text) == sample_release.sizes[name]
        assert e[f"{DAV}resourcetype"].find(f"{DAV}collection") is None
        etag = e[f"{DAV}getetag"].text
        assert etag.startswith('"')
        modified = email.utils.parsedate_to_datetime(e[f"{DAV}getlastmodified"].text)
        assert modified.year == 2020
        assert e[f"{DAV}getcontenttype"].text
    one = sample_release.subject_archives[0]
    etags = {_name(e["href"]): e[f"{DAV}getetag"].text for e in files}
    assert client.head(one, endpoint).headers["ETag"] == etags[one]


def test_propfind_depth_0_and_single_file(
    client: Any, sample_release: SampleRelease, multistatus: Any
) -> None:
    assert len(multistatus(client.propfind("", "v2", depth="0"))) == 1
    name = sample_release.archives[-1]
    entries = multistatus(client.propfind(name, "legacy", depth="0"))
    assert len(entries) == 1 and _name(entries[0]["href"]) == name
    assert client.propfind("nope.txt").status_code == 404


def test_propfind_asked_props_and_404_propstat(client: Any, multistatus: Any) -> None:
    body = (
        '<?xml version="1.0"?><d:propfind xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns">'
        "<d:prop><d:getcontentlength/><d:getetag/><oc:fileid/></d:prop></d:propfind>"
    )
    entries = multistatus(client.propfind("", body=body))
    assert "{http://owncloud.org/ns}fileid" in entries[1]["missing"]
    assert f"{DAV}getcontentlength" in entries[0]["missing"]
    assert f"{DAV}getetag" in entries[1]
    assert f"{DAV}getlastmodified" not in entries[1]


def test_propfind_depth_infinity_is_refused(client: Any) -> None:
    assert client.propfind("", depth="infinity").status_code == 403


def test_propfind_without_x_requested_with_is_refused(client: Any) -> None:
    for endpoint in ("legacy", "v2"):
        r = client.propfind("", endpoint, xrw=False)
        assert r.status_code == 401
        assert b"CSRF check" in r.content


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize("endpoint", ["legacy", "v2", "link"])
def test_range_open_ended(client: Any, sample_release: SampleRelease, endpoint: str) -> None:
    name = sample_release.subject_archives[0]
    data = (sample_release.root / name).read_bytes()
    r = client.get(name, endpoint, headers={"Range": "bytes=1000-"})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert int(r.headers["Content-Length"]) == len(data) - 1000
    assert r.content == data[1000:]
    assert "Accept-Ranges" not in r.headers


def test_range_closed_and_suffix(client: Any, sample_release: SampleRelease) -> None:
    name = sample_release.subject_archives[1]
    data = (sample_release.root / name).read_bytes()
    size = len(data)
    r = client.get(name, headers={"Range": "bytes=10-19"})
    assert (r.status_code, r.headers["Content-Range"], r.content) == (
        206,
        f"bytes 10-19/{size}",
        data[10:20],
    )
    r = client.get(name, headers={"Range": f"bytes=5-{size + 100}"})
    assert r.headers["Content-Range"] == f"bytes 5-{size - 1}/{size}"
    r = client.get(name, headers={"Range": "bytes=-100"})
    assert r.headers["Content-Range"] == f"bytes {size - 100}-{size - 1}/{size}"
    assert r.content == data[-100:]
    r = client.get(name, headers={"Range": f"bytes={size - 1}-"})
    assert r.status_code == 206 and r.content == data[-1:]


def test_range_past_the_end_is_416(client: Any, sample_release: SampleRelease) -> None:
    name = sample_release.subject_archives[0]
    size = sample_release.sizes[name]
    for start in (size, size + 10):
        r = client.get(name, headers={"Range": f"bytes={start}-"})
        assert r.status_code == 416
        assert r.headers["Content-Range"] == f"bytes */{size}"


def test_multi_range_and_garbage_serve_whole(client: Any, sample_release: SampleRelease) -> None:
    name = sample_release.subject_archives[0]
    size = sample_release.sizes[name]
    for header in ("bytes=0-10,20-30", "items=0-5", "bytes=50-10"):
        r = client.get(name, headers={"Range": header})
        assert r.status_code == 200 and len(r.content) == size, header


def test_if_range(client: Any, sample_release: SampleRelease) -> None:
    name = sample_release.subject_archives[0]
    size = sample_release.sizes[name]
    etag = client.head(name).headers["ETag"]
    r = client.get(name, headers={"Range": "bytes=100-", "If-Range": etag})
    assert r.status_code == 206
    for other in (etag.strip('"'), '"0000"', "W/" + etag):
        r = client.get(name, headers={"Range": "bytes=100-", "If-Range": other})
        assert r.status_code == 200 and len(r.content) == size, other


# ---------------------------------------------------------------- share link


def test_share_link_zip_mode(sample_release: SampleRelease) -> None:
    name = sample_release.subject_archives[0]
    token = sample_release.token
    with ShareServer(sample_release.root, token=token, share_link_mode="zip") as server:
        url = server.share_link(name)
        r = requests.get(url, allow_redirects=False, timeout=10, verify=True)
        assert r.status_code == 302
        location = r.headers["Location"]
        assert location == f"/public.php/dav/files/{token}/?accept=zip&files={quote(name)}"
        r = requests.get(url, timeout=10, verify=True, headers={"Range": "bytes=100-"})
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/zip"
        assert "Content-Length" not in r.headers
        assert r.content.startswith(b"PK\x03\x04")
        with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
            assert zf.namelist() == [name]
            inner = zf.read(name)
        assert hashlib.sha1(inner).hexdigest() == sample_release.sha1[name]
        assert hashlib.sha1(r.content).hexdigest() != sample_release.sha1[name]
        statuses = [rec.status for rec in server.requests]
        assert statuses == [302, 302, 200]


def test_share_link_direct_without_files_is_a_zip(client: Any, share_server: ShareServer) -> None:
    url = f"{share_server.url}/index.php/s/{client.token}/download?path=%2F"
    r = client.request("GET", url)
    assert r.status_code == 200 and r.content.startswith(b"PK\x03\x04")
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert "LICENSE.md" in zf.namelist()


def test_share_link_json_file_list(client: Any, sample_release: SampleRelease) -> None:
    names = list(sample_release.metadata_archives[:2])
    url = client.server.dav_url + "?accept=zip&files=" + quote(str(names).replace("'", '"'))
    r = client.request("GET", url)
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert zf.namelist() == names


def test_share_link_wrong_token(client: Any, share_server: ShareServer) -> None:
    url = f"{share_server.url}/index.php/s/wrong/download?path=%2F&files=LICENSE.md"
    assert client.request("GET", url).status_code == 404


# ---------------------------------------------------------------- HTTPS, load, log


def test_https(https_client: Any, sample_release: SampleRelease, multistatus: Any) -> None:
    assert https_client.server.url.startswith("https://127.0.0.1:")
    name = sample_release.subject_archives[0]
    r = https_client.get(name)
    assert r.status_code == 200 and r.content == (sample_release.root / name).read_bytes()
    r = https_client.get(name, "v2", headers={"Range": "bytes=10-"})
    assert r.status_code == 206
    assert len(multistatus(https_client.propfind("", "v2"))) == len(sample_release.files) + 1


def test_https_rejects_unknown_ca(https_client: Any) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(https_client.url("LICENSE.md", "v2"), timeout=10, verify=__file__)


def test_many_clients_at_once(share_server: ShareServer, sample_release: SampleRelease) -> None:
    names = list(sample_release.files) * 3

    def fetch(name: str) -> bool:
        r = requests.get(share_server.dav_url + name, timeout=10, verify=True)
        return hashlib.sha1(r.content).hexdigest() == sample_release.sha1[name]

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(fetch, names))


def test_rate_limit(sample_release: SampleRelease) -> None:
    name = max(sample_release.archives, key=lambda n: sample_release.sizes[n])
    size = sample_release.sizes[name]
    rate = size / 0.6  # about 0.6 s for the file
    token = sample_release.token
    with ShareServer(sample_release.root, token=token, rate_limit=rate) as server:
        t0 = time.monotonic()
        r = requests.get(server.dav_url + name, timeout=10, verify=True)
        elapsed = time.monotonic() - t0
    assert len(r.content) == size
    assert 0.45 < elapsed < 5


def test_request_log(client: Any, share_server: ShareServer, sample_release: SampleRelease) -> None:
    name = sample_release.subject_archives[0]
    client.get(name, headers={"Range": "bytes=5-"})
    client.get(name, "v2")
    client.head(name, "link")
    log = list(share_server.requests)
    assert [(r.method, r.range, r.status) for r in log] == [
        ("GET", "bytes=5-", 206),
        ("GET", None, 200),
        ("HEAD", None, 200),
    ]
    assert log[0].path == f"/public.php/webdav/{name}"
    assert len(share_server.requests.for_file(name)) == 2
    assert len(share_server.requests.for_file(name, method=None)) == 3
    method, path, rng, status = log[1]
    assert (method, rng, status) == ("GET", None, 200) and path.endswith(name)


def test_debug_log_masks_the_token(
    client: Any, sample_release: SampleRelease, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bimcv_fetch.server")
    assert client.get("LICENSE.md", "v2").status_code == 200
    assert "<token>" in caplog.text
    assert sample_release.token not in caplog.text
