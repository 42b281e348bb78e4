"""Helpers for the server tests: a tiny client that always passes verify= and timeout=."""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree

import pytest
import requests

from bimcv_fetch.server import SampleRelease, ShareServer, TlsFiles

DAV = "{DAV:}"
XRW = {"X-Requested-With": "XMLHttpRequest"}


class Client:
    """Requests against one ShareServer, on any of its three endpoints."""

    def __init__(self, server: ShareServer, token: str, verify: bool | str = True) -> None:
        self.server = server
        self.token = token
        self.verify = verify
        self.session = requests.Session()

    def url(self, name: str = "", endpoint: str = "legacy") -> str:
        if endpoint == "legacy":
            return self.server.webdav_url + name
        if endpoint == "v2":
            return self.server.dav_url + name
        if endpoint == "link":
            return self.server.share_link(name)
        raise ValueError(endpoint)

    def request(self, method: str, url: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 10)
        kw.setdefault("verify", self.verify)
        return self.session.request(method, url, **kw)

    def get(self, name: str, endpoint: str = "legacy", **kw: Any) -> requests.Response:
        if endpoint == "legacy":
            kw.setdefault("auth", (self.token, ""))
        return self.request("GET", self.url(name, endpoint), **kw)

    def head(self, name: str, endpoint: str = "legacy", **kw: Any) -> requests.Response:
        if endpoint == "legacy":
            kw.setdefault("auth", (self.token, ""))
        return self.request("HEAD", self.url(name, endpoint), **kw)

    def propfind(
        self,
        name: str = "",
        endpoint: str = "legacy",
        depth: str | None = "1",
        body: str | None = None,
        xrw: bool = True,
        **kw: Any,
    ) -> requests.Response:
        headers = dict(XRW) if xrw else {}
        if depth is not None:
            headers["Depth"] = depth
        if endpoint == "legacy":
            kw.setdefault("auth", (self.token, ""))
        return self.request("PROPFIND", self.url(name, endpoint), headers=headers, data=body, **kw)


def multistatus(response: requests.Response) -> list[dict[str, Any]]:
    """Parse a 207 body into one dict per d:response (href, status-200 props)."""
    assert response.status_code == 207, response.text
    root = ElementTree.fromstring(response.content)
    assert root.tag == f"{DAV}multistatus"
    out = []
    for resp in root.findall(f"{DAV}response"):
        href = resp.findtext(f"{DAV}href")
        entry: dict[str, Any] = {"href": href, "missing": []}
        for propstat in resp.findall(f"{DAV}propstat"):
            status = propstat.findtext(f"{DAV}status") or ""
            prop = propstat.find(f"{DAV}prop")
            assert prop is not None
            for p in prop:
                if " 200 " in status:
                    entry[p.tag] = p
                else:
                    entry["missing"].append(p.tag)
        out.append(entry)
    return out


@pytest.fixture
def client(share_server: ShareServer, sample_release: SampleRelease) -> Client:
    return Client(share_server, sample_release.token)


@pytest.fixture
def https_client(
    https_share_server: ShareServer, sample_release: SampleRelease, tls_files: TlsFiles
) -> Client:
    return Client(https_share_server, sample_release.token, verify=str(tls_files.ca))


@pytest.fixture(name="multistatus")
def multistatus_fixture() -> Any:
    """The :func:`multistatus` parser, for tests."""
    return multistatus
