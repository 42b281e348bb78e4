from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from bimcv_fetch import extract as X
from bimcv_fetch.errors import (
    CorruptArchiveError,
    ExitCode,
    Interrupted,
    LockedError,
    UnsafeArchiveError,
    worst,
)
from bimcv_fetch.events import Collector
from bimcv_fetch.manifest import Kind, Listing
from bimcv_fetch.mids import Selector, parse_subjects, parse_subset
from bimcv_fetch.store import FileLock, Layout, is_verified, write_verified

from .archives import (
    TOP,
    Entry,
    dir_entry,
    files_of,
    listing_of,
    sample_entries,
    snapshot,
    tree_files,
    write_archive,
)

SHA = "a" * 40


def sel(subset: str | None = None, subjects: list[str] | None = None) -> Selector:
    return Selector(parse_subset(subset), parse_subjects(subjects or []))


def make(tmp_path: Path, entries: list[Entry], name: str = "a.tar.gz") -> tuple[Path, Listing]:
    return write_archive(tmp_path / name, entries), listing_of(entries, name + ".tar-tvf.txt")


def layout_for(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "dest", tmp_path / "tree")


def expected(entries: list[Entry], selector: Selector) -> dict[str, bytes]:
    return {p.removeprefix("./"): d for p, d in files_of(entries).items() if selector.wants(p)}


def run(
    arch: Path, listing: Listing, layout: Layout, selector: Selector, **kw: object
) -> X.Receipt:
    return X.extract_archive(
        arch, listing, layout, name=arch.name, archive_sha1=SHA, selector=selector, **kw
    )  # type: ignore[arg-type]


# ------------------------------------------------------------------ planning


def test_plan_members_subset_dirs_and_order() -> None:
    entries = sample_entries(subjects=3)
    listing = listing_of(entries)
    plan = X.plan_members(listing, sel("CT"))
    names = [m.path for m in plan]
    order = [m.path for m in listing.members]
    assert names == sorted(names, key=order.index)  # listing order
    files = {m.path for m in plan if m.kind is Kind.FILE}
    assert files == set(expected(entries, sel("CT")))
    assert any(p.endswith("_ct.nii.gz") for p in files)
    assert any(p.endswith("_ct.json") for p in files)
    assert not any(p.endswith(("_dx.png", "_cr.png", "_dx.json")) for p in files)
    assert any(p.endswith("_scans.tsv") for p in files)
    dirs = {m.path for m in plan if m.kind is Kind.DIR}
    for f in files:  # every folder holding a wanted file is planned
        head = f.rpartition("/")[0]
        assert head in dirs
    idx = X.last_wanted_index(listing, sel("CT"))
    assert listing.members[idx].path == names[-1] or listing.members[idx].kind is Kind.FILE
    assert X.last_wanted_index(listing, sel(None)) == max(
        i for i, m in enumerate(listing.members) if m.kind is Kind.FILE
    )


def test_last_wanted_index_none() -> None:
    entries = [dir_entry(TOP), Entry(f"{TOP}/sub-S1/x_run-1_bp-chest_dx.png", b"1")]
    assert X.last_wanted_index(listing_of(entries), sel("CT")) == -1
    assert X.plan_members(listing_of(entries), sel("CT")) == []


# ------------------------------------------------------------------ subsets


@pytest.mark.parametrize("subset", ["all", "CT", "CR,DX", "DX"])
def test_extract_subset_gives_exactly_the_selection(tmp_path: Path, subset: str) -> None:
    entries = sample_entries(subjects=4)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    s = sel(subset)
    events = Collector()
    receipt = run(arch, listing, layout, s, reporter=events)
    want = expected(entries, s)
    assert tree_files(layout.tree) == want
    assert any(p.endswith("_scans.tsv") for p in want)
    assert f"{TOP}/participants.tsv" in want and f"{TOP}/README.txt" in want
    for p in want:  # a sidecar comes with its image
        if p.endswith(".json") and not p.endswith("participants.json"):
            stem = p[: -len(".json")]
            assert any(q.startswith(stem + ".") and q != p for q in want)
    for p in want:
        assert int(os.stat(layout.tree / p).st_mtime) == 1600691640
    assert receipt.complete and set(receipt.members) == set(want)
    assert receipt.written == len(want)
    raw = json.loads(layout.receipt(arch.name).read_text())
    assert raw["complete"] is True and raw["archive"] == arch.name and raw["sha1"] == SHA
    assert raw["subset"] == ("all" if subset == "all" else subset)
    assert raw["subjects"] is None and raw["tree"] == str(layout.tree)
    some = next(iter(want))
    assert raw["members"][some]["size"] == len(want[some])
    assert raw["members"][some]["hash"].startswith("crc32:")
    assert X.receipt_covers(layout, arch.name, s)
    assert X.receipt_covers(layout, arch.name, s, listing=listing)
    kinds = [e.kind for e in events.events]
    assert kinds[0] == "start" and kinds[-1] == "finish"
    assert sum(e.done for e in events.of("advance")) == sum(len(d) for d in want.values())
    assert not list(layout.tree.rglob("*" + X.TMP_SUFFIX))


