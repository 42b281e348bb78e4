from __future__ import annotations

import os
from pathlib import Path

import pytest

from bimcv_fetch.errors import UnsafeArchiveError
from bimcv_fetch.manifest import Kind, parse_listing
from bimcv_fetch.safety import (
    SafeTree,
    check_listing,
    check_member_name,
    is_root_name,
    normalize_name,
    resolve_inside,
)

from .archives import Entry, dir_entry, listing_of


@pytest.mark.parametrize(
    "name",
    [
        "covid19_posi/sub-S1/ses-E1/mod-rx/sub-S1_ses-E1_run-1_bp-chest_ct.nii.gz",
        "covid19_posi/",
        "./covid19_posi/participants.tsv",
        "a",
        "a/b..c/..d",
        "covid19_posi/name with spaces.txt",
        "covid19_posi/ünïcode.json",
    ],
)
def test_safe_names(name: str) -> None:
    assert check_member_name(name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("//server/share", "absolute"),
        ("../escape", ".."),
        ("covid19_posi/../../escape", ".."),
        ("covid19_posi/sub/..", ".."),
        ("./../x", ".."),
        ("covid19_posi\\..\\..\\x", "backslash"),
        ("..\\x", "backslash"),
        ("C:/Windows/x", "drive"),
        ("c:x", "drive"),
        ("covid19_posi/a\x00b", "NUL"),
        ("covid19_posi/a\nb", "control"),
        (".", "destination"),
        ("./", "destination"),
        ("a//b", "component"),
        ("a/./b", "component"),
    ],
)
def test_unsafe_names(name: str, why: str) -> None:
    reason = check_member_name(name)
    assert reason is not None and why in reason


def test_normalize_and_root() -> None:
    assert normalize_name("./a/b/") == "a/b"
    assert normalize_name("././a") == "a"
    assert is_root_name("./") and is_root_name(".")
    assert not is_root_name("a") and not is_root_name("/")


def test_check_listing_flags_links_devices_and_fifos() -> None:
    entries = [
        dir_entry("covid19_posi"),
        Entry("covid19_posi/ok.tsv", b"x"),
        Entry("covid19_posi/link", kind="symlink", link="/etc"),
        Entry("covid19_posi/hard", kind="hardlink", link="covid19_posi/ok.tsv"),
        Entry("covid19_posi/fifo", kind="fifo"),
        Entry("covid19_posi/null", kind="char"),
        Entry("covid19_posi/disk", kind="block"),
        Entry("../evil", b"x"),
    ]
    bad = {m.name: reason for m, reason in check_listing(listing_of(entries))}
    assert set(bad) == {
        "covid19_posi/link",
        "covid19_posi/hard",
        "covid19_posi/fifo",
        "covid19_posi/null",
        "covid19_posi/disk",
        "../evil",
    }
    assert "symbolic link" in bad["covid19_posi/link"]
    assert "hard link" in bad["covid19_posi/hard"]
    assert "FIFO" in bad["covid19_posi/fifo"]
    assert "device" in bad["covid19_posi/null"] and "device" in bad["covid19_posi/disk"]


def test_check_listing_unknown_type_and_root_dir() -> None:
    text = (
        "drwxr-xr-x u/g 0 2020-09-21 12:34 ./\n"
        "-rw-r--r-- u/g 3 2020-09-21 12:34 ./a.txt\n"
        "?rw-r--r-- u/g 3 2020-09-21 12:34 weird\n"
    )
    listing = parse_listing(text)
    assert listing.members[2].kind is Kind.OTHER
    assert [m.name for m, _ in check_listing(listing)] == ["weird"]


def test_resolve_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "covid19_posi").mkdir(parents=True)
    assert resolve_inside(root, "covid19_posi/x.png") == root.resolve() / "covid19_posi/x.png"
    assert resolve_inside(root, "new/dir/x") == root.resolve() / "new/dir/x"
    with pytest.raises(UnsafeArchiveError):
        resolve_inside(root, "../x")
    with pytest.raises(UnsafeArchiveError):
        resolve_inside(root, "/etc/passwd")
    # a symlinked folder on disk leading out of the root
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "covid19_posi" / "sub-S1")
    with pytest.raises(UnsafeArchiveError):
        resolve_inside(root, "covid19_posi/sub-S1/x.png")
    # a symlink staying inside is resolved
    (root / "covid19_posi" / "real").mkdir()
    os.symlink(root / "covid19_posi" / "real", root / "covid19_posi" / "alias")
    assert resolve_inside(root, "covid19_posi/alias/x") == root.resolve() / "covid19_posi/real/x"
    # the last component is never followed
    os.symlink("/etc/passwd", root / "covid19_posi" / "leaf")
    assert resolve_inside(root, "covid19_posi/leaf") == root.resolve() / "covid19_posi/leaf"


def test_resolve_inside_root_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    assert resolve_inside(link, "a/b") == real.resolve() / "a/b"


def test_safe_tree_refuses_any_symlinked_parent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside").mkdir()
    os.symlink(root / "inside", root / "alias")
    tree = SafeTree(root)
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        tree.parent_for("alias/x")
    (root / "file").write_bytes(b"")
    with pytest.raises(UnsafeArchiveError, match="not a folder"):
        tree.parent_for("file/x")
    assert tree.parent_for("a/b/c.txt") == Path(os.path.realpath(root)) / "a/b"
    assert (root / "a/b").is_dir()
    assert tree.checked_dirs() == ["a", "a/b"]
    with pytest.raises(UnsafeArchiveError):
        tree.parent_for("../x")
