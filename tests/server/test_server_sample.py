"""The sample-release builder: layout, determinism, checksums, listings, MIDS quirks."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bimcv_fetch.catalog import load_catalog
from bimcv_fetch.manifest import Kind, parse_listing, parse_sha1sums
from bimcv_fetch.mids import Role, parse_path, subject_iteration
from bimcv_fetch.server import SampleRelease, build_sample
from bimcv_fetch.server.sample import MTIME

needs_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar missing")
needs_sha1sum = pytest.mark.skipif(shutil.which("sha1sum") is None, reason="sha1sum missing")


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _gnu_tar_tvf(archive: Path) -> str:
    env = {**os.environ, "TZ": "UTC", "LC_ALL": "C"}
    out = subprocess.run(
        ["tar", "-tvf", str(archive)], env=env, capture_output=True, check=True, timeout=60
    )
    return out.stdout.decode()


def test_layout(sample_release: SampleRelease) -> None:
    s = sample_release
    rel = load_catalog().get("posi-1-2")
    assert s.release == rel and s.token == rel.token
    on_disk = sorted(p.name for p in s.root.iterdir())
    assert on_disk == list(s.files)
    assert s.metadata_archives == rel.metadata_archives
    assert len(s.subject_archives) == 3
    for name in s.subject_archives:
        assert rel.is_subject_archive(name)
    for name in s.metadata_archives:
        assert not rel.is_subject_archive(name)
    # Gaps in the letter sequence: never a contiguous aa, ab, ac run.
    letters = [n.removeprefix("covid19_posi_subjects_part")[:2] for n in s.subject_archives]
    indices = [(ord(x[0]) - 97) * 26 + ord(x[1]) - 97 for x in letters]
    assert indices[0] == 0 and indices == sorted(indices)
    assert any(b - a > 1 for a, b in itertools.pairwise(indices))
    for archive in s.archives:
        assert s.listings[archive] == archive + ".tar-tvf.txt"
        assert s.listings[archive] in s.files
    assert s.checksum_files == ("sha1sums.txt", "sha1sums-b.txt")
    assert "LICENSE.md" in s.files
    assert "synthetic" in (s.root / "LICENSE.md").read_text().lower()
    total = sum(s.sizes.values())
    assert 50_000 < total < 1_000_000  # a few hundred KB
    for name in s.files:
        assert (s.root / name).stat().st_size == s.sizes[name]
        assert int((s.root / name).stat().st_mtime) == MTIME


def test_recorded_sha1s_are_true(sample_release: SampleRelease) -> None:
    for name in sample_release.files:
        assert _sha1(sample_release.root / name) == sample_release.sha1[name]


def test_same_seed_same_bytes(tmp_path: Path, sample_release: SampleRelease) -> None:
    a = build_sample(tmp_path / "a")
    assert dict(a.sha1) == dict(sample_release.sha1)
    for name in a.files:
        assert _sha1(a.root / name) == sample_release.sha1[name]
    b = build_sample(tmp_path / "b", seed=1)
    assert b.sha1[b.subject_archives[0]] != a.sha1[a.subject_archives[0]]


def test_gzip_and_tar_headers_are_fixed(sample_release: SampleRelease) -> None:
    for archive in sample_release.archives:
        raw = (sample_release.root / archive).read_bytes()
        assert raw[:3] == b"\x1f\x8b\x08"
        assert raw[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0
        with tarfile.open(sample_release.root / archive) as tar:
            for info in tar.getmembers():
                assert info.mtime == MTIME
                owner = (info.uid, info.gid, info.uname, info.gname)
                assert owner == (1000, 1000, "bimcv", "bimcv")


@needs_sha1sum
def test_sha1sum_c_accepts_both_files(sample_release: SampleRelease) -> None:
    text, binary = sample_release.checksum_files
    out = subprocess.run(
        ["sha1sum", "-c", "--strict", text, binary],
        cwd=sample_release.root,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text_lines = (sample_release.root / text).read_text().splitlines()
    binary_lines = (sample_release.root / binary).read_text().splitlines()
    assert all(line[40:42] == "  " for line in text_lines)
    assert all(line[40:42] == " *" for line in binary_lines)
    merged = parse_sha1sums("\n".join(text_lines), text)
    merged.merge(parse_sha1sums("\n".join(binary_lines), binary))
    covered = set(sample_release.files) - set(sample_release.checksum_files)
    assert set(merged.names()) == covered
    for name in covered:
        assert merged.get(name) == sample_release.sha1[name]


@needs_tar
def test_listings_equal_gnu_tar_tvf(sample_release: SampleRelease) -> None:
    for archive in sample_release.archives:
        listing = (sample_release.root / sample_release.listings[archive]).read_text()
        assert _gnu_tar_tvf(sample_release.root / archive) == listing


@needs_tar
def test_listing_column_grows_like_gnu_tar(tmp_path: Path) -> None:
    # Sizes of 8 digits widen the owner/size column mid-listing, as in GNU tar.
    s = build_sample(tmp_path, archives=1, subjects_per_archive=1, size_scale=700)
    archive = s.subject_archives[0]
    listing = (tmp_path / s.listings[archive]).read_text()
    assert max(m.size for m in s.members[archive]) >= 10_000_000
    widths = {line.index(" 2020-") for line in listing.splitlines()}
    assert len(widths) == 2
    assert _gnu_tar_tvf(tmp_path / archive) == listing


def test_listings_parse_and_match_members(sample_release: SampleRelease) -> None:
    for archive in sample_release.archives:
        name = sample_release.listings[archive]
        listing = parse_listing((sample_release.root / name).read_text(), name)
        members = sample_release.members[archive]
        assert [m.name for m in listing.members] == [m.name for m in members]
        assert [m.size for m in listing.members] == [m.size for m in members]
        assert [m.kind is Kind.DIR for m in listing.members] == [m.is_dir for m in members]
        assert listing.unpacked_size == sample_release.unpacked_size(archive)


def test_members_match_archive_contents(sample_release: SampleRelease) -> None:
    for archive in sample_release.archives:
        with tarfile.open(sample_release.root / archive) as tar:
            infos = tar.getmembers()
            expected = sample_release.members[archive]
            assert [i.name + ("/" if i.isdir() else "") for i in infos] == [
                m.name for m in expected
            ]
            for info, member in zip(infos, expected, strict=True):
                assert info.size == member.size
                if info.isfile():
                    f = tar.extractfile(info)
                    assert f is not None
                    assert hashlib.sha1(f.read()).hexdigest() == member.sha1


def test_mids_tree(sample_release: SampleRelease) -> None:
    s = sample_release
    top = s.release.top_folder
    seen_subjects: dict[str, str] = {}
    for archive in s.subject_archives:
        files = s.member_paths(archive)
        assert files
        for path in files:
            assert path.startswith(f"{top}/sub-S")
            assert not path.endswith("_sessions.tsv")
            f = parse_path(path)
            assert f.subject in s.subjects[archive]
            assert seen_subjects.setdefault(f.subject, archive) == archive
            if f.role is Role.IMAGE:
                assert "/mod-rx/" in path
        modalities = {parse_path(p).modality for p in files if parse_path(p).role is Role.IMAGE}
        if archive == s.no_ct_archive:
            assert "CT" not in modalities
        else:
            assert "CT" in modalities
        assert modalities & {"CR", "DX"}
        scans = [p for p in files if p.endswith("_scans.tsv")]
        assert scans and all(p.count("/") == 3 for p in scans)
    assert s.no_ct_archive in s.subject_archives
    all_subjects = set(s.iter1_subjects) | set(s.later_subjects)
    assert set(seen_subjects) == all_subjects
    sessions = s.metadata_archives[2]
    sessions_files = s.member_paths(sessions)
    assert sorted(sessions_files) == sorted(
        f"{top}/sub-{sub}/sub-{sub}_sessions.tsv" for sub in all_subjects
    )
    assert set(s.member_paths(s.metadata_archives[0])) >= {f"{top}/participants.tsv"}
    assert set(s.member_paths(s.metadata_archives[1])) == {
        f"{top}/derivatives/labels/labels_covid_posi.tsv",
        f"{top}/derivatives/EHR/sil_reg_covid_posi.tsv",
    }


def test_iterations(sample_release: SampleRelease) -> None:
    rel = sample_release.release
    assert sample_release.iter1_subjects and sample_release.later_subjects
    assert sample_release.iter1_subjects[0] == "S03044"
    assert all(subject_iteration(s, rel) == 1 for s in sample_release.iter1_subjects)
    assert all(subject_iteration(s, rel) == 2 for s in sample_release.later_subjects)
    kinds = set()
    for archive in sample_release.subject_archives:
        its = {subject_iteration(s, rel) for s in sample_release.subjects[archive]}
        kinds.add(frozenset(its))
    assert frozenset({1}) in kinds and frozenset({2}) in kinds  # whole-iteration shards


def test_quirks(sample_release: SampleRelease) -> None:
    s = sample_release
    q = s.quirks
    first = s.subject_archives[0]
    by_path = {m.path: m for m in s.members[first]}
    paths = set(by_path)
    assert by_path[q["zero_byte_png"]].size == 0
    assert q["zero_byte_png"].endswith(".png")
    assert q["no_sidecar"].endswith(".png")
    assert q["no_sidecar"].removesuffix(".png") + ".json" not in paths
    lateral = q["lateral_without_vp"]
    assert "vp-" not in lateral
    with tarfile.open(s.root / first) as tar:
        f = tar.extractfile(lateral.removesuffix(".png") + ".json")
        assert f is not None
        assert json.load(f)["00185101"]["Value"] == ["LL"]
        png = tar.extractfile(by_path[q["no_sidecar"]].name)
        assert png is not None and png.read(8) == b"\x89PNG\r\n\x1a\n"
        ct = tar.extractfile(by_path[q["ct_localizer"]].name)
        assert ct is not None and ct.read(2) == b"\x1f\x8b"
    assert 0 < by_path[q["ct_localizer"]].size < 2000
    assert parse_path(q["ct_localizer"]).modality == "CT"
    with tarfile.open(s.root / s.metadata_archives[0]) as tar:
        f = tar.extractfile(q["bogus_participants_row"])
        assert f is not None
        rows = f.read().decode().splitlines()
    assert any(r.startswith("derivatives\t") for r in rows)
    sidecar = q["zero_byte_png"].removesuffix(".png") + ".json"
    assert sidecar in paths


def test_names_have_real_shapes(sample_release: SampleRelease) -> None:
    names = [
        p.rsplit("/", 1)[-1]
        for a in sample_release.subject_archives
        for p in sample_release.member_paths(a)
    ]
    assert any(
        n.endswith("_run-1_bp-chest_vp-pa_dx.png") or n.endswith("_run-1_bp-chest_cr.png")
        for n in names
    )
    assert any(n.endswith("_acq-29_run-5_bp-chest_ct.nii.gz") for n in names)
    assert any(n.endswith("_acq-29_run-5_bp-chest_ct.json") for n in names)


def test_payloads_are_incompressible(sample_release: SampleRelease) -> None:
    archive = sample_release.subject_archives[0]
    raw = (sample_release.root / archive).stat().st_size
    assert raw > 0.8 * sample_release.unpacked_size(archive)


def test_ct_share_of_image_bytes(sample_release: SampleRelease) -> None:
    ct = other = 0
    for archive in sample_release.subject_archives:
        for m in sample_release.members[archive]:
            f = parse_path(m.path)
            if f.role is Role.IMAGE:
                if f.modality == "CT":
                    ct += m.size
                else:
                    other += m.size
    assert 0.45 < ct / (ct + other) < 0.6


@pytest.mark.parametrize(
    ("release", "checksums"),
    [
        ("posi-1-2-3", ("sha1sum.txt", "sha1sum-b.txt")),
        ("neg-1-2", ("sha1sums.txt", "sha1sums-b.txt")),
        ("posi-1", ("sha1sums.txt", "sha1sums-b.txt")),
    ],
)
def test_other_releases(tmp_path: Path, release: str, checksums: tuple[str, str]) -> None:
    s = build_sample(tmp_path, release=release, archives=2, subjects_per_archive=1, seed=3)
    rel = s.release
    assert s.checksum_files == checksums
    assert all(rel.is_subject_archive(n) for n in s.subject_archives)
    assert s.metadata_archives
    assert not any(rel.is_subject_archive(n) for n in s.metadata_archives)
    if rel.metadata_archives:
        assert set(s.metadata_archives) <= set(rel.metadata_archives)
    for archive in s.archives:
        for m in s.members[archive]:
            assert m.name.startswith(rel.top_folder + "/")
    for archive in s.archives:
        stem = archive.removesuffix(".tgz").removesuffix(".tar.gz")
        suffix = ".tgz" if release == "posi-1" else ".tar.gz"
        assert archive.endswith(suffix)
        expected = stem if release == "posi-1" else archive
        assert s.listings[archive] == expected + ".tar-tvf.txt"
    participants = [
        a for a in s.archives if f"{rel.top_folder}/participants.tsv" in s.member_paths(a)
    ]
    assert len(participants) == 1
    if rel.iter1_subjects is None:
        assert not s.iter1_subjects
    for name in s.files:
        assert (tmp_path / name).is_file()


def test_gzip_roundtrip_of_sample(sample_release: SampleRelease) -> None:
    for archive in sample_release.archives:
        with gzip.open(sample_release.root / archive) as f:
            data = f.read()
        assert len(data) % 10240 == 0  # tar records


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_sample(tmp_path, archives=0)
    with pytest.raises(ValueError):
        build_sample(tmp_path, size_scale=0)
