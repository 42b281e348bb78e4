"""PROPFIND: the 207 Multi-Status answer listing the share or one of its files.

``Depth: 0`` or ``1`` (missing = 1) answer with the folder first, ``d:``
prefix and URL-encoded ``d:href``; ``Depth: infinity`` → 403. Requested
properties an entry lacks come back in a 404 propstat; no body (or
``allprop``) means every property the entry has.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from bimcv_fetch.server.files import Entry, ShareFiles, content_type
from bimcv_fetch.server.protocol import StartResponse, error, http_date, not_found

DAV = "DAV:"

Props = dict[tuple[str, str], str]
Wanted = list[tuple[str, str]] | None


def propfind(
    files: ShareFiles, environ: dict[str, Any], start: StartResponse, base: str, name: str | None
) -> Iterable[bytes]:
    """Answer a PROPFIND on the folder (``name`` None) or on one file, under ``base``."""
    depth = str(environ.get("HTTP_DEPTH", "1")).strip().lower()
    if depth == "infinity":
        message = "PROPFIND requests with a Depth of 'infinity' are not allowed"
        return error(start, 403, "Forbidden", message)
    if depth not in ("0", "1"):
        return error(start, 400, "BadRequest", f"invalid Depth {depth!r}")
    try:
        wanted = requested_props(environ)
    except ElementTree.ParseError:
        return error(start, 400, "BadRequest", "The request body is not valid XML")
    entries = files.entries()
    responses: list[str] = []
    if name is None:
        folder_props: Props = {
            (DAV, "getetag"): escape(files.folder_etag(entries)),
            (DAV, "getlastmodified"): http_date(
                max([os.stat(files.root).st_mtime, *(e.st.st_mtime for e in entries)])
            ),
            (DAV, "resourcetype"): "<d:collection/>",
        }
        responses.append(response_xml(base + "/", folder_props, wanted))
        if depth == "1":
            for e in entries:
                responses.append(_file_response(files, base, e, wanted))
    else:
        entry = files.entry(name)
        if entry is None:
            return not_found(start, name)
        responses.append(_file_response(files, base, entry, wanted))
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


def requested_props(environ: dict[str, Any]) -> Wanted:
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
    prop = tree.find(f"{{{DAV}}}prop")
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


def _file_response(files: ShareFiles, base: str, e: Entry, wanted: Wanted) -> str:
    props: Props = {
        (DAV, "getcontentlength"): str(e.st.st_size),
        (DAV, "getetag"): escape(files.etag(e)),
        (DAV, "getlastmodified"): http_date(e.st.st_mtime),
        (DAV, "resourcetype"): "",
        (DAV, "getcontenttype"): escape(content_type(e.name)),
    }
    return response_xml(f"{base}/{quote(e.name, safe='()~:@')}", props, wanted)


def response_xml(href: str, props: Props, wanted: Wanted) -> str:
    """One ``d:response``: the found properties (200 propstat), the missing ones (404)."""
    keys = wanted if wanted is not None else list(props)
    found, missing = [], []
    for i, (ns, local) in enumerate(keys):
        if ns == DAV:
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
