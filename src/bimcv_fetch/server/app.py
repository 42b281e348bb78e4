"""A read-only share server that answers like b2drop's Nextcloud public share.

The WSGI application (:class:`ShareApp`) serves the regular files directly inside
one folder (a flat share; subfolders and dotfiles are invisible) on the three
endpoints a client may use:

``/public.php/webdav/<file>``
    Legacy public WebDAV. HTTP Basic auth, username = token, password = the share
    password (any password, even none, when the share has none). Otherwise 401
    with ``WWW-Authenticate: Basic realm="Nextcloud"``.
``/public.php/dav/files/<token>/<file>``
    Public DAV v2. No auth unless the share has a password (then Basic auth with
    any username and that password). Wrong token: 404. ``GET <folder>/?accept=zip
    &files=NAME`` streams a zip built on the fly.
``/index.php/s/<token>/download?path=/&files=NAME``
    Share link. ``share_link_mode="direct"`` serves the file itself (Range works,
    ``Content-Disposition: attachment``); ``"zip"`` (Nextcloud 31) answers 302 to
    the v2 ``?accept=zip`` URL. Without ``files`` (or with a JSON list of several)
    it is always a zip.

Behaviour common to the DAV endpoints:

- Every method other than GET, HEAD and OPTIONS needs ``X-Requested-With:
  XMLHttpRequest``; without it the answer is **401** with the Sabre message
  ``CSRF check not passed.`` (what Nextcloud answers), after the auth check.
- ``PROPFIND`` with ``Depth: 0`` or ``1`` (missing = 1) → 207 Multi-Status,
  folder first, ``d:`` prefix, URL-encoded ``d:href``; ``Depth: infinity`` → 403.
  Requested properties the entry lacks come back in a 404 propstat.
- GET/HEAD send ``Content-Length``, ``ETag``, ``Last-Modified``, ``Content-Type``
  and, for archives only when ``oc_checksum`` is on, ``OC-Checksum: SHA1:<hex>``
  (computed once per file version and cached); never ``Accept-Ranges`` (only
  OPTIONS advertises it, with ``DAV: 1, 3``).
- One ``Range: bytes=N-``, ``bytes=N-M`` or ``bytes=-S`` → 206 with an exact
  ``Content-Range``; a start at or past the end → 416 with ``bytes */SIZE``;
  several ranges or bad syntax → 200 and the whole file. ``If-Range`` is compared
  exactly (quotes included) with the ETag; a mismatch → 200 and the whole file.
- Write methods → 403 (read-only share); unknown methods → 405.

Faults (:mod:`bimcv_fetch.server.faults`) are taken by each GET that sends a
file's bytes. ``rate_limit`` caps each response at that many bytes per second.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import socket
import stat
import sys
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qs, quote
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from bimcv_fetch.errors import ConfigError
from bimcv_fetch.manifest import is_archive_name
from bimcv_fetch.server.faults import Fault, FaultPlan

__all__ = ["RequestLog", "RequestRecord", "ShareApp", "ShareServer"]

log = logging.getLogger("bimcv_fetch.server")

StartResponse = Callable[..., Callable[[bytes], object]]
Headers = list[tuple[str, str]]
ShareLinkMode = Literal["direct", "zip"]

LEGACY_ROOT = "/public.php/webdav"
V2_ROOT = "/public.php/dav/files/"
LINK_ROOT = "/index.php/s/"
DEFAULT_CHUNK = 1 << 20
_WRITE_METHODS = frozenset(
    {"PUT", "DELETE", "MKCOL", "MOVE", "COPY", "PROPPATCH", "LOCK", "UNLOCK", "POST", "PATCH"}
)
_CSRF_FREE = frozenset({"GET", "HEAD", "OPTIONS"})
_DAV = "DAV:"
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


class RequestRecord(NamedTuple):
    """One answered request: ``path`` is the decoded path plus ``?query`` if any."""

    method: str
    path: str
    range: str | None
    status: int


class RequestLog:
    """Thread-safe record of the requests a server answered, oldest first."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._items: deque[RequestRecord] = deque(maxlen=maxlen)

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._items.append(record)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def for_file(self, name: str, method: str | None = "GET") -> list[RequestRecord]:
        """Requests for one file on any endpoint (``method=None``: every method)."""
        quoted = quote(name)
        out = []
        for r in self.snapshot():
            if method is not None and r.method != method:
                continue
            path, _, query = r.path.partition("?")
            last = path.rsplit("/", 1)[-1]
            files = parse_qs(query).get("files", [])
            listed = [n for f in files for n in _files_list(f)]
            if last in (name, quoted) or name in listed:
                out.append(r)
        return out


