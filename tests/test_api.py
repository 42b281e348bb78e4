"""The Python API, ``bimcv_fetch.download(...)``, against the local HTTPS share server.

The package-level ``bimcv_fetch.download`` is a lazy wrapper around
``bimcv_fetch.api.download``; ``test_package_level_download_stays_callable``
checks that no submodule import ever hides it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from bimcv_fetch.api import download as api_download
from bimcv_fetch.server import SampleRelease, ShareServer, TlsFiles

from .helpers import expected_files, tree_files


@pytest.fixture(autouse=True)
def _no_ca_bundle_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Would break any request that used it: the API must pass verify= itself.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca-bundle.pem")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    for var in ("BIMCV_FETCH_DEST", "BIMCV_FETCH_SERVER", "BIMCV_FETCH_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def test_download_subset_ct_with_extract(
    https_share_server: ShareServer,
    tls_files: TlsFiles,
    sample_release: SampleRelease,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    dest = tmp_path / "d"
    results = api_download(
        dest,
        server=https_share_server.url,
        ca_bundle=str(tls_files.ca),
        subset="CT",
        extract=True,
        progress=False,
    )
    wanted = [n for n in sample_release.archives if n != sample_release.no_ct_archive]
    assert sorted(r.name for r in results) == sorted(wanted)
    assert all(r.status == "ok" and r.exit_code == 0 and r.error is None for r in results), results
    assert sum(r.extracted for r in results) == len(
        expected_files(sample_release, "CT", fetched_only=True)
    )
    assert tree_files(dest) == expected_files(sample_release, "CT", fetched_only=True)
    for name in wanted:
        data = (dest / "archives" / name).read_bytes()
        assert hashlib.sha1(data).hexdigest() == sample_release.sha1[name]
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # progress=False: silent
    # Again: everything is there already; no archive byte moves.
    https_share_server.requests.clear()
    again = api_download(
        dest,
        server=https_share_server.url,
        ca_bundle=str(tls_files.ca),
        subset="CT",
        extract=True,
        progress=False,
    )
    assert {r.status for r in again} == {"have"}
    gets = [
        g
        for g in https_share_server.requests.snapshot()
        if g.method == "GET" and g.path.endswith(".tar.gz")
    ]
    assert gets == []


def test_download_with_default_progress(
    https_share_server: ShareServer,
    tls_files: TlsFiles,
    sample_release: SampleRelease,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    dest = tmp_path / "d"
    results = api_download(
        dest, server=https_share_server.url, ca_bundle=str(tls_files.ca), extract=True
    )
    assert len(results) == len(sample_release.archives)
    assert all(r.status == "ok" for r in results), results
    assert tree_files(dest) == expected_files(sample_release, None)
    out, err = capfd.readouterr()
    assert out == ""  # tqdm writes to stderr only
    assert sample_release.subject_archives[0] in err


def test_errors_are_raised_with_an_exit_code(
    https_share_server: ShareServer, tmp_path: Path
) -> None:
    from bimcv_fetch.errors import BimcvError

    with pytest.raises(BimcvError) as info:
        # No ca_bundle: the test CA is not trusted (and REQUESTS_CA_BUNDLE is ignored).
        api_download(tmp_path / "d", server=https_share_server.url, progress=False)
    assert int(info.value.exit_code) == 4
    assert "certificate" in str(info.value).lower()  # the system CAs were used, not the env


_TWICE = """
import sys

import bimcv_fetch

url, ca, dest = sys.argv[1:]
for run in (1, 2):
    results = bimcv_fetch.download(dest, server=url, ca_bundle=ca, subset="CT", progress=False)
    assert results and all(r.status in ("ok", "have") for r in results), (run, results)
print("both calls worked")
"""


def test_package_level_download_stays_callable(
    https_share_server: ShareServer, tls_files: TlsFiles, tmp_path: Path
) -> None:
    from .clirun import env

    r = subprocess.run(
        [sys.executable, "-c", _TWICE, https_share_server.url, str(tls_files.ca), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert r.returncode == 0, r.stderr
    assert "both calls worked" in r.stdout
    # The same in this process: importing the modules behind it must not hide the function.
    import bimcv_fetch.api
    import bimcv_fetch.scheduler

    assert callable(bimcv_fetch.download)
