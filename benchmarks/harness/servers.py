"""Loopback servers for the benches: the project's share server, and nginx in front of it.

Two ways to serve a sample release:

``ShareServer`` (the project's cheroot server, in a thread of the harness)
    answers everything a client sends to a Nextcloud public share: PROPFIND
    Depth 1 (the listing), GETs of the checksum files and ``tar -tvf`` listings,
    and GETs of the archives. It is used alone for the rate-limited
    parallel-scaling row (``rate_limit`` caps each response).

``Nginx`` (``nginx`` as a child process, one process, ``daemon off;
master_process off;``, config, pid, logs and temp folders in a work folder)
    listens on another loopback port and splits the share by URL:

    * ``GET``/``HEAD /public.php/webdav/<name>.tar.gz`` (the archives: all the
      bytes) are served straight from the sample folder by nginx itself
      (``sendfile``, ranges, ``ETag``);
    * everything else under ``/`` — ``PROPFIND`` of the share root, the
      ``sha1sums*.txt`` files and the ``.tar-tvf.txt`` listings (a few kB) — is
      passed (method, headers, body) to the share server with ``proxy_pass``.

    So bimcv-fetch, aria2c and curl all get the archive bytes from the same
    nginx, which is not the bottleneck, and bimcv-fetch still does its real
    PROPFIND and manifest fetches. nginx does not check the Basic auth of the
    archive GETs (every client sends it; the share server checks it on the
    listing). nginx's dav module cannot answer PROPFIND (that needs the dav-ext
    module), which is why the listing is proxied rather than served by nginx.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from bimcv_fetch.server import ShareServer

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 10000;
    default_type application/octet-stream;
    types {{ application/gzip gz tgz; text/plain txt; }}
    server {{
        listen 127.0.0.1:{port};
        # The archives (all the bytes): straight from disk.
        location ~ "^/public\\.php/webdav/(?<archive>[^/]+\\.(tar\\.gz|tgz))$" {{
            alias {root}/$archive;
        }}
        # The listing (PROPFIND), checksum files and tar listings: the share server.
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class Nginx:
    """nginx serving ``root``'s archives and proxying the rest to ``upstream_port``."""

    def __init__(self, prefix: Path, root: Path, upstream_port: int, binary: str = "nginx"):
        self.prefix = prefix
        self.root = root
        self.upstream_port = upstream_port
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        if self.prefix.exists():
            shutil.rmtree(self.prefix)
        (self.prefix / "tmp").mkdir(parents=True)
        self.port = free_port()
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                prefix=self.prefix,
                port=self.port,
                root=self.root.resolve(),
                upstream=self.upstream_port,
            )
        )
        log = open(self.prefix / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-p",
                str(self.prefix),
                "-c",
                str(conf),
                "-e",
                str(self.prefix / "error.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            _wait_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful shutdown
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None


class Stack:
    """A sample folder served by the share server and, optionally, nginx in front of it."""

    def __init__(
        self,
        root: Path,
        token: str,
        work: Path,
        *,
        nginx: bool = True,
        rate_limit: float | None = None,
    ) -> None:
        self.share = ShareServer(root, token=token, rate_limit=rate_limit, threads=16)
        self.nginx: Nginx | None = None
        self._want_nginx = nginx
        self.work = work
        self.root = root

    @property
    def url(self) -> str:
        """Where clients go: nginx if it runs, else the share server."""
        return self.nginx.url if self.nginx is not None else self.share.url

    def __enter__(self) -> Stack:
        self.share.start()
        if self._want_nginx:
            try:
                self.nginx = Nginx(self.work, self.root, self.share.port).start()
            except BaseException:
                self.share.stop()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.nginx is not None:
            self.nginx.stop()
            self.nginx = None
        self.share.stop()
