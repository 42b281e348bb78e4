"""`verify`, `extract`, `status`, `download --extract` and `demo` end to end.

Every test runs the real command line in a subprocess against the real local
share server over loopback sockets; nothing is mocked. Damaged and hostile
releases are built in tmp_path from a copy of the session's sample release
(which stays read-only).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bimcv_fetch.extract import RECEIPT_INTERVAL
from bimcv_fetch.server import SampleRelease, ShareServer, build_sample
from bimcv_fetch.server.sample import MTIME

from .archives import listing_line
from .clirun import Run, bimcv, spawn
from .helpers import expected_files, tree_files, wait_for_part

TOP = "covid19_posi"
TMP_SUFFIX = ".bimcv-tmp"
Items = list[tuple[tarfile.TarInfo, bytes | None]]


# ------------------------------------------------------------------ helpers


def _opts(server: ShareServer, dest: Path, *extra: str) -> list[str]:
    return ["--server", server.url, "--dest", str(dest), *extra]


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _subset_args(subset: str | None) -> list[str]:
    return ["--subset", subset] if subset else []


def tree_bytes(root: Path) -> dict[str, bytes]:
    base = root / TOP
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def temp_files(root: Path) -> list[Path]:
    return list(root.rglob(f"*{TMP_SUFFIX}"))


def snapshot_outside(root: Path, inside: Path) -> set[str]:
    """Every path under ``root`` except those inside ``inside``."""
    out: set[str] = set()
    for p in root.rglob("*"):
        if p == inside or inside in p.parents:
            continue
        out.add(p.relative_to(root).as_posix())
    return out


def json_archives(run: Run) -> dict[str, dict[str, object]]:
    return {o["archive"]: o for o in run.json_lines() if o.get("event") == "archive"}


def _receipt_complete(dest: Path, name: str) -> bool | None:
    """The receipt's ``complete`` flag; None when there is no receipt."""
    path = dest / ".bimcv-fetch" / "receipts" / f"{name}.json"
    if not path.exists():
        return None
    return bool(json.loads(path.read_text())["complete"])


