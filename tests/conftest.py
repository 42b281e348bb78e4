"""Fixtures shared by every test: a sample release and local share servers.

``sample_release`` is built once per session and shared: treat its folder as
read-only (copy it with ``shutil.copytree`` before changing a file).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bimcv_fetch.server import (
    FaultPlan,
    SampleRelease,
    ShareServer,
    TlsFiles,
    build_sample,
    make_tls_files,
)


@pytest.fixture(scope="session")
def sample_release(tmp_path_factory: pytest.TempPathFactory) -> SampleRelease:
    """The default miniature posi-1-2 release (3 shards, 2 subjects each, seed 0)."""
    return build_sample(tmp_path_factory.mktemp("sample") / "share")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A trustme CA (``.ca``) and a server certificate for 127.0.0.1 / localhost."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _serve(root: Path, token: str, tls: tuple[Path, Path] | None) -> Iterator[ShareServer]:
    with ShareServer(root, token=token, tls=tls, faults=FaultPlan(), threads=8) as server:
        yield server


@pytest.fixture
def share_server(sample_release: SampleRelease) -> Iterator[ShareServer]:
    """A plain-HTTP share server over ``sample_release`` with a fresh FaultPlan."""
    yield from _serve(sample_release.root, sample_release.token, None)


@pytest.fixture
def https_share_server(sample_release: SampleRelease, tls_files: TlsFiles) -> Iterator[ShareServer]:
    """The same over HTTPS; clients pass ``verify=str(tls_files.ca)``."""
    yield from _serve(sample_release.root, sample_release.token, tls_files.server_pair)
