"""Running the share server: :class:`ShareServer`, the WSGI app on cheroot in a thread.

cheroot comes with the ``serve`` extra; it is imported when a server starts.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from bimcv_fetch.errors import ConfigError
from bimcv_fetch.server.app import ShareApp
from bimcv_fetch.server.delivery import Abort
from bimcv_fetch.server.faults import FaultPlan
from bimcv_fetch.server.protocol import (
    DEFAULT_CHUNK,
    LEGACY_ROOT,
    LINK_ROOT,
    V2_ROOT,
    ShareLinkMode,
)
from bimcv_fetch.server.request_log import RequestLog

__all__ = ["ShareServer"]

log = logging.getLogger("bimcv_fetch.server")


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
        if isinstance(exc, Abort):
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