def _flip_byte(path: Path, offset: int, *, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # a visible change even on filesystems with coarse timestamps
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == st.st_size


# ------------------------------------------------------------------ custom releases


def copy_release(sample: SampleRelease, dst: Path) -> Path:
    shutil.copytree(sample.root, dst)
    return dst


def republish(root: Path, name: str) -> None:
    """Rewrite the SHA1 of ``root/name`` in whichever sha1sums file lists it."""
    digest = _sha1((root / name).read_bytes())
    found = False
    for sums in sorted(root.glob("sha1sums*.txt")):
        lines = sums.read_text().splitlines()
        for i, line in enumerate(lines):
            _old, sep, rest = line.partition(" ")
            if rest.lstrip(" *") == name:
                lines[i] = f"{digest}{sep}{rest}"
                found = True
        sums.write_text("".join(line + "\n" for line in lines))
    assert found, name


def read_items(path: Path) -> Items:
    items: Items = []
    with tarfile.open(path, "r:gz") as tar:
        for ti in tar:
            data = None
            if ti.isreg():
                fh = tar.extractfile(ti)
                assert fh is not None
                data = fh.read()
            items.append((ti, data))
    return items


def write_items(path: Path, items: Items) -> None:
    """A gzip'd GNU tar of ``items`` (each file's header size set from its data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for ti, data in items:
            if data is not None:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    path.write_bytes(gzip.compress(buf.getvalue(), compresslevel=1, mtime=0))


def rewrite_archive(root: Path, name: str, edit: Callable[[Items], Items]) -> None:
    """Rewrite archive ``name`` through ``edit`` and republish its SHA1 (listing untouched)."""
    path = root / name
    write_items(path, edit(read_items(path)))
    republish(root, name)


def _file_info(name: str, data: bytes) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = MTIME
    ti.mode = 0o644
    ti.uname = ti.gname = "bimcv"
    ti.uid = ti.gid = 1000
    return ti


def _symlink_info(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    ti.mtime = MTIME
    ti.mode = 0o777
    ti.uname = ti.gname = "bimcv"
    ti.uid = ti.gid = 1000
    return ti


def _biggest_file(items: Items, suffix: str = "") -> int:
    sizes = [
        (len(d), i) for i, (ti, d) in enumerate(items) if d is not None and ti.name.endswith(suffix)
    ]
    return max(sizes)[1]


@contextlib.contextmanager
def serving(root: Path, token: str, **kw: Any) -> Iterator[ShareServer]:
    with ShareServer(root, token=token, threads=8, **kw) as server:
        yield server


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def module_server(sample_release: SampleRelease) -> Iterator[ShareServer]:
    """One server for the tests that only need the pristine sample downloaded once."""
    with serving(sample_release.root, sample_release.token) as server:
        yield server


@pytest.fixture(scope="module")
def downloaded(module_server: ShareServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dest folder holding every archive, downloaded and verified (not extracted)."""
    dest = tmp_path_factory.mktemp("downloaded") / "d"
    r = bimcv("download", *_opts(module_server, dest), "-q", timeout=60)
    assert r.code == 0, r.err
    return dest


@pytest.fixture
def dest(downloaded: Path, tmp_path: Path) -> Path:
    """A private copy of ``downloaded`` (mtimes kept, so the verified stamps still hold)."""
    d = tmp_path / "d"
    shutil.copytree(downloaded, d, symlinks=True)
    return d


# ------------------------------------------------------------------ verify: archives


def test_verify_passes_on_good_data(dest: Path, sample_release: SampleRelease) -> None:
    r = bimcv("verify", "--dest", dest, "--force", "--json")
    assert r.code == 0, r.err
    checks = json_archives(r)
    assert set(checks) == set(sample_release.archives)
    for name, c in checks.items():
        assert c["status"] == "ok" and c["actual"] == sample_release.sha1[name], c
        assert c["cached"] is False
    assert r.summary()["archives"] == {"ok": len(sample_release.archives)}
    plain = bimcv("verify", "--dest", dest)
    assert plain.code == 0, plain.err
    assert f"{len(sample_release.archives)} archives checked by SHA1" in plain.err
    assert "MISMATCH" not in plain.err


def test_flipped_byte_keeping_size_and_mtime_needs_force(
    dest: Path, sample_release: SampleRelease
) -> None:
    name = sample_release.subject_archives[0]
    path = dest / "archives" / name
    _flip_byte(path, 1000, keep_mtime=True)
    actual = _sha1(path.read_bytes())
    # The verified stamp records size and mtime only: this tamper fools it (by design) ...
    cached = bimcv("verify", "--dest", dest, "--json")
    assert cached.code == 0, cached.err
    assert json_archives(cached)[name]["cached"] is True
    # ... and --force rehashes and catches it.
    forced = bimcv("verify", "--dest", dest, "--force", "--json")
    assert forced.code == 5, forced.err
    c = json_archives(forced)[name]
    assert c["status"] == "mismatch"
    assert c["expected"] == sample_release.sha1[name] and c["actual"] == actual
    assert forced.summary()["archives"] == {"mismatch": 1, "ok": len(sample_release.archives) - 1}
    # The mismatch removed the stamp: now a plain verify rehashes and prints both SHA1s.
    again = bimcv("verify", "--dest", dest)
    assert again.code == 5
    assert f"MISMATCH {name}" in again.err
    assert sample_release.sha1[name] in again.err and actual in again.err


def test_flipped_byte_changing_mtime_is_caught_without_force(
    dest: Path, sample_release: SampleRelease
) -> None:
    name = sample_release.subject_archives[-1]
    path = dest / "archives" / name
    _flip_byte(path, path.stat().st_size // 2, keep_mtime=False)
    r = bimcv("verify", "--dest", dest)
    assert r.code == 5, r.err
    assert sample_release.sha1[name] in r.err
    assert _sha1(path.read_bytes()) in r.err
    assert "1 MISMATCH" in r.err


def test_truncated_archive_exit_5(dest: Path, sample_release: SampleRelease) -> None:
    name = sample_release.subject_archives[1]
    path = dest / "archives" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    r = bimcv("verify", "--dest", dest, "--json")
    assert r.code == 5, r.err
    c = json_archives(r)[name]
    assert c["status"] == "mismatch" and c["actual"] == _sha1(data[: len(data) // 2])
    assert r.summary()["exit_code"] == 5


def test_missing_and_part_are_reported_not_checked(
    dest: Path, sample_release: SampleRelease
) -> None:
    gone, partial = sample_release.subject_archives[0], sample_release.subject_archives[2]
    (dest / "archives" / gone).unlink()
    p = dest / "archives" / partial
    data = p.read_bytes()
    p.unlink()
    (dest / "archives" / (partial + ".part")).write_bytes(data[:1000])
    r = bimcv("verify", "--dest", dest, "--force", "--json")
    assert r.code == 0, r.err
    checks = json_archives(r)
    assert checks[gone]["status"] == "missing" and checks[gone]["actual"] is None
    assert checks[partial]["status"] == "partial" and checks[partial]["actual"] is None
    hashed = {o["name"] for o in r.json_lines() if o.get("event") == "start"}
    assert gone not in hashed and partial not in hashed
    assert hashed == set(sample_release.archives) - {gone, partial}
    assert r.summary()["archives"] == {
        "missing": 1,
        "partial": 1,
        "ok": len(sample_release.archives) - 2,
    }
    plain = bimcv("verify", "--dest", dest)
    assert plain.code == 0, plain.err
    n = len(sample_release.archives) - 2
    assert f"{n} archives checked by SHA1: {n} ok" in plain.err
    assert "not checked: 1 missing, 1 partial" in plain.err


# ------------------------------------------------------------------ verify --deep


def _drop_member(items: Items) -> Items:
    i = _biggest_file(items, ".png")
    return items[:i] + items[i + 1 :]


def _add_member(items: Items) -> Items:
    data = b"not in the listing\n"
    # In the middle: extraction stops reading after the last wanted member.
    return [*items[:5], (_file_info(f"{TOP}/unlisted.txt", data), data), *items[5:]]


def _resize_member(items: Items) -> Items:
    i = _biggest_file(items, ".png")
    ti, data = items[i]
    assert data is not None
    items[i] = (ti, data + b"more bytes than listed")
    return items


DEEP_CASES = {
    "missing": (_drop_member, "MISSING"),
    "extra": (_add_member, "EXTRA"),
    "size": (_resize_member, "SIZE"),
}


@pytest.mark.parametrize("case", sorted(DEEP_CASES))
def test_deep_catches_members_that_differ_from_the_listing(
    sample_release: SampleRelease, tmp_path: Path, case: str
) -> None:
    edit, word = DEEP_CASES[case]
    root = copy_release(sample_release, tmp_path / "share")
    name = sample_release.subject_archives[0]
    before = {ti.name: ti.size for ti, _ in read_items(root / name)}
    rewrite_archive(root, name, edit)
    after = {ti.name: ti.size for ti, _ in read_items(root / name)}
    changed = sorted(set(before.items()) ^ set(after.items()))
    member = changed[0][0]
    dest = tmp_path / "d"
    with serving(root, sample_release.token) as server:
        got = bimcv("download", *_opts(server, dest), "-q")
    assert got.code == 0, got.err  # its SHA1 matches what the share publishes
    assert bimcv("verify", "--dest", dest).code == 0  # SHA1 alone cannot tell
    deep = bimcv("verify", "--dest", dest, "--deep")
    assert deep.code == 6, deep.err
    assert word in deep.err and member.rstrip("/") in deep.err and name in deep.err
    js = bimcv("verify", "--dest", dest, "--deep", "--json")
    assert js.code == 6
    problems = [o for o in js.json_lines() if o.get("event") == "problem"]
    assert [(p["kind"], p["archive"], p["where"]) for p in problems] == [
        (word.lower(), name, "archive")
    ]
    assert js.summary()["deep_problems"] == 1
    # extract refuses it too (the members are checked against the listing as they come).
    ex = bimcv("extract", "--dest", dest, "--archives", name)
    assert ex.code == 6, ex.err
    assert _receipt_complete(dest, name) is not True


def test_deep_refuses_a_listing_naming_a_dotdot_member(
    sample_release: SampleRelease, tmp_path: Path
) -> None:
    root = copy_release(sample_release, tmp_path / "share")
    name = sample_release.subject_archives[1]
    lname = sample_release.listings[name]
    evil = f"{TOP}/../../escape.txt"
    with (root / lname).open("a") as fh:
        fh.write(listing_line(_file_info(evil, b"x" * 5)) + "\n")
    republish(root, lname)
    dest = tmp_path / "d"
    with serving(root, sample_release.token) as server:
        got = bimcv("download", *_opts(server, dest), "-q")
    assert got.code == 0, got.err
    deep = bimcv("verify", "--dest", dest, "--deep", "--json")
    assert deep.code == 6, deep.err
    unsafe = [o for o in deep.json_lines() if o.get("event") == "problem" and o["kind"] == "unsafe"]
    assert [(p["path"], p["archive"]) for p in unsafe] == [(evil, name)]
    plain = bimcv("verify", "--dest", dest, "--deep")
    assert plain.code == 6 and "UNSAFE" in plain.err and evil in plain.err
    ex = bimcv("extract", "--dest", dest, "--archives", name)
    assert ex.code == 6 and evil in ex.err, ex.err
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()


# ------------------------------------------------------------------ verify --tree


def _one_file(dest: Path, suffix: str) -> Path:
    return sorted((dest / TOP).rglob(f"*{suffix}"), key=lambda p: p.stat().st_size)[-1]


def _delete(dest: Path) -> str:
    p = _one_file(dest, ".png")
    p.unlink()
    return p.relative_to(dest).as_posix()


def _grow(dest: Path) -> str:
    p = _one_file(dest, ".json")
    with p.open("ab") as fh:
        fh.write(b" ")
    return p.relative_to(dest).as_posix()


def _same_size(dest: Path) -> str:
    p = _one_file(dest, ".nii.gz")
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    return p.relative_to(dest).as_posix()


def _extra(dest: Path) -> str:
    p = next((dest / TOP).glob("sub-*")) / "notes.txt"
    p.write_text("mine\n")
    return p.relative_to(dest).as_posix()


TREE_CASES = {
    # damage → (word printed, exit without --hash, exit with --hash)
    "deleted": (_delete, "MISSING", 5, 5),
    "resized": (_grow, "SIZE", 5, 5),
    "same-size-change": (_same_size, "HASH", 0, 5),
    "extra-file": (_extra, "EXTRA", 5, 5),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_verify_tree_after_extract(dest: Path, case: str) -> None:
    damage, word, plain_code, hash_code = TREE_CASES[case]
    r = bimcv("extract", "--dest", dest, "-q")
    assert r.code == 0, r.err
    clean = bimcv("verify", "--dest", dest, "--tree", "--hash", "--json")
    assert clean.code == 0, clean.err
    assert clean.summary()["tree_problems"] == 0
    path = damage(dest)
    sizes_only = bimcv("verify", "--dest", dest, "--tree")
    assert sizes_only.code == plain_code, sizes_only.err
    if plain_code:
        assert word in sizes_only.err and path in sizes_only.err
    else:
        assert path not in sizes_only.err and "sizes only" in sizes_only.err
    hashed = bimcv("verify", "--dest", dest, "--tree", "--hash", "--json")
    assert hashed.code == hash_code, hashed.err
    problems = [o for o in hashed.json_lines() if o.get("event") == "problem"]
    assert [(p["kind"], p["path"]) for p in problems] == [(word.lower(), path)]
    assert hashed.summary()["tree_problems"] == 1
    if case in ("deleted", "resized"):  # extracting again repairs what it can see
        again = bimcv("extract", "--dest", dest, "--json")
        assert again.code == 0 and again.summary()["files_written"] == 1, again.err
        assert bimcv("verify", "--dest", dest, "--tree", "--hash").code == 0


# ------------------------------------------------------------------ extract


@pytest.mark.parametrize("subset", [None, "CT", "CR,DX"])
def test_extract_subset_gives_exactly_the_selection(
    dest: Path, sample_release: SampleRelease, subset: str | None
) -> None:
    r = bimcv("extract", "--dest", dest, *_subset_args(subset), "--json")
    assert r.code == 0, r.err
    want = expected_files(sample_release, subset)
    assert tree_files(dest) == want
    assert r.summary()["files_written"] == len(want)
    assert r.summary()["subset"] == (subset or "all")
    assert temp_files(dest) == []
    if subset is not None:  # a subset really leaves images out
        assert len(want) < len(expected_files(sample_release, None))


def test_plain_progress_separates_verb_and_name(dest: Path) -> None:
    r = bimcv("extract", "--dest", dest, "--subset", "CT")
    assert r.code == 0, r.err
    starts = [line for line in r.err.splitlines() if line.startswith("extract")]
    assert starts
    assert all(line.startswith("extract ") for line in starts), starts


def test_second_extract_with_larger_subset_adds_only_new_members(
    dest: Path, sample_release: SampleRelease
) -> None:
    first = bimcv("extract", "--dest", dest, "--subset", "CT", "-q")
    assert first.code == 0, first.err
    ct = expected_files(sample_release, "CT")
    assert tree_files(dest) == ct
    stamps = {}
    for rel in ct:
        st = (dest / rel).stat()
        stamps[rel] = (st.st_ino, st.st_mtime_ns)
    second = bimcv("extract", "--dest", dest, "--subset", "CT,CR", "--json")
    assert second.code == 0, second.err
    bigger = expected_files(sample_release, "CT,CR")
    assert tree_files(dest) == bigger
    assert second.summary()["files_written"] == len(set(bigger) - set(ct))
    for rel, (ino, mtime_ns) in stamps.items():
        st = (dest / rel).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime_ns), rel
    assert bimcv("verify", "--dest", dest, "--tree", "--hash").code == 0


def test_extract_out_puts_the_tree_there(
    dest: Path, sample_release: SampleRelease, tmp_path: Path
) -> None:
    out = tmp_path / "tree"
    r = bimcv("extract", "--dest", dest, "--out", out, "--subset", "CR,DX", "-q")
    assert r.code == 0, r.err
    assert tree_files(out) == expected_files(sample_release, "CR,DX")
    assert not (dest / TOP).exists()
    ok = bimcv("verify", "--dest", dest, "--out", out, "--tree", "--hash")
    assert ok.code == 0, ok.err
    (next((out / TOP).rglob("*.png"))).unlink()
    bad = bimcv("verify", "--dest", dest, "--out", out, "--tree")
    assert bad.code == 5 and "MISSING" in bad.err


def test_delete_archives_then_download_fetches_nothing_again(
    share_server: ShareServer, sample_release: SampleRelease, tmp_path: Path
) -> None:
    dest = tmp_path / "d"
    got = bimcv("download", *_opts(share_server, dest), "--subset", "CT", "-q")
    assert got.code == 0, got.err
    fetched = sorted(p.name for p in (dest / "archives").glob("*.tar.gz"))
    assert fetched and sample_release.no_ct_archive not in fetched
    ex = bimcv("extract", "--dest", dest, "--subset", "CT", "--delete-archives", "-q")
    assert ex.code == 0, ex.err
    assert list((dest / "archives").glob("*.tar.gz")) == []
    assert tree_files(dest) == expected_files(sample_release, "CT", fetched_only=True)
    share_server.requests.clear()
    for extra in ([], ["--extract"]):
        again = bimcv("download", *_opts(share_server, dest), "--subset", "CT", *extra, "--json")
        assert again.code == 0, again.err
        plan = {o["archive"]: o["action"] for o in again.json_lines() if o["event"] == "plan"}
        assert {plan[name] for name in fetched} == {"have"}, plan
    for name in fetched:
        assert share_server.requests.for_file(name) == [], name
    archive_gets = [
        rec
        for rec in share_server.requests.snapshot()
        if rec.method == "GET" and rec.path.endswith(".tar.gz")
    ]
    assert archive_gets == []
    assert list((dest / "archives").glob("*.tar.gz")) == []
    st = bimcv("status", "--dest", dest, "--json")
    assert st.code == 0, st.err
    rows = json_archives(st)
    for name in fetched:
        assert rows[name]["state"] == "extracted", rows[name]
        assert rows[name]["extracted_subset"] == "CT"
        assert rows[name]["archive_present"] is False
    text = bimcv("status", "--dest", dest)
    for name in fetched:
        assert any(
            line.startswith("extracted") and name in line and "[CT]" in line
            for line in text.out.splitlines()
        ), text.out


# ------------------------------------------------------------------ download --extract


@pytest.mark.parametrize("subset", [None, "CT"])
def test_download_extract_equals_download_then_extract(
    module_server: ShareServer, sample_release: SampleRelease, tmp_path: Path, subset: str | None
) -> None:
    one = tmp_path / "one-pass"
    two = tmp_path / "two-pass"
    r1 = bimcv("download", *_opts(module_server, one), *_subset_args(subset), "--extract", "-q")
    assert r1.code == 0, r1.err
    r2 = bimcv("download", *_opts(module_server, two), *_subset_args(subset), "-q")
    assert r2.code == 0, r2.err
    r3 = bimcv("extract", "--dest", two, *_subset_args(subset), "-q")
    assert r3.code == 0, r3.err
    assert tree_bytes(one) == tree_bytes(two)
    assert tree_files(one) == expected_files(sample_release, subset, fetched_only=True)
    assert temp_files(one) == []
    assert bimcv("verify", "--dest", one, "--tree", "--hash").code == 0


@pytest.fixture(scope="module")
def big_sample(tmp_path_factory: pytest.TempPathFactory) -> SampleRelease:
    return build_sample(tmp_path_factory.mktemp("big") / "share", archives=2, seed=7, size_scale=40)


def test_kill_9_during_download_extract_then_rerun(
    big_sample: SampleRelease, tmp_path: Path
) -> None:
    dest = tmp_path / "d"
    want = expected_files(big_sample, None)
    with serving(big_sample.root, big_sample.token, rate_limit=1_500_000) as server:
        proc = spawn("download", *_opts(server, dest), "--extract", "--jobs", "1", "-q")
        try:
            part = wait_for_part(dest, 400_000, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        name = part.name[: -len(".part")]
        assert not (dest / "archives" / name).exists()
        assert tree_files(dest) != want  # really killed mid-way
        r = bimcv("download", *_opts(server, dest), "--extract", "--jobs", "1", timeout=60)
        assert r.code == 0, r.err
        # The rerun resumed the .part rather than starting over.
        gets = server.requests.for_file(name)
        assert any((g.range or "").startswith("bytes=") and g.range != "bytes=0-" for g in gets)
    assert tree_files(dest) == want
    assert temp_files(dest) == []
    assert list((dest / "archives").glob("*.part")) == []
    audit = bimcv("verify", "--dest", dest, "--tree", "--hash")
    assert audit.code == 0, audit.err


# ------------------------------------------------------------------ kill during extract


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rpartition(")")[2].split()[0]


def _throttled_until(proc: subprocess.Popen[str], condition: Callable[[], bool]) -> bool:
    """Run ``proc`` in short slices (SIGCONT/SIGSTOP) and leave it stopped once ``condition``.

    ``condition`` is checked while the process is stopped, so what it sees is what
    the process leaves on disk when it is then killed. False when ``proc`` ended first.
    """
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.004)
        proc.send_signal(signal.SIGSTOP)
        stop_by = time.monotonic() + 2
        while _proc_state(proc.pid) not in ("T", "t", "Z", "?") and time.monotonic() < stop_by:
            time.sleep(0.0005)
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.004)
    raise AssertionError("the condition never held")


@pytest.fixture(scope="module")
def one_big_archive(tmp_path_factory: pytest.TempPathFactory) -> SampleRelease:
    """A release whose one subject archive is about 30 MB (big files: slow to extract)."""
    return build_sample(
        tmp_path_factory.mktemp("bigx") / "share",
        archives=1,
        subjects_per_archive=2,
        seed=3,
        size_scale=250,
    )


def test_kill_9_during_extract_then_rerun(one_big_archive: SampleRelease, tmp_path: Path) -> None:
    sample = one_big_archive
    dest = tmp_path / "d"
    with serving(sample.root, sample.token) as server:
        got = bimcv("download", *_opts(server, dest), "-q", timeout=60)
    assert got.code == 0, got.err
    want = expected_files(sample, None)
    name = sample.subject_archives[0]
    receipt = dest / ".bimcv-fetch" / "receipts" / f"{name}.json"

    proc = spawn("extract", "--dest", dest, "--jobs", "1", "-q")
    try:
        # Stopped in the middle of writing a member ...
        assert _throttled_until(proc, lambda: bool(temp_files(dest))), proc.communicate(timeout=10)
        assert not receipt.exists()
        # ... long enough that the next member's end writes the incremental receipt.
        time.sleep(RECEIPT_INTERVAL + 0.2)
        assert _throttled_until(proc, receipt.exists), proc.communicate(timeout=10)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    kept = json.loads(receipt.read_text())
    assert kept["complete"] is False and kept["members"]
    on_disk = {p: h for p, h in tree_files(dest).items() if not p.endswith(TMP_SUFFIX)}
    assert on_disk and on_disk != want  # killed mid-way: something is missing
    assert set(on_disk.items()) <= set(want.items())  # what is in place is right
    r = bimcv("extract", "--dest", dest, "--json", timeout=60)
    assert r.code == 0, r.err
    assert tree_files(dest) == want
    assert temp_files(dest) == []
    assert json.loads(receipt.read_text())["complete"] is True
    # What the receipt recorded was trusted, not written again.
    assert r.summary()["files_written"] == len(want) - len(kept["members"])
    audit = bimcv("verify", "--dest", dest, "--tree", "--hash")
    assert audit.code == 0, audit.err


def test_concurrent_extractions_keep_each_others_temp_files(
    sample_release: SampleRelease, tmp_path: Path
) -> None:
    """Two extractions into one folder: the one that finishes leaves the other's file alone.

    (Regression: a finishing archive used to remove every ``.*.bimcv-tmp`` in the
    folders it touched, so a parallel archive failed with exit 7 'No such file'.)
    """
    # A participants archive with a big participants.tsv, so its extraction can be
    # held in the middle of writing covid19_posi/.participants.tsv.HOST-PID.bimcv-tmp.
    root = copy_release(sample_release, tmp_path / "share")
    table = sample_release.quirks["bogus_participants_row"]
    meta = sample_release.archive_of(table)
    items = read_items(root / meta)
    rows = random.Random(5).randbytes(6 << 20).hex().encode()
    items = [(ti, rows if ti.name == table else data) for ti, data in items]
    write_items(root / meta, items)
    republish(root, meta)
    lname = sample_release.listings[meta]
    (root / lname).write_text("".join(listing_line(ti) + "\n" for ti, _ in items))
    republish(root, lname)
    dest = tmp_path / "d"
    with serving(root, sample_release.token) as server:
        got = bimcv("download", *_opts(server, dest), "-q")
    assert got.code == 0, got.err

    def in_flight() -> list[Path]:
        return list((dest / TOP).glob(f".participants.tsv*{TMP_SUFFIX}"))

    first = spawn("extract", "--dest", dest, "--archives", meta, "--jobs", "1", "-q")
    try:
        caught = _throttled_until(first, lambda: bool(in_flight()))
        assert caught, first.communicate(timeout=10)
        # Meanwhile another extraction, of another archive, into the same top folder.
        other = bimcv("extract", "--dest", dest, "--archives", sample_release.subject_archives[0])
        assert other.code == 0, other.err
        survived = bool(in_flight())
        first.send_signal(signal.SIGCONT)
        _out, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.communicate(timeout=10)
    assert first.returncode == 0, err
    assert survived
    assert (dest / table).read_bytes() == rows


# ------------------------------------------------------------------ hostile archive


def _dotdot(items: Items) -> tuple[Items, list[tarfile.TarInfo]]:
    data = b"escaped\n"
    evil = _file_info(f"{TOP}/../escape", data)
    return [*items[:3], (evil, data), *items[3:]], [evil]


def _symlink(items: Items) -> tuple[Items, list[tarfile.TarInfo]]:
    link = _symlink_info(f"{TOP}/evil", "../..")
    data = b"escaped through a link\n"
    through = _file_info(f"{TOP}/evil/escape", data)
    return [*items[:3], (link, None), (through, data), *items[3:]], [link, through]


def _hidden(items: Items) -> tuple[Items, list[tarfile.TarInfo]]:
    with_evil, _added = _dotdot(items)
    return with_evil, []  # the listing does not name it: the archive alone is hostile


HOSTILE = {"dotdot": _dotdot, "symlink": _symlink, "unlisted-dotdot": _hidden}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_through_the_cli(
    sample_release: SampleRelease, tmp_path: Path, case: str
) -> None:
    root = copy_release(sample_release, tmp_path / "share")
    name = sample_release.subject_archives[0]
    lname = sample_release.listings[name]
    items, added = HOSTILE[case](read_items(root / name))
    write_items(root / name, items)
    republish(root, name)
    listing = (root / lname).read_text().splitlines()
    listing[3:3] = [listing_line(ti) for ti in added]
    (root / lname).write_text("".join(line + "\n" for line in listing))
    republish(root, lname)
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "d"
    before = snapshot_outside(tmp_path, dest)
    with serving(root, sample_release.token) as server:
        one = bimcv("download", *_opts(server, dest), "--extract")
        assert one.code == 6, one.err
        assert name in one.err and "Traceback" not in one.err
        assert snapshot_outside(tmp_path, dest) == before
        if not (dest / "archives" / name).exists():
            plain = bimcv("download", *_opts(server, dest), "--archives", name, "-q")
            assert plain.code == 0, plain.err  # fetching is fine; extracting is not
    assert (dest / "archives" / name).exists()
    ex = bimcv("extract", "--dest", dest)
    assert ex.code == 6, ex.err
    assert name in ex.err
    assert snapshot_outside(tmp_path, dest) == before
    assert not (tmp_path / "escape").exists() and not (work / "escape").exists()
    for p in (dest / TOP).rglob("*") if (dest / TOP).exists() else []:
        assert not p.is_symlink(), p
        assert "escape" not in p.name, p
    # Other archives were extracted; the hostile one left no receipt claiming completion.
    assert _receipt_complete(dest, name) is not True


# ------------------------------------------------------------------ status


def test_status_from_disk_alone_with_the_server_stopped(
    sample_release: SampleRelease, tmp_path: Path
) -> None:
    dest = tmp_path / "d"
    with serving(sample_release.root, sample_release.token) as server:
        r = bimcv("download", *_opts(server, dest), "-q")
        assert r.code == 0, r.err
        url = server.url
    missing, partial, downloaded = sample_release.subject_archives
    extracted, verified, _other = sample_release.metadata_archives
    arch = dest / "archives"
    (arch / missing).unlink()
    data = (arch / partial).read_bytes()
    (arch / partial).unlink()
    (arch / (partial + ".part")).write_bytes(data[: len(data) // 4])
    os.utime(arch / downloaded)  # a new mtime: the verified stamp no longer proves it
    ex = bimcv("extract", "--dest", dest, "--archives", extracted, "--subset", "CT", "-q")
    assert ex.code == 0, ex.err
    # Nothing listens at the old address any more; status needs no network.
    st = bimcv("status", "--dest", dest, "--server", url, "--json")
    assert st.code == 0, st.err
    rows = json_archives(st)
    assert rows[missing]["state"] == "missing" and rows[missing]["on_disk"] == 0
    assert rows[partial]["state"] == "partial"
    assert rows[partial]["percent"] == pytest.approx(25.0, abs=0.2)
    assert rows[partial]["size"] == sample_release.sizes[partial]
    assert rows[downloaded]["state"] == "downloaded"
    assert rows[verified]["state"] == "verified"
    assert rows[extracted]["state"] == "extracted"
    assert rows[extracted]["extracted_subset"] == "CT"
    summary = st.summary()
    assert summary["archives"] == len(sample_release.archives)
    assert summary["missing"] == 1 and summary["partial"] == 1 and summary["extracted"] == 1
    text = bimcv("status", "--dest", dest)
    assert text.code == 0, text.err
    lines = {line.split()[1]: line for line in text.out.splitlines() if len(line.split()) > 1}
    assert lines[missing].startswith("missing")
    assert lines[partial].startswith("partial") and " 25%" in lines[partial]
    assert lines[downloaded].startswith("downloaded")
    assert lines[verified].startswith("verified")
    assert lines[extracted].startswith("extracted") and "[CT]" in lines[extracted]
    assert f"{len(sample_release.archives)} archives:" in text.out
    # verify agrees: it rehashes the archive whose mtime changed and stamps it again.
    v = bimcv("verify", "--dest", dest)
    assert v.code == 0, v.err
    again = json_archives(bimcv("status", "--dest", dest, "--json"))
    assert again[downloaded]["state"] == "verified"


# ------------------------------------------------------------------ demo


def test_demo_runs_and_prints_a_tree(tmp_path: Path) -> None:
    r = bimcv("demo", "--keep", tmp_path / "demo", timeout=60)
    assert r.code == 0, r.err
    tree = [line.strip() for line in r.out.splitlines()]
    assert f"{TOP}/" in tree
    assert "sub-S" in r.out and "mod-rx/" in r.out
    assert "demo done" in r.err
    assert (tmp_path / "demo" / "dest" / TOP).is_dir()
