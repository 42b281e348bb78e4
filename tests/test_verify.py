from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from bimcv_fetch import extract as X
from bimcv_fetch.errors import ExitCode
from bimcv_fetch.events import Collector
from bimcv_fetch.manifest import Listing, parse_sha1sums
from bimcv_fetch.mids import Selector, parse_subset
from bimcv_fetch.store import Layout, is_verified
from bimcv_fetch.verify import (
    audit_tree,
    checks_exit_code,
    deep_check,
    problems_exit_code,
    verify_archives,
)

from .archives import TOP, Entry, listing_of, sample_entries, write_archive

ALL = Selector()


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture
def good(tmp_path: Path) -> tuple[Layout, list[Entry], Path, Listing]:
    layout = Layout(tmp_path / "dest")
    layout.ensure()
    entries = sample_entries(subjects=3, image_size=5000)
    arch = write_archive(layout.archive("a.tar.gz"), entries)
    return layout, entries, arch, listing_of(entries, "a.tar.gz.tar-tvf.txt")


# ------------------------------------------------------------------ archive SHA1


def test_verify_archives_statuses(good: tuple[Layout, list[Entry], Path, Listing]) -> None:
    layout, entries, arch, _ = good
    bad = write_archive(layout.archive("b.tar.gz"), entries[:5])
    bad_sha = sha1(bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    layout.part("c.tar.gz").write_bytes(b"partial")
    write_archive(layout.archive("e.tar.gz"), entries[:3])
    sums = parse_sha1sums(
        f"{sha1(arch)}  a.tar.gz\n{bad_sha}  b.tar.gz\n{'c' * 40}  c.tar.gz\n{'d' * 40}  d.tar.gz\n"
    )
    events = Collector()
    names = ["a.tar.gz", "b.tar.gz", "c.tar.gz", "d.tar.gz", "e.tar.gz"]
    checks = verify_archives(layout, sums, names, jobs=3, reporter=events)
    assert [c.name for c in checks] == names
    assert [c.status for c in checks] == ["ok", "mismatch", "partial", "missing", "unknown"]
    assert checks[0].actual == sha1(arch) and not checks[0].cached
    assert checks[1].expected == bad_sha and checks[1].actual == sha1(bad)
    assert checks[1].exit_code == ExitCode.CHECKSUM
    assert checks_exit_code(checks) == ExitCode.CHECKSUM
    assert is_verified(layout, "a.tar.gz", sha1(arch))
    assert not layout.verified_stamp("b.tar.gz").exists()
    assert sum(e.done for e in events.of("advance") if e.name == "a.tar.gz") == arch.stat().st_size
    assert {e.name for e in events.of("fail")} == {"b.tar.gz"}
    # a second run trusts the stamp, unless forced
    again = verify_archives(layout, sums, ["a.tar.gz"])
    assert again[0].ok and again[0].cached
    forced = verify_archives(layout, sums, ["a.tar.gz"], force=True)
    assert forced[0].ok and not forced[0].cached


Good = tuple[Layout, list[Entry], Path, Listing]


def test_verify_catches_a_truncated_archive(good: Good) -> None:
    layout, _, arch, _ = good
    sums = parse_sha1sums(f"{sha1(arch)}  a.tar.gz\n")
    assert verify_archives(layout, sums, ["a.tar.gz"])[0].ok
    arch.write_bytes(arch.read_bytes()[:-10])
    check = verify_archives(layout, sums, ["a.tar.gz"])[0]  # the stamp no longer matches
    assert check.status == "mismatch" and not check.cached


# ------------------------------------------------------------------ deep check


def test_deep_check_good(good: tuple[Layout, list[Entry], Path, Listing]) -> None:
    _, _, arch, listing = good
    events = Collector()
    assert deep_check(arch, listing, reporter=events) == []
    assert events.of("finish")[0].data["status"] == "ok"
    assert sum(e.done for e in events.of("advance")) == arch.stat().st_size


@pytest.mark.parametrize("damage", ["flip", "truncate", "crc"])
def test_deep_check_damaged(good: tuple[Layout, list[Entry], Path, Listing], damage: str) -> None:
    _, _, arch, listing = good
    data = bytearray(arch.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x20
    elif damage == "truncate":
        data = data[: len(data) - 300]
    else:
        data[-8] ^= 1  # the gzip CRC32: only a full read notices
    arch.write_bytes(bytes(data))
    problems = deep_check(arch, listing)
    assert [p.kind for p in problems] == ["corrupt"]
    assert problems_exit_code(problems) == ExitCode.UNSAFE
    json.dumps([asdict(p) for p in problems])


def test_deep_check_listing_differences(tmp_path: Path) -> None:
    entries = sample_entries(subjects=2)
    extra = Entry(f"{TOP}/extra.tsv", b"surprise")
    arch = write_archive(tmp_path / "a.tar.gz", [*entries, extra])
    lying = [
        Entry(e.name, e.data + b"!") if e.name.endswith("participants.tsv") else e for e in entries
    ]
    missing = Entry(f"{TOP}/missing.tsv", b"")
    problems = deep_check(arch, listing_of([*lying, missing]))
    got = {(p.kind, p.path) for p in problems}
    assert got == {
        ("extra", f"{TOP}/extra.tsv"),
        ("size", f"{TOP}/participants.tsv"),
        ("missing", f"{TOP}/missing.tsv"),
    }
    assert all(p.where == "archive" and p.archive == "a.tar.gz" for p in problems)
    assert problems_exit_code(problems) == ExitCode.UNSAFE


def test_deep_check_unsafe_members(tmp_path: Path) -> None:
    entries = [
        *sample_entries(subjects=1),
        Entry("../evil", b"x"),
        Entry(f"{TOP}/l", kind="symlink", link="/etc"),
        Entry(f"{TOP}/f", kind="fifo"),
    ]
    arch = write_archive(tmp_path / "a.tar.gz", entries)
    before = set(os.listdir(tmp_path))
    problems = deep_check(arch, listing_of(entries))
    unsafe = {p.path for p in problems if p.kind == "unsafe"}
    assert {"../evil", f"{TOP}/l", f"{TOP}/f"} <= unsafe
    assert any("listing" in p.detail for p in problems)
    assert set(os.listdir(tmp_path)) == before  # nothing written
    assert problems_exit_code(problems) == ExitCode.UNSAFE


# ------------------------------------------------------------------ tree audit


@pytest.fixture
def extracted(good: tuple[Layout, list[Entry], Path, Listing]) -> tuple[Layout, dict[str, Listing]]:
    layout, _, arch, listing = good
    X.extract_archive(arch, listing, layout, name="a.tar.gz", archive_sha1=sha1(arch), selector=ALL)
    return layout, {"a.tar.gz": listing}


def test_audit_tree_clean(extracted: tuple[Layout, dict[str, Listing]]) -> None:
    layout, listings = extracted
    assert audit_tree(layout, listings, ALL) == []
    assert audit_tree(layout, listings, ALL, hash=True) == []


def test_audit_tree_flags_files_from_unverified_bytes(
    extracted: tuple[Layout, dict[str, Listing]],
) -> None:
    """download --extract stopped before the SHA1 check: those files prove nothing."""
    import json

    layout, listings = extracted
    path = layout.receipt("a.tar.gz")
    receipt = json.loads(path.read_text())
    member = sorted(receipt["members"])[0]
    receipt["members"][member]["unverified"] = True
    path.write_text(json.dumps(receipt))
    problems = audit_tree(layout, listings, ALL, hash=True)
    assert [(p.kind, p.path) for p in problems] == [("unverified", member)]
    assert problems_exit_code(problems) == ExitCode.CHECKSUM


def test_audit_tree_finds_problems(extracted: tuple[Layout, dict[str, Listing]]) -> None:
    layout, listings = extracted
    tree = layout.tree
    files = sorted(p for p in X.load_receipt(layout, "a.tar.gz").members)  # type: ignore[union-attr]
    big = [p for p in files if (tree / p).stat().st_size > 100]
    gone, grown, same_size = big[0], big[1], big[2]
    (tree / gone).unlink()
    with open(tree / grown, "ab") as fh:
        fh.write(b"more")
    data = bytearray((tree / same_size).read_bytes())
    data[10] ^= 0xFF
    st = os.stat(tree / same_size)
    (tree / same_size).write_bytes(bytes(data))
    os.utime(tree / same_size, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tree / TOP / "stray.txt").write_bytes(b"?")
    (tree / TOP / "strange-dir").mkdir()
    (tree / TOP / ".participants.tsv.bimcv-tmp").write_bytes(b"half")
    problems = audit_tree(layout, listings, ALL)
    got = {(p.kind, p.path) for p in problems}
    assert got == {
        ("missing", gone),
        ("size", grown),
        ("extra", f"{TOP}/stray.txt"),
        ("extra", f"{TOP}/strange-dir"),
        ("extra", f"{TOP}/.participants.tsv.bimcv-tmp"),
    }
    assert problems_exit_code(problems) == ExitCode.CHECKSUM
    hashed = audit_tree(layout, listings, ALL, hash=True, extras=False)
    assert {(p.kind, p.path) for p in hashed} == {
        ("missing", gone),
        ("size", grown),
        ("hash", same_size),
    }
    json.dumps([asdict(p) for p in hashed])


def test_audit_tree_symlink_in_place(
    extracted: tuple[Layout, dict[str, Listing]], tmp_path: Path
) -> None:
    layout, listings = extracted
    victim = layout.tree / TOP / "participants.tsv"
    victim.unlink()
    os.symlink(tmp_path, victim)
    problems = audit_tree(layout, listings, ALL)
    assert [(p.kind, p.path) for p in problems] == [("unsafe", f"{TOP}/participants.tsv")]
    assert problems_exit_code(problems) == ExitCode.UNSAFE


def test_audit_tree_selection_and_only_extracted(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "dest", tmp_path / "tree")
    e1 = sample_entries(subjects=2, seed=1)
    e2 = sample_entries(subjects=2, seed=2, top="covid19_neg")
    a1 = write_archive(tmp_path / "one.tar.gz", e1)
    l1, l2 = listing_of(e1), listing_of(e2)
    ct = Selector(parse_subset("CT"))
    X.extract_archive(a1, l1, layout, name="one.tar.gz", archive_sha1="1" * 40, selector=ct)
    listings = {"one.tar.gz": l1, "two.tar.gz": l2}
    # one.tar.gz was extracted with CT: the CT audit is clean for it; two.tar.gz is all missing
    problems = audit_tree(layout, listings, ct)
    assert problems and {p.archive for p in problems} == {"two.tar.gz"}
    assert {p.kind for p in problems} == {"missing"}
    assert audit_tree(layout, listings, ct, only_extracted=True) == []
    # asking for everything: one.tar.gz lacks its CR/DX files
    problems = audit_tree(layout, listings, ALL, only_extracted=True)
    assert problems and all(
        p.kind == "missing" and not p.path.endswith("_ct.nii.gz") for p in problems
    )
