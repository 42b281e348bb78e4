"""`bimcv-fetch list` against the local share server over real sockets."""

from __future__ import annotations

import shutil
from pathlib import Path

from bimcv_fetch.manifest import parse_listing
from bimcv_fetch.mids import Role, parse_path
from bimcv_fetch.server import SampleRelease, ShareServer, TlsFiles

from .clirun import bimcv


def _opts(server: ShareServer, dest: Path, *extra: str) -> list[str]:
    return ["--server", server.url, "--dest", str(dest), *extra]


def test_list_json_counts_match_listings(
    share_server: ShareServer, sample_release: SampleRelease, tmp_path: Path
) -> None:
    r = bimcv("list", *_opts(share_server, tmp_path / "d"), "--json")
    assert r.code == 0, r.err
    rows = {o["archive"]: o for o in r.json_lines() if o["event"] == "archive"}
    expected = set(sample_release.subject_archives) | set(sample_release.metadata_archives)
    assert set(rows) == expected
    for name in sample_release.subject_archives:
        text = (sample_release.root / sample_release.listings[name]).read_text()
        lst = parse_listing(text)
        ct = sum(
            1
            for m in lst.files
            if parse_path(m.path).role is Role.IMAGE and parse_path(m.path).modality == "CT"
        )
        assert rows[name]["ct"] == ct
        assert rows[name]["members"] == len(lst.files)
        assert rows[name]["unpacked"] == lst.unpacked_size
        assert rows[name]["packed"] == sample_release.sizes[name]
        assert rows[name]["state"] == "missing"
    assert r.summary()["archives"] == len(expected)
    # Manifests are cached, listings among them.
    cached = {p.name for p in (tmp_path / "d" / "manifests").iterdir()}
    assert set(sample_release.listings.values()) <= cached
    assert set(sample_release.checksum_files) <= cached


def test_list_subset_ct_skips_the_archive_without_ct(
    share_server: ShareServer, sample_release: SampleRelease, tmp_path: Path
) -> None:
    r = bimcv("list", *_opts(share_server, tmp_path / "d"), "--subset", "CT", "--json")
    assert r.code == 0, r.err
    shown = {o["archive"] for o in r.json_lines() if o["event"] == "archive"}
    assert sample_release.no_ct_archive is not None
    assert sample_release.no_ct_archive not in shown
    assert set(sample_release.metadata_archives) <= shown
    s = r.summary()
    assert s["saved"] == sample_release.sizes[sample_release.no_ct_archive]
    assert s["subset"] == "CT"


def test_list_table_offline_and_iter2_note(
    share_server: ShareServer, sample_release: SampleRelease, tmp_path: Path
) -> None:
    dest = tmp_path / "d"
    assert bimcv("list", *_opts(share_server, dest)).code == 0
    share_server.stop()
    r = bimcv("list", "--dest", dest, "--offline", "--iter", "2")
    assert r.code == 0, r.err
    # The first shard holds iteration-1 subjects only; the last, iteration-2 only.
    assert sample_release.subject_archives[0] not in r.out
    assert sample_release.subject_archives[-1] in r.out
    assert "iteration-2" in r.err
    assert "iterations 2) skips" in r.out


def test_list_over_https_needs_the_ca(
    https_share_server: ShareServer, tls_files: TlsFiles, tmp_path: Path
) -> None:
    bad = bimcv("list", *_opts(https_share_server, tmp_path / "a"))
    assert bad.code == 4
    assert "TLS" in bad.err and "Traceback" not in bad.err
    good = bimcv(
        "list", *_opts(https_share_server, tmp_path / "b", "--ca-bundle", str(tls_files.ca))
    )
    assert good.code == 0, good.err


def test_wrong_token_is_one_line_exit_3_asked_once(
    share_server: ShareServer, tmp_path: Path
) -> None:
    r = bimcv("list", *_opts(share_server, tmp_path / "d", "--token", "not-the-token-xyz"))
    assert r.code == 3
    assert "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) <= 2  # the release note, then the error
    assert "not-the-token-xyz" not in r.err
    assert len(share_server.requests) == 1


def test_wrong_server_path_404(share_server: ShareServer, tmp_path: Path) -> None:
    r = bimcv("list", "--server", share_server.url + "/nothing-here", "--dest", tmp_path / "d")
    assert r.code == 3
    assert "404" in r.err


def test_listing_with_wrong_sha1_is_refused(sample_release: SampleRelease, tmp_path: Path) -> None:
    root = tmp_path / "share"
    shutil.copytree(sample_release.root, root)
    name = sample_release.listings[sample_release.subject_archives[0]]
    with open(root / name, "a") as fh:
        fh.write("-rw-r--r-- x/y 1 2020-01-01 00:00 covid19_posi/extra.png\n")
    with ShareServer(root, token=sample_release.token) as server:
        r = bimcv("list", *_opts(server, tmp_path / "d"))
    assert r.code == 5
    assert name in r.err and "expected" in r.err
    assert not (tmp_path / "d" / "manifests" / name).exists()


def test_unreachable_server_exit_4(tmp_path: Path) -> None:
    r = bimcv("list", "--server", "http://127.0.0.1:9", "--dest", tmp_path / "d", timeout=60)
    assert r.code == 4
    assert "cannot reach" in r.err


def test_token_never_in_errors(tmp_path: Path) -> None:
    secret = "Very-Secret-Token-123"
    for proto in ("webdav", "dav", "https"):
        r = bimcv(
            "list",
            "--server",
            "http://127.0.0.1:9",
            "--dest",
            tmp_path / proto,
            "--token",
            secret,
            "--protocol",
            proto,
            "-v",
            timeout=60,
        )
        assert r.code == 4
        assert secret not in r.err and secret not in r.out
