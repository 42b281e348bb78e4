"""What the share server's modules share: endpoints, WSGI types and Sabre-style answers.

The three endpoint roots of a Nextcloud public share, the ``files`` query
parameter (one name or a JSON list), HTTP dates and status lines, and the XML
error bodies Nextcloud's Sabre DAV server sends.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Literal
from xml.sax.saxutils import escape

StartResponse = Callable[..., Callable[[bytes], object]]
Headers = list[tuple[str, str]]
ShareLinkMode = Literal["direct", "zip"]

LEGACY_ROOT = "/public.php/webdav"
V2_ROOT = "/public.php/dav/files/"
LINK_ROOT = "/index.php/s/"
DEFAULT_CHUNK = 1 << 20


def files_list(value: str) -> list[str]:
    """The names of one ``files`` query value: a single name or a JSON list of names."""
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            return [value]
        if isinstance(items, list):
            return [str(i) for i in items]
    return [value] if value else []


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def status_line(code: int) -> str:
    if code == 416:
        return "416 Requested Range Not Satisfiable"
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


def sabre_error(exception: str, message: str) -> bytes:
    """The XML body of a Sabre DAV error (``Sabre\\DAV\\Exception\\<exception>``)."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<d:error xmlns:d="DAV:" xmlns:s="http://sabredav.org/ns">\n'
        f"  <s:exception>Sabre\\DAV\\Exception\\{escape(exception)}</s:exception>\n"
        f"  <s:message>{escape(message)}</s:message>\n"
        "</d:error>\n"
    ).encode()


def error(
    start: StartResponse,
    code: int,
    exception: str,
    message: str,
    extra: Headers | None = None,
) -> list[bytes]:
    """Answer ``code`` with a Sabre error body (plus ``extra`` headers)."""
    body = sabre_error(exception, message)
    headers: Headers = [
        ("Content-Type", "application/xml; charset=utf-8"),
        ("Content-Length", str(len(body))),
        *(extra or []),
    ]
    start(status_line(code), headers)
    return [body]


def not_found(start: StartResponse, name: str) -> list[bytes]:
    return error(start, 404, "NotFound", f"File with name {name} could not be located")