def test_extract_subjects(tmp_path: Path) -> None:
    entries = sample_entries(subjects=3)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    s = sel("CT", ["sub-S03045"])
    run(arch, listing, layout, s)
    want = expected(entries, s)
    assert tree_files(layout.tree) == want
    assert all("S03044" not in p for p in want)
    raw = json.loads(layout.receipt(arch.name).read_text())
    assert raw["subjects"] == ["S03045"]
    assert not X.receipt_covers(layout, arch.name, sel("CT"))
    assert X.receipt_covers(layout, arch.name, sel("CT", ["S03045"]))


def test_larger_subset_adds_only_new_members(tmp_path: Path) -> None:
    entries = sample_entries(subjects=4)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    first = run(arch, listing, layout, sel("CT"))
    before = {p: os.stat(layout.tree / p) for p in first.members}
    time.sleep(0.01)
    second = run(arch, listing, layout, sel("CR,DX"))
    assert tree_files(layout.tree) == expected(entries, sel(None))
    for p, st in before.items():
        now = os.stat(layout.tree / p)
        assert (now.st_ino, now.st_mtime_ns, now.st_ctime_ns) == (
            st.st_ino,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
    new = set(expected(entries, sel("CR,DX"))) - set(first.members)
    assert second.written == len(new) and second.skipped > 0
    raw = json.loads(layout.receipt(arch.name).read_text())
    assert raw["subset"] == "all" and raw["subsets"] == "all"
    assert X.receipt_covers(layout, arch.name, sel(None))
    # a rerun of everything writes nothing
    third = run(arch, listing, layout, sel(None))
    assert third.written == 0


def test_receipt_union_of_selections(tmp_path: Path) -> None:
    entries = sample_entries(subjects=3)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    run(arch, listing, layout, sel("CT"))
    run(arch, listing, layout, sel("DX"))
    raw = json.loads(layout.receipt(arch.name).read_text())
    assert raw["subsets"] == ["CT", "DX"] and raw["subset"] == "CT,DX"
    assert X.receipt_covers(layout, arch.name, sel("CT,DX"))
    assert not X.receipt_covers(layout, arch.name, sel("CR"))
    assert not X.receipt_covers(layout, arch.name, sel(None))
    assert not X.receipt_covers(layout, arch.name, sel("CT"), sha1="b" * 40)
    assert not X.receipt_covers(Layout(tmp_path / "dest", tmp_path / "other"), arch.name, sel("CT"))


def test_rerun_rewrites_a_changed_file(tmp_path: Path) -> None:
    entries = sample_entries(subjects=2)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    run(arch, listing, layout, sel(None))
    victim = layout.tree / f"{TOP}/participants.tsv"
    victim.write_bytes(b"changed, and of another size")
    gone = layout.tree / f"{TOP}/README.txt"
    gone.unlink()
    r = run(arch, listing, layout, sel(None))
    assert r.written == 2
    assert tree_files(layout.tree) == expected(entries, sel(None))


# ------------------------------------------------------------------ early stop / no open


def _early_stop_entries() -> list[Entry]:
    rng = random.Random(3)
    base = f"{TOP}/sub-S1/ses-E1/mod-rx"
    return [
        dir_entry(TOP),
        dir_entry(f"{TOP}/sub-S1"),
        dir_entry(f"{TOP}/sub-S1/ses-E1"),
        dir_entry(base),
        Entry(f"{TOP}/participants.tsv", b"p\n"),
        Entry(f"{base}/sub-S1_ses-E1_run-1_bp-chest_ct.nii.gz", rng.randbytes(50_000)),
        Entry(f"{base}/sub-S1_ses-E1_run-1_bp-chest_ct.json", b"{}"),
        Entry(f"{base}/sub-S1_ses-E1_run-2_bp-chest_vp-pa_dx.png", rng.randbytes(8_000_000)),
        Entry(f"{base}/sub-S1_ses-E1_run-2_bp-chest_vp-pa_dx.json", b"{}"),
    ]


def test_reading_stops_after_the_last_wanted_member(tmp_path: Path) -> None:
    entries = _early_stop_entries()
    arch, listing = make(tmp_path, entries)
    data = arch.read_bytes()
    # garbage in place of the last 40%: only unwanted DX bytes live there (the
    # threaded decoder reads ahead by a few MiB, hence the large DX member)
    cut = len(data) * 6 // 10
    arch.write_bytes(data[:cut] + os.urandom(len(data) - cut))
    layout = layout_for(tmp_path)
    r = run(arch, listing, layout, sel("CT"))
    assert r.complete and set(tree_files(layout.tree)) == set(expected(entries, sel("CT")))
    with pytest.raises(CorruptArchiveError):
        run(arch, listing, Layout(tmp_path / "d2", tmp_path / "t2"), sel("DX"))


def test_bytes_read_stop_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = _early_stop_entries()
    arch, listing = make(tmp_path, entries)
    counted: list[int] = []
    real_open = X.gz.open_gzip_stream

    class Counting:
        def __init__(self, f: object) -> None:
            self.f = f

        def read(self, n: int = -1) -> bytes:
            b = self.f.read(n)  # type: ignore[attr-defined]
            counted.append(len(b))
            return b  # type: ignore[no-any-return]

        def readinto(self, buf: bytearray) -> int:
            n = self.f.readinto(buf)  # type: ignore[attr-defined]
            counted.append(n)
            return n  # type: ignore[no-any-return]

        def readable(self) -> bool:
            return True

        def __getattr__(self, name: str) -> object:
            return getattr(self.f, name)

    monkeypatch.setattr(
        X.gz,
        "open_gzip_stream",
        lambda fh, **kw: real_open(Counting(fh), **{**kw, "backend": "zlib"}),
    )
    run(arch, listing, layout_for(tmp_path), sel("CT"))
    assert 0 < sum(counted) < arch.stat().st_size // 2


def test_archive_without_wanted_members_is_not_opened(tmp_path: Path) -> None:
    entries = [
        dir_entry(TOP),
        Entry(f"{TOP}/sub-S1/ses-E1/mod-rx/sub-S1_ses-E1_run-1_bp-chest_vp-pa_dx.png", b"x"),
        Entry(f"{TOP}/sub-S1/ses-E1/mod-rx/sub-S1_ses-E1_run-1_bp-chest_vp-pa_dx.json", b"{}"),
    ]
    listing = listing_of(entries)
    layout = layout_for(tmp_path)
    missing = tmp_path / "never-downloaded.tar.gz"
    r = X.extract_archive(
        missing, listing, layout, name=missing.name, archive_sha1=SHA, selector=sel("CT")
    )
    assert r.complete and r.members == {}
    assert not layout.tree.exists() or tree_files(layout.tree) == {}
    assert X.receipt_covers(layout, missing.name, sel("CT"))


def test_complete_receipt_and_files_mean_archive_not_opened(tmp_path: Path) -> None:
    entries = sample_entries(subjects=2)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    run(arch, listing, layout, sel(None))
    arch.unlink()
    r = run(arch, listing, layout, sel("CT"))  # would fail if it opened the archive
    assert r.written == 0 and r.complete


# ------------------------------------------------------------------ hostile archives


def _outside_snapshot(tmp_path: Path, layout: Layout) -> set[str]:
    tree = layout.tree.relative_to(tmp_path).as_posix()
    return {p for p in snapshot(tmp_path) if p != tree and not p.startswith(tree + "/")}


def _assert_refused(
    tmp_path: Path,
    entries: list[Entry],
    listing: Listing | None = None,
    *,
    prepare: object = None,
    exc: type[Exception] = UnsafeArchiveError,
    selector: Selector | None = None,
) -> Layout:
    arch = write_archive(tmp_path / "evil.tar.gz", entries)
    listing = listing or listing_of(entries)
    layout = layout_for(tmp_path)
    layout.tree.mkdir(parents=True, exist_ok=True)
    (tmp_path / "outside").mkdir(exist_ok=True)
    if callable(prepare):
        prepare(layout)
    before = _outside_snapshot(tmp_path, layout)
    outside_files = tree_files(tmp_path / "outside")
    with pytest.raises(exc) as info:
        run(arch, listing, layout, selector or sel(None))
    if exc is UnsafeArchiveError:
        assert type(info.value) is UnsafeArchiveError
        assert info.value.exit_code == ExitCode.UNSAFE
    after = _outside_snapshot(tmp_path, layout)
    assert after - before <= {
        "dest/.bimcv-fetch",
        "dest/.bimcv-fetch/receipts",
        "dest/.bimcv-fetch/receipts/evil.tar.gz.json",
        "dest/.bimcv-fetch/locks",
        "dest",
    }
    assert tree_files(tmp_path / "outside") == outside_files
    return layout


GOOD = [dir_entry(TOP), Entry(f"{TOP}/participants.tsv", b"ok\n")]


@pytest.mark.parametrize(
    "evil",
    [
        Entry("../escape.txt", b"pwned"),
        Entry(f"{TOP}/../../outside/escape.txt", b"pwned"),
        Entry("/OUTSIDE/abs.txt", b"pwned"),
        Entry(f"{TOP}\\..\\..\\outside\\x.txt", b"pwned"),
        Entry("C:/outside/x.txt", b"pwned"),
        Entry(f"{TOP}/link", kind="symlink", link="../outside"),
        Entry(f"{TOP}/abs-link", kind="symlink", link="/etc"),
        Entry(f"{TOP}/hard", kind="hardlink", link="/etc/passwd"),
        Entry(f"{TOP}/hard2", kind="hardlink", link=f"{TOP}/participants.tsv"),
        Entry(f"{TOP}/fifo", kind="fifo"),
        Entry(f"{TOP}/null", kind="char"),
        Entry(f"{TOP}/sda", kind="block"),
    ],
    ids=[
        "dotdot",
        "inner-dotdot",
        "absolute",
        "backslash",
        "drive",
        "symlink-rel",
        "symlink-abs",
        "hardlink-abs",
        "hardlink-inside",
        "fifo",
        "chardev",
        "blockdev",
    ],
)
def test_hostile_member_in_archive_and_listing(tmp_path: Path, evil: Entry) -> None:
    if evil.name.startswith("/OUTSIDE"):
        evil = Entry(str(tmp_path / "outside" / "abs.txt"), evil.data)
    layout = _assert_refused(tmp_path, [*GOOD, evil])
    assert not layout.tree.exists() or tree_files(layout.tree) == {}  # refused up front


@pytest.mark.parametrize(
    "evil",
    [
        Entry("../escape.txt", b"pwned"),
        Entry(f"{TOP}/link", kind="symlink", link="../../outside"),
        Entry(f"{TOP}/hard", kind="hardlink", link="/etc/passwd"),
        Entry(f"{TOP}/fifo", kind="fifo"),
        Entry(f"{TOP}/null", kind="char"),
    ],
    ids=["dotdot", "symlink", "hardlink", "fifo", "chardev"],
)
def test_hostile_member_hidden_from_the_listing(tmp_path: Path, evil: Entry) -> None:
    """The listing looks clean; the archive is not: refused when the member shows up."""
    after = Entry(f"{TOP}/after.tsv", b"x")
    layout = _assert_refused(tmp_path, [*GOOD, evil, after], listing_of([*GOOD, after]))
    assert not (layout.tree / TOP / "after.tsv").exists()
    names = set(snapshot(layout.tree))
    assert not any(n.endswith(("link", "hard", "fifo", "null")) for n in names)


def test_symlink_then_file_through_it(tmp_path: Path) -> None:
    entries = [
        *GOOD,
        Entry(f"{TOP}/sub-S1", kind="symlink", link="../outside"),
        Entry(f"{TOP}/sub-S1/escape.tsv", b"pwned"),
    ]
    listing = listing_of([*GOOD, Entry(f"{TOP}/sub-S1/escape.tsv", b"pwned")])
    _assert_refused(tmp_path, entries, listing)
    assert not (tmp_path / "outside" / "escape.tsv").exists()


def test_symlinked_parent_already_on_disk(tmp_path: Path) -> None:
    entries = sample_entries(subjects=2)

    def prepare(layout: Layout) -> None:
        (layout.tree / TOP).mkdir(parents=True)
        os.symlink(tmp_path / "outside", layout.tree / TOP / "sub-S03044")

    _assert_refused(tmp_path, entries, prepare=prepare)
    assert list((tmp_path / "outside").iterdir()) == []


def test_symlinked_top_folder_already_on_disk(tmp_path: Path) -> None:
    def prepare(layout: Layout) -> None:
        os.symlink(tmp_path / "outside", layout.tree / TOP)

    _assert_refused(tmp_path, sample_entries(subjects=1), prepare=prepare)
    assert list((tmp_path / "outside").iterdir()) == []


def test_existing_symlink_at_final_path_is_replaced_not_followed(tmp_path: Path) -> None:
    entries = sample_entries(subjects=1)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_bytes(b"keep me")
    (layout.tree / TOP).mkdir(parents=True)
    os.symlink(target, layout.tree / TOP / "participants.tsv")
    run(arch, listing, layout, sel(None))
    assert target.read_bytes() == b"keep me"
    final = layout.tree / TOP / "participants.tsv"
    assert (
        not final.is_symlink()
        and final.read_bytes() == files_of(entries)[f"{TOP}/participants.tsv"]
    )


def test_existing_symlink_at_temp_path_is_not_followed(tmp_path: Path) -> None:
    entries = sample_entries(subjects=1)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_bytes(b"keep me")
    (layout.tree / TOP).mkdir(parents=True)
    os.symlink(target, layout.tree / TOP / (".participants.tsv" + X.TMP_SUFFIX))
    run(arch, listing, layout, sel(None))
    assert target.read_bytes() == b"keep me"
    assert tree_files(layout.tree) == expected(entries, sel(None))


def test_listing_naming_an_unsafe_member_is_refused_before_opening(tmp_path: Path) -> None:
    listing = listing_of([*GOOD, Entry(f"{TOP}/l", kind="symlink", link="/")])
    layout = layout_for(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        X.extract_archive(
            tmp_path / "absent.tar.gz",
            listing,
            layout,
            name="absent.tar.gz",
            archive_sha1=SHA,
            selector=sel(None),
        )
    assert not layout.tree.exists()


def test_directory_in_the_way(tmp_path: Path) -> None:
    arch, listing = make(tmp_path, sample_entries(subjects=1))
    layout = layout_for(tmp_path)
    (layout.tree / TOP / "participants.tsv").mkdir(parents=True)
    with pytest.raises(UnsafeArchiveError, match="folder"):
        run(arch, listing, layout, sel(None))


def test_ustar_and_pax_long_names(tmp_path: Path) -> None:
    long = f"{TOP}/sub-S1/ses-E1/mod-rx/" + "sub-S1_ses-E1_acq-29_run-5_" + "x" * 120 + "_ct.nii.gz"
    entries = [dir_entry(TOP), Entry(long, b"volume"), Entry(f"{TOP}/p.tsv", b"t")]
    for fmt, name in ((tarfile.PAX_FORMAT, "pax.tar.gz"), (tarfile.GNU_FORMAT, "gnu.tar.gz")):
        arch = write_archive(tmp_path / name, entries, fmt=fmt)
        layout = Layout(tmp_path / (name + "-d"), tmp_path / (name + "-tree"))
        X.extract_archive(
            arch, listing_of(entries), layout, name=name, archive_sha1=SHA, selector=sel(None)
        )
        assert tree_files(layout.tree) == files_of(entries)


# ------------------------------------------------------------------ corrupt archives


def test_member_not_in_listing(tmp_path: Path) -> None:
    entries = sample_entries(subjects=1)
    arch = write_archive(tmp_path / "a.tar.gz", [*entries, Entry(f"{TOP}/extra.tsv", b"x")])
    with pytest.raises(CorruptArchiveError, match="not in the listing"):
        run(
            arch,
            listing_of([*entries, Entry(f"{TOP}/zzz.tsv", b"y")]),
            layout_for(tmp_path),
            sel(None),
        )


def test_member_size_differs_from_listing(tmp_path: Path) -> None:
    entries = sample_entries(subjects=1)
    arch = write_archive(tmp_path / "a.tar.gz", entries)
    lying = [
        Entry(e.name, e.data + b"!") if e.name.endswith("participants.tsv") else e for e in entries
    ]
    layout = layout_for(tmp_path)
    with pytest.raises(CorruptArchiveError, match="listing says"):
        run(arch, listing_of(lying), layout, sel(None))
    assert not (layout.tree / TOP / "participants.tsv").exists()


def test_member_type_differs_from_listing(tmp_path: Path) -> None:
    entries = [dir_entry(TOP), Entry(f"{TOP}/x", b"")]
    arch = write_archive(tmp_path / "a.tar.gz", entries)
    with pytest.raises(CorruptArchiveError):
        run(
            arch,
            listing_of([dir_entry(TOP), dir_entry(f"{TOP}/x"), Entry(f"{TOP}/y", b"")]),
            layout_for(tmp_path),
            sel(None),
        )


def test_listed_member_missing_from_archive(tmp_path: Path) -> None:
    entries = sample_entries(subjects=1)
    arch = write_archive(tmp_path / "a.tar.gz", entries)
    layout = layout_for(tmp_path)
    with pytest.raises(CorruptArchiveError, match="ended before"):
        run(arch, listing_of([*entries, Entry(f"{TOP}/zzz.tsv", b"y")]), layout, sel(None))
    raw = json.loads(layout.receipt(arch.name).read_text())
    assert raw["complete"] is False


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_archive(tmp_path: Path, damage: str) -> None:
    entries = sample_entries(subjects=3, image_size=20_000)
    arch, listing = make(tmp_path, entries)
    data = bytearray(arch.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x55
    else:
        data = data[:100] + bytearray(os.urandom(len(data) - 100))
    arch.write_bytes(bytes(data))
    layout = layout_for(tmp_path)
    with pytest.raises(CorruptArchiveError):
        run(arch, listing, layout, sel(None))
    # only complete files under final names
    want = files_of(entries)
    for p, content in tree_files(layout.tree).items():
        assert want[p] == content
    assert not list(layout.tree.rglob("*" + X.TMP_SUFFIX))


# ------------------------------------------------------------------ delete, lock, cancel


def test_delete_archive_after_complete_receipt(tmp_path: Path) -> None:
    entries = sample_entries(subjects=1)
    layout = layout_for(tmp_path)
    layout.ensure()
    arch = write_archive(layout.archive("a.tar.gz"), entries)
    write_verified(layout, "a.tar.gz", SHA)
    assert is_verified(layout, "a.tar.gz", SHA)
    run(arch, listing_of(entries), layout, sel(None), delete_archive=True)
    assert not arch.exists() and not layout.verified_stamp("a.tar.gz").exists()
    assert X.receipt_covers(layout, "a.tar.gz", sel("CT"))


def test_locked_by_another_extraction(tmp_path: Path) -> None:
    entries = sample_entries(subjects=1)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    lock = FileLock(layout.lock(arch.name + ".extract"))
    lock.path.parent.mkdir(parents=True)
    lock.path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": time.time()}))
    with pytest.raises(LockedError):
        run(arch, listing, layout, sel(None))
    lock.path.unlink()
    run(arch, listing, layout, sel(None))
    assert not lock.path.exists()


def test_cancel_stops_and_keeps_a_resumable_receipt(tmp_path: Path) -> None:
    entries = sample_entries(subjects=6, image_size=100_000, ct_size=200_000)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    cancel = threading.Event()
    seen = []

    def reporter(e: object) -> None:
        seen.append(e)
        if len(seen) == 3:
            cancel.set()

    with pytest.raises(Interrupted):
        run(arch, listing, layout, sel(None), reporter=reporter, cancel=cancel)
    raw = json.loads(layout.receipt(arch.name).read_text())
    assert raw["complete"] is False
    assert not list(layout.tree.rglob("*" + X.TMP_SUFFIX))
    r = run(arch, listing, layout, sel(None))
    assert r.complete and tree_files(layout.tree) == files_of(entries)
    assert r.skipped == len(raw["members"])


# ------------------------------------------------------------------ many archives


def test_extract_many_keeps_going(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    jobs = []
    all_files: dict[str, bytes] = {}
    for i in range(3):
        entries = sample_entries(subjects=2, seed=i, top=f"top{i}")
        arch, listing = make(tmp_path, entries, name=f"a{i}.tar.gz")
        if i == 1:
            data = arch.read_bytes()
            arch.write_bytes(data[: len(data) // 2])
        else:
            all_files.update(files_of(entries))
        jobs.append(X.ExtractJob(arch.name, arch, listing, SHA))
    events = Collector()
    results = X.extract_many(jobs, 2, layout, selector=sel(None), reporter=events)
    assert [r.name for r in results] == ["a0.tar.gz", "a1.tar.gz", "a2.tar.gz"]
    assert results[0].ok and results[2].ok and not results[1].ok
    assert isinstance(results[1].error, CorruptArchiveError)
    assert worst([r.exit_code for r in results]) == ExitCode.UNSAFE
    got = tree_files(layout.tree)
    for p, d in all_files.items():
        assert got[p] == d
    assert [e.name for e in events.of("fail")] == ["a1.tar.gz"]


# ------------------------------------------------------------------ kill safety

KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bimcv_fetch import extract as X
from bimcv_fetch.manifest import parse_listing
from bimcv_fetch.mids import Selector
from bimcv_fetch.store import Layout
X.RECEIPT_INTERVAL = 0.02
arch, listing_path, dest, tree = map(Path, sys.argv[2:6])
listing = parse_listing(listing_path.read_text())
def slow(event):
    if event.kind == "advance":
        time.sleep(0.003)
X.extract_archive(arch, listing, Layout(dest, tree), name=arch.name, archive_sha1="a" * 40,
                  selector=Selector(), reporter=slow)
"""


def _big_entries() -> list[Entry]:
    rng = random.Random(7)
    out = [dir_entry(TOP)]
    for i in range(60):
        base = f"{TOP}/sub-S{i:05d}/ses-E1/mod-rx"
        out.append(
            Entry(f"{base}/sub-S{i:05d}_ses-E1_run-1_bp-chest_vp-pa_dx.png", rng.randbytes(500_000))
        )
        out.append(Entry(f"{base}/sub-S{i:05d}_ses-E1_run-1_bp-chest_vp-pa_dx.json", b"{}"))
    return out  # about 30 MB


def test_kill_during_extract_then_rerun(tmp_path: Path) -> None:
    entries = _big_entries()
    arch, listing = make(tmp_path, entries)
    listing_path = tmp_path / "listing.txt"
    from .archives import listing_text

    listing_path.write_text(listing_text(entries))
    layout = layout_for(tmp_path)
    src = str(Path(X.__file__).resolve().parents[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            src,
            str(arch),
            str(listing_path),
            str(layout.dest),
            str(layout.tree),
        ],
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            raw = None
            with contextlib.suppress(OSError, ValueError):
                raw = json.loads(layout.receipt(arch.name).read_text())
            if raw and len(raw["members"]) >= 10:
                break
            assert proc.poll() is None, "the extraction finished before it could be killed"
            time.sleep(0.005)
        else:
            pytest.fail("no receipt appeared")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    raw = json.loads(layout.receipt(arch.name).read_text())
    assert raw["complete"] is False
    want = files_of(entries)
    partial = tree_files(layout.tree)
    for p, content in partial.items():  # complete files only under final names
        if p.endswith(X.TMP_SUFFIX):
            continue
        assert want[p] == content
    assert len(partial) < len(want)
    r = run(arch, listing, layout, sel(None))
    assert r.complete and r.skipped >= 10
    assert tree_files(layout.tree) == want
    clean = Layout(tmp_path / "clean-dest", tmp_path / "clean-tree")
    run(arch, listing, clean, sel(None))
    assert tree_files(clean.tree) == tree_files(layout.tree)
    rr = json.loads(layout.receipt(arch.name).read_text())
    rc = json.loads(clean.receipt(arch.name).read_text())
    assert rr["members"] == rc["members"]


# ------------------------------------------------------------------ streaming


def _feed(sx: X.StreamingExtractor, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    i = 0
    while i < len(data):
        n = rng.choice([1, 3, 511, 512, 513, 4096, 65536, 200_000])
        sx.feed(memoryview(data)[i : i + n])
        i += n


@pytest.mark.parametrize("subset", ["all", "CT"])
def test_streaming_matches_extract_archive(tmp_path: Path, subset: str) -> None:
    entries = sample_entries(subjects=5, image_size=30_000)
    arch, listing = make(tmp_path, entries)
    ref = Layout(tmp_path / "ref", tmp_path / "ref-tree")
    run(arch, listing, ref, sel(subset))
    layout = layout_for(tmp_path)
    sx = X.StreamingExtractor(
        layout, arch.name, listing, archive_sha1=SHA, selector=sel(subset), queue_bytes=100_000
    )
    _feed(sx, arch.read_bytes(), 1)
    sx.finish()
    raw = json.loads(layout.receipt(arch.name).read_text())
    assert raw["complete"] is False
    assert all(m.get("unverified") for m in raw["members"].values())
    receipt = sx.commit(SHA)
    assert receipt.complete
    assert tree_files(layout.tree) == tree_files(ref.tree) == expected(entries, sel(subset))
    a = json.loads(layout.receipt(arch.name).read_text())
    b = json.loads(ref.receipt(arch.name).read_text())
    assert a["members"] == b["members"] and a["subset"] == b["subset"]
    assert X.receipt_covers(layout, arch.name, sel(subset), listing=listing)
    assert not layout.lock(arch.name + ".extract").exists()


def test_streaming_discard_removes_its_files(tmp_path: Path) -> None:
    entries = sample_entries(subjects=3)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    sx = X.StreamingExtractor(layout, arch.name, listing, archive_sha1=SHA, selector=sel(None))
    _feed(sx, arch.read_bytes(), 2)
    sx.finish()
    assert tree_files(layout.tree)
    sx.discard()
    assert tree_files(layout.tree) == {}
    assert not layout.receipt(arch.name).exists()
    assert not layout.lock(arch.name + ".extract").exists()


def test_streaming_discard_keeps_verified_files(tmp_path: Path) -> None:
    entries = sample_entries(subjects=3)
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    run(arch, listing, layout, sel("CT"))
    ct = tree_files(layout.tree)
    sx = X.StreamingExtractor(layout, arch.name, listing, archive_sha1=SHA, selector=sel(None))
    _feed(sx, arch.read_bytes(), 3)
    sx.finish()
    sx.discard()
    assert tree_files(layout.tree) == ct


def test_streaming_reset_midway(tmp_path: Path) -> None:
    entries = sample_entries(subjects=4, image_size=20_000)
    arch, listing = make(tmp_path, entries)
    data = arch.read_bytes()
    layout = layout_for(tmp_path)
    sx = X.StreamingExtractor(layout, arch.name, listing, archive_sha1=SHA, selector=sel(None))
    _feed(sx, data[: len(data) // 2], 4)
    sx.reset()
    _feed(sx, data, 5)
    sx.finish()
    r = sx.commit(SHA)
    assert tree_files(layout.tree) == files_of(entries)
    assert r.complete and not any(m.unverified for m in r.members.values())


def test_streaming_resume_after_abort(tmp_path: Path) -> None:
    """A transfer that gives up and resumes later refeeds the prefix: finished files stay."""
    entries = sample_entries(subjects=4, image_size=20_000)
    arch, listing = make(tmp_path, entries)
    data = arch.read_bytes()
    layout = layout_for(tmp_path)
    sx = X.StreamingExtractor(layout, arch.name, listing, archive_sha1=SHA, selector=sel(None))
    _feed(sx, data[: len(data) * 2 // 3], 6)
    sx.abort()
    first = json.loads(layout.receipt(arch.name).read_text())["members"]
    assert first
    inodes = {p: os.stat(layout.tree / p).st_ino for p in first}
    sx2 = X.StreamingExtractor(layout, arch.name, listing, archive_sha1=SHA, selector=sel(None))
    _feed(sx2, data, 7)
    sx2.finish()
    r = sx2.commit(SHA)
    assert tree_files(layout.tree) == files_of(entries)
    assert r.skipped >= len(first) - 1
    same = sum(os.stat(layout.tree / p).st_ino == ino for p, ino in inodes.items())
    assert same >= len(first) - 1


def test_streaming_early_stop_ignores_the_rest(tmp_path: Path) -> None:
    entries = _early_stop_entries()
    arch, listing = make(tmp_path, entries)
    data = arch.read_bytes()
    cut = len(data) * 6 // 10
    data = data[:cut] + os.urandom(len(data) - cut)
    layout = layout_for(tmp_path)
    sx = X.StreamingExtractor(layout, arch.name, listing, archive_sha1=SHA, selector=sel("CT"))
    _feed(sx, data, 8)
    sx.finish()
    sx.commit(SHA)
    assert set(tree_files(layout.tree)) == set(expected(entries, sel("CT")))


def test_streaming_corrupt_and_unsafe_raise_on_commit(tmp_path: Path) -> None:
    entries = sample_entries(subjects=2)
    arch, listing = make(tmp_path, entries)
    data = arch.read_bytes()
    layout = layout_for(tmp_path)
    sx = X.StreamingExtractor(layout, arch.name, listing, archive_sha1=SHA, selector=sel(None))
    _feed(sx, data[: len(data) // 2], 9)  # truncated
    sx.finish()
    with pytest.raises(CorruptArchiveError):
        sx.commit(SHA)
    assert not layout.lock(arch.name + ".extract").exists()

    evil = [*GOOD, Entry("../escape.txt", b"x"), Entry(f"{TOP}/after.tsv", b"y")]
    earch = write_archive(tmp_path / "evil.tar.gz", evil)
    (tmp_path / "outside").mkdir()
    before = snapshot(tmp_path / "outside")
    sx = X.StreamingExtractor(
        layout, earch.name, listing_of([*GOOD, evil[-1]]), archive_sha1=SHA, selector=sel(None)
    )
    _feed(sx, earch.read_bytes(), 10)
    sx.finish()
    with pytest.raises(UnsafeArchiveError):
        sx.commit(SHA)
    assert snapshot(tmp_path / "outside") == before
    assert not (tmp_path / "escape.txt").exists()


def test_streaming_nothing_wanted(tmp_path: Path) -> None:
    entries = [dir_entry(TOP), Entry(f"{TOP}/s/x_run-1_bp-chest_vp-pa_dx.png", b"1")]
    arch, listing = make(tmp_path, entries)
    layout = layout_for(tmp_path)
    sx = X.StreamingExtractor(layout, arch.name, listing, archive_sha1=SHA, selector=sel("CT"))
    assert not sx.wanted
    sx.feed(arch.read_bytes())
    sx.finish()
    assert sx.commit(SHA).complete
    assert X.receipt_covers(layout, arch.name, sel("CT"))


def test_download_hook(tmp_path: Path) -> None:
    from .archives import listing_text

    entries = sample_entries(subjects=2)
    layout = layout_for(tmp_path)
    layout.ensure()
    arch = write_archive(layout.archive("a.tar.gz"), entries)
    layout.manifest("a.tar.gz.tar-tvf.txt").write_text(listing_text(entries))
    factory = X.extract_hook_factory(layout, None, sel("CT"), delete_archives=True)
    hook = factory("a.tar.gz", SHA)
    _feed(hook.consumer, arch.read_bytes(), 11)
    hook.consumer.finish()
    assert hook.commit(SHA) == len(expected(entries, sel("CT")))
    assert not arch.exists()
    assert tree_files(layout.tree) == expected(entries, sel("CT"))
    # extract_local from a file on disk
    arch = write_archive(layout.archive("a.tar.gz"), entries)
    hook = X.extract_hook_factory(layout, None, sel(None))("a.tar.gz", SHA)
    assert hook.extract_local() == len(files_of(entries)) - len(expected(entries, sel("CT")))
    assert arch.exists()
    with pytest.raises(Exception, match="no tar -tvf listing"):
        factory("other.tar.gz", SHA)


def _wait_members(sx: X.StreamingExtractor, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(sx.receipt.members) < n:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def _two_versions() -> tuple[list[Entry], list[Entry]]:
    a = sample_entries(subjects=3, seed=1)
    b = [Entry(e.name, e.data[::-1]) if e.kind == "file" and len(e.data) > 1 else e for e in a]
    return a, b


def test_streaming_reset_to_a_different_file_reports_stale(tmp_path: Path) -> None:
    a, b = _two_versions()
    layout = layout_for(tmp_path)
    arch_a, listing = make(tmp_path, a, "x.tar.gz")
    arch_b = write_archive(tmp_path / "other.tar.gz", b)
    sx = X.StreamingExtractor(layout, "x.tar.gz", listing, archive_sha1=SHA, selector=sel(None))
    _feed(sx, arch_b.read_bytes(), 12)  # the server first sent something else...
    _wait_members(sx, len(files_of(b)))
    sx.reset()
    _feed(sx, arch_a.read_bytes(), 13)  # ...then the real file
    sx.finish()
    with pytest.raises(X.StaleFilesError, match="run the extraction again"):
        sx.commit(SHA)
    r = run(arch_a, listing, layout, sel(None))  # from the verified archive
    assert r.complete and tree_files(layout.tree) == files_of(a)


def test_download_hook_recovers_from_stale_files(tmp_path: Path) -> None:
    from .archives import listing_text

    a, b = _two_versions()
    layout = layout_for(tmp_path)
    layout.ensure()
    arch_a = write_archive(layout.archive("x.tar.gz"), a)
    arch_b = write_archive(tmp_path / "other.tar.gz", b)
    layout.manifest("x.tar.gz.tar-tvf.txt").write_text(listing_text(a))
    hook = X.extract_hook_factory(layout, None, sel(None))("x.tar.gz", SHA)
    _feed(hook.consumer, arch_b.read_bytes(), 14)
    _wait_members(hook.consumer, len(files_of(b)))
    hook.consumer.reset()
    _feed(hook.consumer, arch_a.read_bytes(), 15)
    hook.consumer.finish()
    hook.commit(SHA)
    assert tree_files(layout.tree) == files_of(a)
    assert X.receipt_covers(layout, "x.tar.gz", sel(None), listing=listing_of(a))


def test_temp_names_tell_live_writers_from_stale_ones(tmp_path: Path) -> None:
    """Parallel archives share folders: a finishing one must not remove another's temp file."""
    import subprocess

    from bimcv_fetch.extract import is_stale_temp, temp_path

    mine = temp_path(tmp_path / "participants.tsv").name
    assert mine.startswith(".participants.tsv.") and mine.endswith(".bimcv-tmp")
    assert not is_stale_temp(mine)  # this process: another thread may be writing it
    dead = subprocess.Popen(["true"])
    dead.wait()
    host_tag = mine.split(".")[-2].rpartition("-")[0]
    assert is_stale_temp(f".participants.tsv.{host_tag}-{dead.pid}.bimcv-tmp")
    assert not is_stale_temp(".participants.tsv.otherhost-1.bimcv-tmp")
    assert is_stale_temp(".participants.tsv.bimcv-tmp")  # the old form: nobody owns it
    assert not is_stale_temp("participants.tsv")
