"""A throw-away CA and server certificate for the local share server (trustme)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from bimcv_fetch.errors import ConfigError

__all__ = ["TlsFiles", "make_tls_files"]


class TlsFiles(NamedTuple):
    ca: Path  # the CA certificate clients trust (requests: verify=str(ca))
    cert: Path  # the server certificate chain
    key: Path  # the server private key

    @property
    def server_pair(self) -> tuple[Path, Path]:
        """``(cert, key)``, what :class:`~bimcv_fetch.server.ShareServer` takes as ``tls``."""
        return (self.cert, self.key)


def make_tls_files(
    folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
) -> TlsFiles:
    """Write ``ca.pem``, ``cert.pem`` and ``key.pem`` into ``folder`` (created if needed)."""
    try:
        import trustme
    except ImportError as exc:  # pragma: no cover - trustme is in the serve extra
        raise ConfigError(
            "HTTPS needs the 'trustme' package", hint="pip install 'bimcv-fetch[serve]'"
        ) from exc
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server_cert = ca.issue_cert(*hosts)
    files = TlsFiles(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    server_cert.private_key_pem.write_to_path(str(files.key))
    with open(files.cert, "wb") as out:
        for pem in server_cert.cert_chain_pems:
            out.write(pem.bytes())
    files.key.chmod(0o600)
    return files
