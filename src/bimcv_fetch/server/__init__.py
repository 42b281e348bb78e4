"""A local Nextcloud-compatible share server, a sample-release builder and fault injection.

Everything here runs without the internet: tests, demos and benchmarks build a
miniature release with :func:`build_sample` and serve it with
:class:`ShareServer`, which answers like b2drop's public share (legacy WebDAV,
public DAV v2, share link; see :mod:`bimcv_fetch.server.app`). A
:class:`FaultPlan` makes chosen GETs misbehave (drops, stalls, 429/503, bad
ranges, flipped bytes, changed ETags …; see :mod:`bimcv_fetch.server.faults`).

The server needs the ``serve`` extra (cheroot, trustme); it is imported lazily,
so importing this package never fails for lack of it.

How the CLI runs ``bimcv-fetch serve`` (it prints the URL and token itself)::

    from bimcv_fetch.server import FaultPlan, ShareServer, make_tls_files

    faults = FaultPlan.from_file(faults_path) if faults_path else None
    tls = make_tls_files(state_dir / "tls").server_pair if https else None
    server = ShareServer(folder, token=token, host=host, port=port, tls=tls,
                         share_link_mode=mode, rate_limit=rate, faults=faults)
    server.start()              # binds now: server.url holds the real port
    echo(f"serving {folder} at {server.url} (token from --token)")
    server.serve_forever()      # blocks; returns after Ctrl-C, server stopped

``serve_forever()`` swallows KeyboardInterrupt and always stops the server.
Library code here never prints; it logs to the ``bimcv_fetch.server`` logger
(DEBUG: one line per request, with the token masked).
"""

from __future__ import annotations

from bimcv_fetch.server.app import ShareApp
from bimcv_fetch.server.faults import Fault, FaultKind, FaultPlan
from bimcv_fetch.server.request_log import RequestLog, RequestRecord
from bimcv_fetch.server.runner import ShareServer
from bimcv_fetch.server.sample import SampleMember, SampleRelease, build_sample
from bimcv_fetch.server.tls import TlsFiles, make_tls_files

__all__ = [
    "Fault",
    "FaultKind",
    "FaultPlan",
    "RequestLog",
    "RequestRecord",
    "SampleMember",
    "SampleRelease",
    "ShareApp",
    "ShareServer",
    "TlsFiles",
    "build_sample",
    "make_tls_files",
]