class _Abort(Exception):
    """Raised from a response body to make cheroot close the connection."""


@dataclass(frozen=True)
class _Entry:
    name: str
    path: Path
    st: os.stat_result


def _files_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            return [value]
        if isinstance(items, list):
            return [str(i) for i in items]
    return [value] if value else []


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _status_line(code: int) -> str:
    if code == 416:
        return "416 Requested Range Not Satisfiable"
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


def _content_type(name: str) -> str:
    lower = name.lower()
    if lower.endswith((".tar.gz", ".gz")):
        return "application/gzip"
    if lower.endswith(".tgz"):
        return "application/x-compressed"
    if lower.endswith(".txt"):
        return "text/plain"
    if lower.endswith(".md"):
        return "text/markdown"
    if lower.endswith(".zip"):
        return "application/zip"
    return "application/octet-stream"


def _sabre_error(exception: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<d:error xmlns:d="DAV:" xmlns:s="http://sabredav.org/ns">\n'
        f"  <s:exception>Sabre\\DAV\\Exception\\{escape(exception)}</s:exception>\n"
        f"  <s:message>{escape(message)}</s:message>\n"
        "</d:error>\n"
    ).encode()


def parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One byte range → ``(first, last)`` inclusive, ``"unsatisfiable"``, or None (ignore)."""
    m = _RANGE_RE.fullmatch(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return (start, min(end, size - 1))


class _ZipSink:
    """A write-only, non-seekable stream collecting what zipfile writes."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class ShareApp:
    """The WSGI application. Usually built by :class:`ShareServer`."""

    def __init__(
        self,
        root: Path,
        *,
        token: str,
        password: str = "",
        share_link_mode: ShareLinkMode = "direct",
        oc_checksum: bool = True,
        rate_limit: float | None = None,
        faults: FaultPlan | None = None,
        requests: RequestLog | None = None,
        stop_event: threading.Event | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        if share_link_mode not in ("direct", "zip"):
            raise ValueError(f"share_link_mode must be 'direct' or 'zip', not {share_link_mode!r}")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be positive")
        self.root = Path(root)
        self.token = token
        self.password = password
        self.share_link_mode: ShareLinkMode = share_link_mode
        self.oc_checksum = oc_checksum
        self.rate_limit = rate_limit
        self.faults = faults if faults is not None else FaultPlan()
        self.requests = requests if requests is not None else RequestLog()
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._etag_override: dict[str, str] = {}
        self._sha1_cache: dict[str, tuple[int, int, str]] = {}
        self._sha1_locks: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------ files

    def _entry(self, name: str) -> _Entry | None:
        if (
            not name
            or name in (".", "..")
            or name.startswith(".")
            or "/" in name
            or "\\" in name
            or "\x00" in name
        ):
            return None
        path = self.root / name
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return _Entry(name, path, st)

    def entries(self) -> list[_Entry]:
        """The files of the share, sorted by name."""
        out = []
        try:
            with os.scandir(self.root) as it:
                names = sorted(e.name for e in it)
        except OSError:
            return []
        for name in names:
            entry = self._entry(name)
            if entry is not None:
                out.append(entry)
        return out

    def etag(self, entry: _Entry) -> str:
        with self._lock:
            override = self._etag_override.get(entry.name)
        if override is not None:
            return override
        key = f"{entry.name}:{entry.st.st_size}:{entry.st.st_mtime_ns}"
        return '"' + hashlib.md5(key.encode()).hexdigest() + '"'

    def change_etag(self, entry: _Entry) -> str:
        """Give ``entry`` a new ETag from now on; returns it."""
        old = self.etag(entry)
        new = '"' + hashlib.md5(f"{old}:changed".encode()).hexdigest() + '"'
        with self._lock:
            self._etag_override[entry.name] = new
        return new

    def _folder_etag(self, entries: list[_Entry]) -> str:
        h = hashlib.md5(b"folder")
        for e in entries:
            h.update(self.etag(e).encode())
        return '"' + h.hexdigest() + '"'

    def sha1_of(self, entry: _Entry) -> str:
        """SHA1 of a file, computed once per (size, mtime) and cached."""
        with self._lock:
            lock = self._sha1_locks.setdefault(entry.name, threading.Lock())
        with lock:
            cached = self._sha1_cache.get(entry.name)
            sig = (entry.st.st_size, entry.st.st_mtime_ns)
            if cached is not None and cached[:2] == sig:
                return cached[2]
            h = hashlib.sha1()
            with open(entry.path, "rb") as f:
                while block := f.read(4 << 20):
                    h.update(block)
            digest = h.hexdigest()
            self._sha1_cache[entry.name] = (*sig, digest)
            return digest

    # ------------------------------------------------------------ WSGI

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        raw_path = str(environ.get("PATH_INFO", ""))
        try:
            path = raw_path.encode("latin-1").decode("utf-8")
        except UnicodeError:
            path = raw_path
        query = str(environ.get("QUERY_STRING", ""))
        logged = path + ("?" + query if query else "")
        rng = environ.get("HTTP_RANGE")

        def start(status: str, headers: Headers) -> Callable[[bytes], object]:
            self.requests.add(RequestRecord(method, logged, rng, int(status[:3])))
            if log.isEnabledFor(logging.DEBUG):
                shown = logged.replace(self.token, "<token>") if self.token else logged
                log.debug("%s %s %s -> %s", method, shown, rng, status)
            return start_response(status, headers)

        if path == LEGACY_ROOT or path.startswith(LEGACY_ROOT + "/"):
            rest = path[len(LEGACY_ROOT) :]
            if not self._legacy_auth(environ):
                return self._unauthorized(start, "No public access to this resource.")
            return self._dav(environ, start, method, rest, LEGACY_ROOT, query)
        if path.startswith(V2_ROOT):
            token, _, rest = path[len(V2_ROOT) :].partition("/")
            if token != self.token:
                return self._error(start, 404, "NotFound", "Share not found")
            if self.password and not self._password_ok(environ):
                return self._unauthorized(start, "Password required")
            return self._dav(environ, start, method, "/" + rest, V2_ROOT + token, query)
        if path.startswith(LINK_ROOT):
            return self._share_link(environ, start, method, path[len(LINK_ROOT) :], query)
        return self._error(start, 404, "NotFound", "Not found")

    # ------------------------------------------------------------ auth

    @staticmethod
    def _basic(environ: dict[str, Any]) -> tuple[str, str] | None:
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError):
            return None
        user, _, password = text.partition(":")
        return user, password

    def _legacy_auth(self, environ: dict[str, Any]) -> bool:
        cred = self._basic(environ)
        if cred is None or cred[0] != self.token:
            return False
        return not self.password or cred[1] == self.password

    def _password_ok(self, environ: dict[str, Any]) -> bool:
        cred = self._basic(environ)
        return cred is not None and cred[1] == self.password

    def _unauthorized(self, start: StartResponse, message: str) -> list[bytes]:
        body = _sabre_error("NotAuthenticated", message)
        start(
            _status_line(401),
            [
                ("Content-Type", "application/xml; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("WWW-Authenticate", 'Basic realm="Nextcloud", charset="UTF-8"'),
            ],
        )
        return [body]

    def _error(
        self,
        start: StartResponse,
        code: int,
        exception: str,
        message: str,
        extra: Headers | None = None,
    ) -> list[bytes]:
        body = _sabre_error(exception, message)
        headers: Headers = [
            ("Content-Type", "application/xml; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *(extra or []),
        ]
        start(_status_line(code), headers)
        return [body]

    def _not_found(self, start: StartResponse, name: str) -> list[bytes]:
        return self._error(start, 404, "NotFound", f"File with name {name} could not be located")

    # ------------------------------------------------------------ DAV

    def _dav(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        method: str,
        rest: str,
        base: str,
        query: str,
    ) -> Iterable[bytes]:
        if method not in _CSRF_FREE and environ.get("HTTP_X_REQUESTED_WITH") != "XMLHttpRequest":
            return self._error(start, 401, "NotAuthenticated", "CSRF check not passed.")
        name = rest.lstrip("/") if rest.count("/") <= 1 else "\x00"
        is_folder = name == ""
        if method == "OPTIONS":
            start(
                "200 OK",
                [
                    ("Allow", "OPTIONS, GET, HEAD, PROPFIND"),
                    ("DAV", "1, 3"),
                    ("MS-Author-Via", "DAV"),
                    ("Accept-Ranges", "bytes"),
                    ("Content-Length", "0"),
                ],
            )
            return []
        if method in _WRITE_METHODS:
            return self._error(start, 403, "Forbidden", "Permission denied: read-only share")
        if method == "PROPFIND":
            return self._propfind(environ, start, base, None if is_folder else name)
        if method not in ("GET", "HEAD"):
            allow = [("Allow", "OPTIONS, GET, HEAD, PROPFIND")]
            return self._error(start, 405, "MethodNotAllowed", f"{method} is not allowed", allow)
        if is_folder:
            params = parse_qs(query)
            if params.get("accept", [""])[0] == "zip" and base.startswith(V2_ROOT):
                files = [f for v in params.get("files", []) for f in _files_list(v)]
                return self._zip(environ, start, method, files)
            return self._error(start, 405, "MethodNotAllowed", "GET is not allowed on a folder")
        entry = self._entry(name)
        if entry is None:
            return self._not_found(start, name)
        return self._file(environ, start, method, entry, [])

    def _propfind(
        self, environ: dict[str, Any], start: StartResponse, base: str, name: str | None
    ) -> Iterable[bytes]:
        depth = str(environ.get("HTTP_DEPTH", "1")).strip().lower()
        if depth == "infinity":
            message = "PROPFIND requests with a Depth of 'infinity' are not allowed"
            return self._error(start, 403, "Forbidden", message)
        if depth not in ("0", "1"):
            return self._error(start, 400, "BadRequest", f"invalid Depth {depth!r}")
        try:
            wanted = self._requested_props(environ)
        except ElementTree.ParseError:
            return self._error(start, 400, "BadRequest", "The request body is not valid XML")
        entries = self.entries()
        responses: list[str] = []
        if name is None:
            folder_props: dict[tuple[str, str], str] = {
                (_DAV, "getetag"): escape(self._folder_etag(entries)),
                (_DAV, "getlastmodified"): _http_date(
                    max([os.stat(self.root).st_mtime, *(e.st.st_mtime for e in entries)])
                ),
                (_DAV, "resourcetype"): "<d:collection/>",
            }
            responses.append(self._response_xml(base + "/", folder_props, wanted))
            if depth == "1":
                for e in entries:
                    responses.append(self._file_response(base, e, wanted))
        else:
            entry = self._entry(name)
            if entry is None:
                return self._not_found(start, name)
            responses.append(self._file_response(base, entry, wanted))
        body = (
            '<?xml version="1.0"?>\n'
            '<d:multistatus xmlns:d="DAV:" xmlns:s="http://sabredav.org/ns" '
            'xmlns:oc="http://owncloud.org/ns" xmlns:nc="http://nextcloud.org/ns">'
            + "".join(responses)
            + "</d:multistatus>\n"
        ).encode()
        start(
            "207 Multi-Status",
            [
                ("Content-Type", "application/xml; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Vary", "Brief,Prefer"),
                ("DAV", "1, 3"),
            ],
        )
        return [body]

    @staticmethod
    def _requested_props(environ: dict[str, Any]) -> list[tuple[str, str]] | None:
        """The properties a PROPFIND body asks for; None = all (allprop or no body)."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        stream = environ.get("wsgi.input")
        data = stream.read(min(length, 1 << 16)) if (stream is not None and length > 0) else b""
        if not data.strip():
            return None
        tree = ElementTree.fromstring(data)
        prop = tree.find(f"{{{_DAV}}}prop")
        if prop is None:
            return None
        out = []
        for child in prop:
            tag = child.tag
            if tag.startswith("{"):
                ns, _, local = tag[1:].partition("}")
            else:
                ns, local = "", tag
            out.append((ns, local))
        return out

    def _file_response(self, base: str, e: _Entry, wanted: list[tuple[str, str]] | None) -> str:
        props: dict[tuple[str, str], str] = {
            (_DAV, "getcontentlength"): str(e.st.st_size),
            (_DAV, "getetag"): escape(self.etag(e)),
            (_DAV, "getlastmodified"): _http_date(e.st.st_mtime),
            (_DAV, "resourcetype"): "",
            (_DAV, "getcontenttype"): escape(_content_type(e.name)),
        }
        return self._response_xml(f"{base}/{quote(e.name, safe='()~:@')}", props, wanted)

    @staticmethod
    def _response_xml(
        href: str, props: dict[tuple[str, str], str], wanted: list[tuple[str, str]] | None
    ) -> str:
        keys = wanted if wanted is not None else list(props)
        found, missing = [], []
        for i, (ns, local) in enumerate(keys):
            if ns == _DAV:
                tag, decl = f"d:{local}", ""
            else:
                tag, decl = f"x{i}:{local}", f' xmlns:x{i}="{escape(ns)}"'
            if (ns, local) in props:
                value = props[(ns, local)]
                found.append(f"<{tag}{decl}>{value}</{tag}>" if value else f"<{tag}{decl}/>")
            else:
                missing.append(f"<{tag}{decl}/>")
        out = f"<d:response><d:href>{escape(href)}</d:href>"
        if found:
            out += (
                f"<d:propstat><d:prop>{''.join(found)}</d:prop>"
                "<d:status>HTTP/1.1 200 OK</d:status></d:propstat>"
            )
        if missing:
            out += (
                f"<d:propstat><d:prop>{''.join(missing)}</d:prop>"
                "<d:status>HTTP/1.1 404 Not Found</d:status></d:propstat>"
            )
        return out + "</d:response>"

    # ------------------------------------------------------------ share link

    def _share_link(
        self, environ: dict[str, Any], start: StartResponse, method: str, rest: str, query: str
    ) -> Iterable[bytes]:
        token, _, action = rest.partition("/")
        if token != self.token:
            return self._error(start, 404, "NotFound", "Share not found")
        if action.rstrip("/") != "download":
            return self._error(start, 404, "NotFound", "Not found")
        if method not in ("GET", "HEAD"):
            return self._error(start, 405, "MethodNotAllowed", f"{method} is not allowed")
        if self.password and not self._password_ok(environ):
            return self._unauthorized(start, "Password required")
        params = parse_qs(query)
        folder = params.get("path", ["/"])[0].strip("/")
        if folder:
            return self._error(start, 404, "NotFound", f"Folder {folder} not found")
        raw_files = params.get("files", [])
        files = [f for v in raw_files for f in _files_list(v)]
        if self.share_link_mode == "zip":
            location = f"{V2_ROOT}{quote(self.token)}/?accept=zip"
            for v in raw_files:
                location += "&files=" + quote(v, safe="")
            start("302 Found", [("Location", location), ("Content-Length", "0")])
            return []
        if len(files) == 1:
            entry = self._entry(files[0])
            if entry is None:
                return self._error(start, 404, "NotFound", f"File {files[0]} not found")
            disposition = (
                f"attachment; filename*=UTF-8''{quote(entry.name)}; filename=\"{entry.name}\""
            )
            return self._file(environ, start, method, entry, [("Content-Disposition", disposition)])
        return self._zip(environ, start, method, files)

    # ------------------------------------------------------------ GET

    def _file(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        method: str,
        entry: _Entry,
        extra: Headers,
    ) -> Iterable[bytes]:
        fault = self.faults.take(entry.name) if method == "GET" else None
        if fault is not None:
            log.debug("fault %s on %s", fault.kind, entry.name)
        if fault is not None and fault.kind == "status":
            return self._status_fault(start, fault)
        if fault is not None and fault.kind == "change_etag":
            etag = self.change_etag(entry)
        else:
            etag = self.etag(entry)
        size = entry.st.st_size
        headers: Headers = [
            ("Content-Type", _content_type(entry.name)),
            ("ETag", etag),
            ("Last-Modified", _http_date(entry.st.st_mtime)),
            *extra,
        ]
        if self.oc_checksum and is_archive_name(entry.name):
            headers.append(("OC-Checksum", "SHA1:" + self.sha1_of(entry)))
        if fault is not None and fault.kind == "gzip_header":
            headers.append(("Content-Encoding", "gzip"))
        range_header = environ.get("HTTP_RANGE")
        if range_header is not None and not self._if_range_ok(environ, etag, entry):
            range_header = None
        if fault is not None and fault.kind == "ignore_range":
            range_header = None
        wanted = parse_range(str(range_header), size) if range_header is not None else None
        if wanted == "unsatisfiable":
            body = _sabre_error(
                "RequestedRangeNotSatisfiable",
                "The start offset should be less than the size of the file",
            )
            start(
                _status_line(416),
                [
                    ("Content-Type", "application/xml; charset=utf-8"),
                    ("Content-Range", f"bytes */{size}"),
                    ("Content-Length", str(len(body))),
                    ("ETag", etag),
                ],
            )
            return [body]
        if wanted is not None:
            first, last = wanted
            if fault is not None and fault.kind == "wrong_start":
                first = min(max(0, first + fault.delta), size - 1)
                last = max(last, first)
            status = "206 Partial Content"
            headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
        else:
            first, last = 0, size - 1
            status = "200 OK"
        length = last - first + 1
        headers.append(("Content-Length", str(length)))
        write = start(status, headers)
        if method == "HEAD" or length == 0:
            return []
        flip = fault.offset if fault is not None and fault.kind == "flip_byte" else None
        xor = fault.xor if fault is not None else 0
        chunks = self._read(entry.path, first, length, flip, xor)
        return self._shape(chunks, fault, write)

    def _if_range_ok(self, environ: dict[str, Any], etag: str, entry: _Entry) -> bool:
        value = environ.get("HTTP_IF_RANGE")
        if value is None:
            return True
        value = str(value).strip()
        if value.startswith(('"', "W/")):
            return value == etag
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return False
        return int(entry.st.st_mtime) <= parsed.timestamp()

    def _status_fault(self, start: StartResponse, fault: Fault) -> list[bytes]:
        extra: Headers = []
        if fault.retry_after is not None:
            if fault.retry_after_date:
                when = time.time() + float(fault.retry_after)
                extra.append(("Retry-After", _http_date(when)))
            else:
                extra.append(("Retry-After", fault.retry_after))
        reason = "TooManyRequests" if fault.code == 429 else "ServiceUnavailable"
        return self._error(start, fault.code, reason, f"injected fault: HTTP {fault.code}", extra)

    def _read(
        self, path: Path, first: int, length: int, flip: int | None, xor: int
    ) -> Iterator[bytes]:
        chunk = self.chunk_size
        if self.rate_limit is not None:
            chunk = max(4096, min(chunk, int(self.rate_limit / 20)))
        with open(path, "rb", buffering=0) as f:
            f.seek(first)
            pos, left = first, length
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    raise _Abort(f"{path.name} shrank while being served")
                if flip is not None and pos <= flip < pos + len(data):
                    buf = bytearray(data)
                    buf[flip - pos] ^= xor
                    data = bytes(buf)
                pos += len(data)
                left -= len(data)
                yield data

    def _shape(
        self, chunks: Iterator[bytes], fault: Fault | None, write: Callable[[bytes], object]
    ) -> Iterator[bytes]:
        """Send ``chunks``, applying drop/stall faults, the rate limit and server stop."""
        cut = None
        if fault is not None and fault.kind in ("drop", "truncate", "stall"):
            cut = fault.after
        rate = self.rate_limit
        sent = 0
        t0 = time.monotonic()
        stop = self.stop_event
        try:
            for block in chunks:
                while True:
                    if stop.is_set():
                        raise _Abort("server stopping")
                    if cut is not None and sent == cut:
                        assert fault is not None
                        write(b"")  # make sure status line and headers are out
                        if fault.kind == "stall":
                            stop.wait(fault.seconds)
                            if not fault.resume or stop.is_set():
                                raise _Abort("stall fault")
                            cut = None
                        else:
                            raise _Abort("drop fault")
                    if not block:
                        break
                    piece = block
                    if cut is not None and sent + len(piece) > cut:
                        piece = block[: cut - sent]
                    block = block[len(piece) :]
                    if rate is not None:
                        delay = t0 + (sent + len(piece)) / rate - time.monotonic()
                        if delay > 0 and stop.wait(delay):
                            raise _Abort("server stopping")
                    sent += len(piece)
                    yield piece
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _zip(
        self, environ: dict[str, Any], start: StartResponse, method: str, files: list[str]
    ) -> Iterable[bytes]:
        if files:
            entries = []
            for name in files:
                entry = self._entry(name)
                if entry is None:
                    return self._error(start, 404, "NotFound", f"File {name} not found")
                entries.append(entry)
        else:
            entries = self.entries()
        fault = self.faults.take(entries[0].name) if method == "GET" and len(entries) == 1 else None
        if fault is not None and fault.kind == "status":
            return self._status_fault(start, fault)
        zip_name = entries[0].name + ".zip" if len(entries) == 1 else "download.zip"
        write = start(
            "200 OK",
            [
                ("Content-Type", "application/zip"),
                ("Content-Disposition", f'attachment; filename="{zip_name}"'),
            ],
        )
        if method == "HEAD":
            return []
        return self._shape(self._zip_chunks(entries), fault, write)

    def _zip_chunks(self, entries: list[_Entry]) -> Iterator[bytes]:
        sink = _ZipSink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for e in entries:
                stamp = time.gmtime(max(e.st.st_mtime, 315532800))[:6]
                info = zipfile.ZipInfo(e.name, date_time=stamp)
                info.file_size = e.st.st_size
                info.compress_type = zipfile.ZIP_STORED
                with open(e.path, "rb") as f, zf.open(info, "w") as out:
                    while data := f.read(self.chunk_size):
                        out.write(data)
                        yield sink.take()
                yield sink.take()
        yield sink.take()


# ---------------------------------------------------------------- server


def _require_cheroot() -> Any:
    try:
        from cheroot import wsgi
    except ImportError as exc:  # pragma: no cover - cheroot is in the serve extra
        raise ConfigError(
            "the share server needs the 'cheroot' package", hint="pip install 'bimcv-fetch[serve]'"
        ) from exc
    return wsgi


class ShareServer:
    """A local Nextcloud-like public share over ``root``, run on cheroot in a thread.

    ``port=0`` picks a free port; :attr:`url` shows the real one after
    :meth:`start`. Use as a context manager, or ``start()`` / ``stop()``, or
    :meth:`serve_forever` for a foreground server.
    """

    def __init__(
        self,
        root: Path,
        *,
        token: str,
        password: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        share_link_mode: ShareLinkMode = "direct",
        oc_checksum: bool = True,
        rate_limit: float | None = None,
        faults: FaultPlan | None = None,
        threads: int = 16,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float = 10.0,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"cannot serve {root}: not a folder")
        self.root = root
        self.token = token
        self.host = host
        self.tls = tls
        self.threads = threads
        self.timeout = timeout
        self._port = port
        self._stop = threading.Event()
        self.requests = RequestLog()
        self.faults = faults if faults is not None else FaultPlan()
        self.app = ShareApp(
            root,
            token=token,
            password=password,
            share_link_mode=share_link_mode,
            oc_checksum=oc_checksum,
            rate_limit=rate_limit,
            faults=self.faults,
            requests=self.requests,
            stop_event=self._stop,
            chunk_size=chunk_size,
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ShareServer:
        if self._server is not None:
            return self
        wsgi = _require_cheroot()
        self._stop.clear()
        server = wsgi.Server(
            (self.host, self._port),
            self.app,
            numthreads=self.threads,
            max=self.threads,
            request_queue_size=64,
            timeout=self.timeout,
            shutdown_timeout=1,
            server_name="Apache",
        )
        server.error_log = self._error_log
        server.expiration_interval = 0.1  # how often the accept loop notices stop()
        if self.tls is not None:
            from cheroot.ssl.builtin import BuiltinSSLAdapter

            cert, key = self.tls
            server.ssl_adapter = BuiltinSSLAdapter(str(cert), str(key))
        try:
            server.prepare()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self._port}: {exc}") from exc
        self._server = server
        self._port = int(server.bind_addr[1])
        self._thread = threading.Thread(target=self._serve, name="share-server", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        try:
            self._server.serve()
        except Exception:  # pragma: no cover - logged, the thread just ends
            log.exception("share server stopped on an error")

    def stop(self) -> None:
        """Stop serving: aborts stalled and running responses, closes the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stop.set()
        self._force_close_busy(server)
        server.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @staticmethod
    def _force_close_busy(server: Any) -> None:
        """Shut the sockets of connections being answered, so blocked writes fail now."""
        workers = getattr(getattr(server, "requests", None), "_threads", [])
        for worker in list(workers):
            conn = getattr(worker, "conn", None)
            sock = getattr(conn, "socket", None)
            if sock is None:
                continue
            with contextlib.suppress(OSError, TypeError):
                sock.shutdown(socket.SHUT_RDWR)

    def serve_forever(self) -> None:
        """Start (if needed) and block until Ctrl-C or :meth:`stop`; always stops the server.

        A KeyboardInterrupt is swallowed: the method simply returns.
        """
        self.start()
        try:
            while not self._stop.wait(0.5):
                if not self.running:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> ShareServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _error_log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _Abort):
            log.debug("connection closed on purpose: %s", exc)
            return
        log.log(level, "%s", msg, exc_info=traceback)

    # ------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``scheme://host:port`` without a trailing slash."""
        scheme = "https" if self.tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self._port}"

    @property
    def webdav_url(self) -> str:
        """The legacy public WebDAV root, ending in ``/``."""
        return f"{self.url}{LEGACY_ROOT}/"

    @property
    def dav_url(self) -> str:
        """The public DAV v2 root of the share, ending in ``/``."""
        return f"{self.url}{V2_ROOT}{quote(self.token)}/"

    def share_link(self, name: str) -> str:
        """The share-link download URL of one file."""
        files = quote(name, safe="")
        return f"{self.url}{LINK_ROOT}{quote(self.token)}/download?path=%2F&files={files}"
