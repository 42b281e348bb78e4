"""The Nextcloud public share: endpoints, auth, the PROPFIND listing, zip detection.

Three ways into one share (see the b2drop notes):

    webdav  /public.php/webdav/NAME                  Basic auth, user = token
    dav     /public.php/dav/files/TOKEN/NAME         no auth unless a password
    https   /index.php/s/TOKEN/download?path=/&files=NAME   the share link
"""

from __future__ import annotations

import email.utils
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:  # requests is imported where it is used: offline commands start faster
    import requests

from bimcv_fetch import __version__
from bimcv_fetch.errors import ConfigError, NetworkError

Protocol = Literal["webdav", "dav", "https"]
PROTOCOLS: tuple[Protocol, ...] = ("webdav", "dav", "https")
DEFAULT_SERVER = "https://b2drop.bsc.es"
USER_AGENT = f"bimcv-fetch/{__version__}"

_DAV = "{DAV:}"
_PROPFIND_BODY = (
    '<?xml version="1.0" encoding="utf-8"?>\n'
    '<d:propfind xmlns:d="DAV:"><d:prop>'
    "<d:getcontentlength/><d:getetag/><d:getlastmodified/><d:resourcetype/>"
    "</d:prop></d:propfind>"
)

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    etag: str | None
    last_modified: float | None
    is_dir: bool = False


@dataclass(frozen=True)
class Share:
    """Where a share lives and how to talk to it. ``repr`` never shows the token."""

    server: str
    token: str
    password: str = ""
    protocol: Protocol = "webdav"
    verify: bool | str = True  # True (system CAs via certifi) or a CA bundle path
    timeout: float = 30.0

    def __repr__(self) -> str:
        return f"Share(server={self.server!r}, protocol={self.protocol!r})"

    @property
    def base(self) -> str:
        return self.server.rstrip("/")

    def file_url(self, name: str, protocol: Protocol | None = None) -> str:
        proto = protocol or self.protocol
        q = quote(name)
        if proto == "webdav":
            return f"{self.base}/public.php/webdav/{q}"
        if proto == "dav":
            return f"{self.base}/public.php/dav/files/{quote(self.token, safe='')}/{q}"
        return (
            f"{self.base}/index.php/s/{quote(self.token, safe='')}/download"
            f"?path=%2F&files={quote(name, safe='')}"
        )

    def root_url(self, protocol: Protocol | None = None) -> str:
        proto = protocol or self.protocol
        if proto == "dav":
            return f"{self.base}/public.php/dav/files/{quote(self.token, safe='')}/"
        return f"{self.base}/public.php/webdav/"

    def auth(self, protocol: Protocol | None = None) -> tuple[str, str] | None:
        proto = protocol or self.protocol
        if proto == "webdav":
            return (self.token, self.password)
        if proto == "dav" and self.password:
            return ("anonymous", self.password)
        return None

    def redact(self, text: str) -> str:
        """``text`` with the token (and its URL-quoted form) masked."""
        if not self.token:
            return text
        for form in {self.token, quote(self.token, safe="")}:
            text = text.replace(form, "***")
        return text


def new_session(pool_size: int = 10) -> requests.Session:
    import requests

    s = requests.Session()
    s.trust_env = False  # no proxies or CA bundle from the environment: verify= decides
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    s.headers.update(
        {
            "User-Agent": USER_AGENT,
            "X-Requested-With": "XMLHttpRequest",
            "Accept-Encoding": "identity",
        }
    )
    return s


def check_status(share: Share, response: requests.Response, what: str) -> None:
    """Turn a refusal into a clear one-line error (never retried)."""
    code = response.status_code
    if code in (401, 403):
        raise ConfigError(
            f"{what}: the server refused the share token ({code})",
            hint="check --token / BIMCV_FETCH_TOKEN and that your access request was granted",
        )
    if code == 404:
        raise ConfigError(
            f"{what}: not found on {share.base} (404)",
            hint="check --server, --token and --release",
        )
    if code >= 400:
        raise NetworkError(f"{what}: server answered {code} {response.reason}")


def list_share(share: Share, session: requests.Session) -> list[RemoteFile]:
    """PROPFIND Depth 1 on the share root (legacy WebDAV unless --protocol dav)."""
    import requests

    proto: Protocol = "dav" if share.protocol == "dav" else "webdav"
    url = share.root_url(proto)
    try:
        r = session.request(
            "PROPFIND",
            url,
            data=_PROPFIND_BODY.encode(),
            headers={"Depth": "1", "Content-Type": "application/xml; charset=utf-8"},
            auth=share.auth(proto),
            verify=share.verify,
            timeout=share.timeout,
        )
    except requests.exceptions.SSLError as exc:
        raise NetworkError(
            f"TLS error talking to {share.base}: {share.redact(_short(exc))}",
            hint="pass --ca-bundle FILE if the server uses a private CA",
        ) from exc
    except requests.RequestException as exc:
        raise NetworkError(f"cannot reach {share.base}: {share.redact(_short(exc))}") from exc
    check_status(share, r, "share listing")
    if r.status_code != 207:
        raise NetworkError(f"share listing: expected 207 Multi-Status, got {r.status_code}")
    return parse_multistatus(r.content, urlsplit(url).path)


def parse_multistatus(body: bytes, root_path: str) -> list[RemoteFile]:
    try:
        tree = ET.fromstring(body)
    except ET.ParseError as exc:
        raise NetworkError(f"share listing: the server sent invalid XML ({exc})") from None
    out: list[RemoteFile] = []
    root_norm = unquote(root_path).rstrip("/")
    for resp in tree.iter(f"{_DAV}response"):
        href = resp.findtext(f"{_DAV}href") or ""
        path = unquote(urlsplit(href).path).rstrip("/")
        if path == root_norm:
            continue
        name = path.rsplit("/", 1)[-1]
        props: dict[str, str] = {}
        is_dir = False
        for propstat in resp.iter(f"{_DAV}propstat"):
            status = propstat.findtext(f"{_DAV}status") or "200"
            if " 200 " not in f" {status} " and "200" not in status:
                continue
            prop = propstat.find(f"{_DAV}prop")
            if prop is None:
                continue
            for child in prop:
                if child.tag == f"{_DAV}resourcetype":
                    is_dir = child.find(f"{_DAV}collection") is not None
                else:
                    props[child.tag.removeprefix(_DAV)] = (child.text or "").strip()
        size = props.get("getcontentlength")
        lm = props.get("getlastmodified")
        out.append(
            RemoteFile(
                name=name,
                size=int(size) if size and size.isdigit() else None,
                etag=props.get("getetag") or None,
                last_modified=_http_date(lm) if lm else None,
                is_dir=is_dir,
            )
        )
    return out


def _http_date(text: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


_KNOWN_CAUSES = (
    ("Connection refused", "connection refused"),
    ("Name or service not known", "cannot resolve the host name"),
    ("Failed to resolve", "cannot resolve the host name"),
    ("Temporary failure in name resolution", "cannot resolve the host name"),
    ("No route to host", "no route to host"),
    ("Network is unreachable", "network unreachable"),
    ("timed out", "timed out"),
    ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed"),
)


def _short(exc: BaseException) -> str:
    """One readable phrase for a requests/urllib3 error (their texts nest three deep)."""
    text = str(exc)
    for needle, phrase in _KNOWN_CAUSES:
        if needle in text:
            return phrase
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:200]


def looks_like_zip(content_type: str | None, head: bytes) -> bool:
    """True for the Nextcloud 31 share-link zip built on the fly."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    return ctype in ("application/zip", "application/x-zip-compressed") or head.startswith(
        ZIP_MAGIC
    )
