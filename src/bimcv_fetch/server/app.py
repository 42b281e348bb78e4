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

This module routes requests and checks auth; the rest lives beside it:
:mod:`~bimcv_fetch.server.files` (visible files, ETags, SHA1s),
:mod:`~bimcv_fetch.server.dav` (PROPFIND), :mod:`~bimcv_fetch.server.ranges`
(Range, If-Range, 416), :mod:`~bimcv_fetch.server.delivery` (sending bytes,
faults, rate limit), :mod:`~bimcv_fetch.server.ziplink` (zips on the fly),
:mod:`~bimcv_fetch.server.request_log` and :mod:`~bimcv_fetch.server.runner`
(:class:`~bimcv_fetch.server.runner.ShareServer`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from bimcv_fetch.manifest import is_archive_name
from bimcv_fetch.server import dav, delivery, ranges, ziplink
from bimcv_fetch.server.faults import FaultPlan
from bimcv_fetch.server.files import Entry, ShareFiles, content_type
from bimcv_fetch.server.protocol import (
    DEFAULT_CHUNK,
    LEGACY_ROOT,
    LINK_ROOT,
    V2_ROOT,
    Headers,
    ShareLinkMode,
    StartResponse,
    error,
    files_list,
    http_date,
    not_found,
    sabre_error,
    status_line,
)
from bimcv_fetch.server.request_log import RequestLog, RequestRecord

__all__ = ["ShareApp"]

log = logging.getLogger("bimcv_fetch.server")

_WRITE_METHODS = frozenset(
    {"PUT", "DELETE", "MKCOL", "MOVE", "COPY", "PROPPATCH", "LOCK", "UNLOCK", "POST", "PATCH"}
)
_CSRF_FREE = frozenset({"GET", "HEAD", "OPTIONS"})


class ShareApp:
    """The WSGI application. Usually built by :class:`~bimcv_fetch.server.ShareServer`."""

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
        self.files = ShareFiles(self.root)

    # ------------------------------------------------------------ files

    def entries(self) -> list[Entry]:
        """The files of the share, sorted by name."""
        return self.files.entries()

    def etag(self, entry: Entry) -> str:
        return self.files.etag(entry)

    def change_etag(self, entry: Entry) -> str:
        """Give ``entry`` a new ETag from now on; returns it."""
        return self.files.change_etag(entry)

    def sha1_of(self, entry: Entry) -> str:
        """SHA1 of a file, computed once per (size, mtime) and cached."""
        return self.files.sha1_of(entry)

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
                return error(start, 404, "NotFound", "Share not found")
            if self.password and not self._password_ok(environ):
                return self._unauthorized(start, "Password required")
            return self._dav(environ, start, method, "/" + rest, V2_ROOT + token, query)
        if path.startswith(LINK_ROOT):
            return self._share_link(environ, start, method, path[len(LINK_ROOT) :], query)
        return error(start, 404, "NotFound", "Not found")

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
        body = sabre_error("NotAuthenticated", message)
        start(
            status_line(401),
            [
                ("Content-Type", "application/xml; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("WWW-Authenticate", 'Basic realm="Nextcloud", charset="UTF-8"'),
            ],
        )
        return [body]

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
            return error(start, 401, "NotAuthenticated", "CSRF check not passed.")
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
            return error(start, 403, "Forbidden", "Permission denied: read-only share")
        if method == "PROPFIND":
            return dav.propfind(self.files, environ, start, base, None if is_folder else name)
        if method not in ("GET", "HEAD"):
            allow = [("Allow", "OPTIONS, GET, HEAD, PROPFIND")]
            return error(start, 405, "MethodNotAllowed", f"{method} is not allowed", allow)
        if is_folder:
            params = parse_qs(query)
            if params.get("accept", [""])[0] == "zip" and base.startswith(V2_ROOT):
                files = [f for v in params.get("files", []) for f in files_list(v)]
                return self._zip(environ, start, method, files)
            return error(start, 405, "MethodNotAllowed", "GET is not allowed on a folder")
        entry = self.files.entry(name)
        if entry is None:
            return not_found(start, name)
        return self._file(environ, start, method, entry, [])

    # ------------------------------------------------------------ share link

    def _share_link(
        self, environ: dict[str, Any], start: StartResponse, method: str, rest: str, query: str
    ) -> Iterable[bytes]:
        token, _, action = rest.partition("/")
        if token != self.token:
            return error(start, 404, "NotFound", "Share not found")
        if action.rstrip("/") != "download":
            return error(start, 404, "NotFound", "Not found")
        if method not in ("GET", "HEAD"):
            return error(start, 405, "MethodNotAllowed", f"{method} is not allowed")
        if self.password and not self._password_ok(environ):
            return self._unauthorized(start, "Password required")
        params = parse_qs(query)
        folder = params.get("path", ["/"])[0].strip("/")
        if folder:
            return error(start, 404, "NotFound", f"Folder {folder} not found")
        raw_files = params.get("files", [])
        files = [f for v in raw_files for f in files_list(v)]
        if self.share_link_mode == "zip":
            location = ziplink.zip_location(self.token, raw_files)
            start("302 Found", [("Location", location), ("Content-Length", "0")])
            return []
        if len(files) == 1:
            entry = self.files.entry(files[0])
            if entry is None:
                return error(start, 404, "NotFound", f"File {files[0]} not found")
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
        entry: Entry,
        extra: Headers,
    ) -> Iterable[bytes]:
        fault = self.faults.take(entry.name) if method == "GET" else None
        if fault is not None:
            log.debug("fault %s on %s", fault.kind, entry.name)
        if fault is not None and fault.kind == "status":
            return delivery.status_fault(start, fault)
        if fault is not None and fault.kind == "error_page":
            return delivery.error_page_fault(start)
        if fault is not None and fault.kind == "change_etag":
            etag = self.change_etag(entry)
        else:
            etag = self.etag(entry)
        size = entry.st.st_size
        headers: Headers = [
            ("Content-Type", content_type(entry.name)),
            ("ETag", etag),
            ("Last-Modified", http_date(entry.st.st_mtime)),
            *extra,
        ]
        if self.oc_checksum and is_archive_name(entry.name):
            headers.append(("OC-Checksum", "SHA1:" + self.sha1_of(entry)))
        if fault is not None and fault.kind == "gzip_header":
            headers.append(("Content-Encoding", "gzip"))
        range_header = environ.get("HTTP_RANGE")
        if range_header is not None and not ranges.if_range_ok(
            environ.get("HTTP_IF_RANGE"), etag, entry.st.st_mtime
        ):
            range_header = None
        if fault is not None and fault.kind == "ignore_range":
            range_header = None
        wanted = ranges.parse_range(str(range_header), size) if range_header is not None else None
        if wanted == "unsatisfiable":
            return ranges.unsatisfiable(start, size, etag)
        if wanted is not None:
            first, last = wanted
            if fault is not None and fault.kind == "wrong_start":
                first = min(max(0, first + fault.delta), size - 1)
                last = max(last, first)
            status = "206 Partial Content"
            headers.append(ranges.content_range(first, last, size))
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
        chunks = delivery.read_range(
            entry.path, first, length, flip, xor, chunk=self.chunk_size, rate_limit=self.rate_limit
        )
        return delivery.shape(
            chunks, fault, write, rate_limit=self.rate_limit, stop=self.stop_event
        )

    def _zip(
        self, environ: dict[str, Any], start: StartResponse, method: str, files: list[str]
    ) -> Iterable[bytes]:
        if files:
            entries = []
            for name in files:
                entry = self.files.entry(name)
                if entry is None:
                    return error(start, 404, "NotFound", f"File {name} not found")
                entries.append(entry)
        else:
            entries = self.entries()
        fault = self.faults.take(entries[0].name) if method == "GET" and len(entries) == 1 else None
        if fault is not None and fault.kind == "status":
            return delivery.status_fault(start, fault)
        write = start(
            "200 OK",
            [
                ("Content-Type", "application/zip"),
                ("Content-Disposition", f'attachment; filename="{ziplink.zip_name(entries)}"'),
            ],
        )
        if method == "HEAD":
            return []
        chunks = ziplink.zip_chunks(entries, self.chunk_size)
        return delivery.shape(
            chunks, fault, write, rate_limit=self.rate_limit, stop=self.stop_event
        )
