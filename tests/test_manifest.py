"""Parsers of tar -tvf listings and sha1sums files: every format and every bad input."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bimcv_fetch.errors import ExitCode, ManifestError
from bimcv_fetch.manifest import (
    Kind,
    listing_names,
    merge_checksums,
    parse_listing,
    parse_sha1sums,
)

HASH_A = "a" * 40
HASH_B = "0123456789abcdef0123456789abcdef01234567"

LISTING = (
    "drwxr-xr-x user/group         0 2020-09-21 12:34 covid19_posi/sub-S03044/ses-E06138/\n"
    "-rw-r--r-- user/group   1234567 2020-09-21 12:34 covid19_posi/sub-S03044/ses-E06138/"
    "mod-rx/sub-S03044_ses-E06138_run-1_bp-chest_vp-pa_dx.png\n"
    "-rw-r--r-- 1000/1000        0 2020-09-21 12:34:56 covid19_posi/sub-S04428/ses-E08792/"
    "mod-rx/sub-S04428_ses-E08792_run-1_bp-chest_cr.png\r\n"
    "\n"
    "lrwxrwxrwx root/root          0 2021-01-02 03:04 covid19_posi/link -> ../etc/passwd\n"
    "hrw-r--r-- root/root          0 2021-01-02 03:04 covid19_posi/hard link to covid19_posi/x\n"
    "-rw-r--r-- root/root          0 2021-01-02 03:04 covid19_posi/hard2 link to covid19_posi/y\n"
    "crw-r--r-- root/root       1,3 2021-01-02 03:04 covid19_posi/null\n"
    "prw-r--r-- root/root          0 2021-01-02 03:04 covid19_posi/fifo\n"
    "-rw-r--r-- a name/grp 5 2021-01-02 03:04 covid19_posi/with space in name.tsv\n"
)


def test_listing_formats() -> None:
    lst = parse_listing(LISTING.replace("a name/grp", "aname/grp"), "x.tar-tvf.txt")
    by = lst.by_path()
    d = by["covid19_posi/sub-S03044/ses-E06138"]
    assert d.kind is Kind.DIR and d.name.endswith("/")
    png = by[
        "covid19_posi/sub-S03044/ses-E06138/mod-rx/sub-S03044_ses-E06138_run-1_bp-chest_vp-pa_dx.png"
    ]
    assert png.kind is Kind.FILE and png.size == 1234567
    cr = by["covid19_posi/sub-S04428/ses-E08792/mod-rx/sub-S04428_ses-E08792_run-1_bp-chest_cr.png"]
    assert cr.size == 0  # zero-byte PNG, numeric owner, HH:MM:SS, CRLF
    assert by["covid19_posi/link"].kind is Kind.SYMLINK
    assert by["covid19_posi/link"].link == "../etc/passwd"
    assert by["covid19_posi/hard"].kind is Kind.HARDLINK
    assert by["covid19_posi/hard2"].kind is Kind.HARDLINK
    assert by["covid19_posi/hard2"].link == "covid19_posi/y"
    assert by["covid19_posi/null"].kind is Kind.CHAR
    assert by["covid19_posi/fifo"].kind is Kind.FIFO
    assert by["covid19_posi/with space in name.tsv"].size == 5
    assert lst.unpacked_size == 1234567 + 5
    assert len(lst.files) == 3


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("garbage line here\n", 1, "not a tar -tvf line"),
        ("-rw-r--r-- u/g 12x 2020-09-21 12:34 a/b\n", 1, "not a number"),
        ("\n\n", None, "empty listing"),
        ("", None, "empty listing"),
        ("-rw-r--r-- u/g 1 2020-09-21 12:34 a\nbad\n", 2, "not a tar -tvf line"),
    ],
)
def test_listing_errors(text: str, line: int | None, words: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_listing(text, "foo.tar-tvf.txt")
    assert err.value.line == line
    assert words in str(err.value)
    assert str(err.value).startswith("foo.tar-tvf.txt")
    assert err.value.exit_code == ExitCode.CONFIG == 3


def test_listing_speed() -> None:
    line = (
        "-rw-r--r-- user/group   1234567 2020-09-21 12:34 covid19_posi/sub-S03044/ses-E06138/"
        "mod-rx/sub-S03044_ses-E06138_run-{}_bp-chest_vp-pa_dx.png\n"
    )
    text = "".join(line.format(i) for i in range(100_000))
    # Not a timing assertion on this noisy machine: a loose bound that only a
    # pathological parser (quadratic, per-line subprocess …) would break.
    t0 = time.process_time()
    lst = parse_listing(text, "big")
    assert len(lst.members) == 100_000
    assert time.process_time() - t0 < 5


def test_sha1sums_three_formats_and_merge() -> None:
    text = (
        f"{HASH_A}  covid19_posi_subjects_partaa.tar.gz\n"
        f"{HASH_B.upper()} *./covid19_posi_head.tar.gz\r\n"
        f"SHA1 (LICENSE.md) = {HASH_B}\n"
        "\n"
    )
    c = parse_sha1sums(text, "sha1sums.txt")
    assert c.get("covid19_posi_subjects_partaa.tar.gz") == HASH_A
    assert c.get("covid19_posi_head.tar.gz") == HASH_B  # lower-cased, ./ dropped
    assert c.get("LICENSE.md") == HASH_B
    b = parse_sha1sums(f"{HASH_A} *covid19_posi_subjects_partaa.tar.gz\n", "sha1sums-b.txt")
    merged = merge_checksums([c, b])
    assert len(merged) == 3


def test_sha1sums_conflict_between_files() -> None:
    a = parse_sha1sums(f"{HASH_A}  x.tar.gz\n", "sha1sums.txt")
    b = parse_sha1sums(f"{HASH_B} *x.tar.gz\n", "sha1sums-b.txt")
    with pytest.raises(ManifestError) as err:
        merge_checksums([a, b])
    assert "two different SHA1s" in str(err.value)
    assert "sha1sums-b.txt:1" in str(err.value)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("nonsense\n", 1, "not a checksum line"),
        (f"{HASH_A[:39]}  x.tar.gz\n", 1, "not a 40-digit SHA1"),
        (f"{'g' * 40}  x.tar.gz\n", 1, "not a 40-digit SHA1"),
        ("", None, "no checksums"),
        (f"{HASH_A}  x\n{HASH_B}  x\n", 2, "two different SHA1s"),
    ],
)
def test_sha1sums_errors(text: str, line: int | None, words: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_sha1sums(text, "sha1sums.txt")
    assert err.value.line == line
    assert words in str(err.value)


def test_listing_names() -> None:
    assert listing_names("covid19_posi_head.tar.gz") == [
        "covid19_posi_head.tar.gz.tar-tvf.txt",
        "covid19_posi_head.tar-tvf.txt",
    ]
    assert listing_names("bimcv_covid19_posi_subjects_7.tgz")[1] == (
        "bimcv_covid19_posi_subjects_7.tar-tvf.txt"
    )


def test_cli_bad_listing_is_one_line_exit_3(tmp_path: object) -> None:
    """A garbage manifest in the cache ends in one line and exit 3, no traceback."""
    from pathlib import Path

    dest = Path(str(tmp_path)) / "d"
    (dest / "manifests").mkdir(parents=True)
    (dest / "manifests" / "share.json").write_text(
        '{"files": [{"name": "sha1sums.txt", "size": 1, "etag": "x", "last_modified": null}]}'
    )
    (dest / "manifests" / "sha1sums.txt").write_text("this is not a checksum\n")
    r = subprocess.run(
        [sys.executable, "-m", "bimcv_fetch", "list", "--offline", "--dest", str(dest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bimcv-fetch: error: sha1sums.txt:1")
