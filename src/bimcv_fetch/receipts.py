"""Extraction receipts: what was extracted from an archive, and what that covers.

A receipt (``.bimcv-fetch/receipts/NAME.json``) records what was written::

    {"version": 1, "archive": NAME, "sha1": ARCHIVE_SHA1, "tree": "/dest",
     "complete": true,
     "subset": "all" | "CT" | "CR,DX",    # modalities covered (union)
     "subsets": "all" | ["CR", "DX"],
     "subjects": null | ["S03044", ...],  # null: every subject
     "selections": [{"subset": ..., "subjects": ..., "iterations": ...}],
     "members": {"covid19_posi/...png": {"size": 123, "hash": "crc32:0a1b2c3d",
                                         "mtime": 1600691640}}}

The extraction (:mod:`bimcv_fetch.extract`) rewrites it every few seconds while
extracting (``complete: false``) and a last time with ``complete: true``.
Entries are only added after their file was renamed into place, so a rerun can
skip them (when the file on disk still has the recorded size and mtime) - it
still streams through their bytes. Entries written from bytes whose archive
SHA1 is not checked yet (``download --extract``) carry ``"unverified": true``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bimcv_fetch.manifest import Kind, Listing
from bimcv_fetch.members import plan_members
from bimcv_fetch.mids import MODALITIES, Selector, subset_label
from bimcv_fetch.store import Layout, atomic_write_json, read_json

RECEIPT_VERSION = 1


@dataclass
class MemberRecord:
    size: int
    hash: str
    mtime: int
    unverified: bool = False  # written from bytes whose archive SHA1 is not checked yet

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"size": self.size, "hash": self.hash, "mtime": self.mtime}
        if self.unverified:
            d["unverified"] = True
        return d

    @classmethod
    def from_json(cls, raw: Any) -> MemberRecord:
        return cls(
            int(raw["size"]), str(raw["hash"]), int(raw["mtime"]), bool(raw.get("unverified"))
        )


def _fs(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


@dataclass(frozen=True)
class Selection:
    """What part of an archive an extraction covered (None: no restriction)."""

    subset: frozenset[str] | None = None
    subjects: frozenset[str] | None = None
    iterations: frozenset[int] | None = None

    @classmethod
    def of(cls, selector: Selector) -> Selection:
        subset = selector.subset
        if subset is not None and set(MODALITIES) <= subset:
            subset = None
        iterations: frozenset[int] | None = None
        if (
            selector.release is not None
            and selector.iterations is not None
            and set(selector.release.iterations) != set(selector.iterations)
        ):
            iterations = frozenset(selector.iterations)
        return cls(subset, selector.subjects, iterations)

    def covers(self, other: Selection) -> bool:
        def sub(mine: frozenset[Any] | None, theirs: frozenset[Any] | None) -> bool:
            return mine is None or (theirs is not None and theirs <= mine)

        return (
            sub(self.subset, other.subset)
            and sub(self.subjects, other.subjects)
            and sub(self.iterations, other.iterations)
        )

    def merged(self, other: Selection) -> Selection | None:
        """One selection equal to the union of both, when there is one."""
        if self.covers(other):
            return self
        if other.covers(self):
            return other
        if self.subjects == other.subjects and self.iterations == other.iterations:
            assert self.subset is not None and other.subset is not None
            union = self.subset | other.subset
            return Selection(
                None if set(MODALITIES) <= union else union, self.subjects, self.iterations
            )
        if self.subset == other.subset and self.iterations == other.iterations:
            assert self.subjects is not None and other.subjects is not None
            return Selection(self.subset, self.subjects | other.subjects, self.iterations)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "subset": None if self.subset is None else sorted(self.subset),
            "subjects": None if self.subjects is None else sorted(self.subjects),
            "iterations": None if self.iterations is None else sorted(self.iterations),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Selection:
        its = raw.get("iterations")
        return cls(
            _fs(raw.get("subset")),
            _fs(raw.get("subjects")),
            None if its is None else frozenset(int(i) for i in its),
        )


def add_selection(selections: list[Selection], new: Selection) -> list[Selection]:
    """The union of ``selections`` and ``new``, merged where a single selection says it."""
    pending = [new]
    out = list(selections)
    while pending:
        cur = pending.pop()
        for i, old in enumerate(out):
            m = old.merged(cur)
            if m is not None:
                del out[i]
                pending.append(m)
                break
        else:
            out.append(cur)
    return out


@dataclass
class Receipt:
    """What extraction wrote from one archive (see the module docstring for the JSON)."""

    archive: str
    sha1: str
    tree: str
    members: dict[str, MemberRecord] = field(default_factory=dict)
    selections: list[Selection] = field(default_factory=list)
    complete: bool = False
    # statistics of the last run (not saved)
    written: int = 0
    skipped: int = 0
    bytes_written: int = 0

    @property
    def subsets(self) -> frozenset[str] | None:
        """Union of the modalities covered (None: all)."""
        if not self.selections:
            return frozenset()
        out: set[str] = set()
        for s in self.selections:
            if s.subset is None:
                return None
            out |= s.subset
        return None if set(MODALITIES) <= out else frozenset(out)

    @property
    def subjects(self) -> frozenset[str] | None:
        out: set[str] = set()
        for s in self.selections:
            if s.subjects is None:
                return None
            out |= s.subjects
        return frozenset(out) if self.selections else frozenset()

    def covers(self, selector: Selector) -> bool:
        want = Selection.of(selector)
        return any(s.covers(want) for s in self.selections)

    def to_json(self) -> dict[str, Any]:
        subsets = self.subsets
        subjects = self.subjects
        return {
            "version": RECEIPT_VERSION,
            "archive": self.archive,
            "sha1": self.sha1,
            "tree": self.tree,
            "complete": self.complete,
            "subset": subset_label(subsets) if subsets is None or subsets else "",
            "subsets": "all" if subsets is None else [m for m in MODALITIES if m in subsets],
            "subjects": None if subjects is None else sorted(subjects),
            "selections": [s.to_json() for s in self.selections],
            "members": {p: r.to_json() for p, r in sorted(self.members.items())},
        }

    @classmethod
    def from_json(cls, raw: Any) -> Receipt | None:
        """A receipt from its JSON, or None when it is not one we can trust."""
        if not isinstance(raw, dict) or raw.get("version") != RECEIPT_VERSION:
            return None
        try:
            return cls(
                archive=str(raw["archive"]),
                sha1=str(raw["sha1"]),
                tree=str(raw["tree"]),
                members={str(p): MemberRecord.from_json(r) for p, r in raw["members"].items()},
                selections=[Selection.from_json(s) for s in raw.get("selections") or []],
                complete=bool(raw.get("complete")),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def save(self, layout: Layout) -> None:
        atomic_write_json(layout.receipt(self.archive), self.to_json())


def load_receipt(layout: Layout, name: str) -> Receipt | None:
    """The receipt of archive ``name``, or None when missing or unreadable."""
    return Receipt.from_json(read_json(layout.receipt(name)))


def receipt_covers(
    layout: Layout,
    name: str,
    selector: Selector,
    *,
    listing: Listing | None = None,
    sha1: str | None = None,
) -> bool:
    """True when a complete receipt shows ``selector``'s members of ``name`` were extracted.

    With ``listing`` the answer is exact (every wanted file has a verified
    entry); without it, one recorded selection must include ``selector``'s.
    ``sha1`` (the published archive SHA1), when given, must match the receipt's.
    Files on disk are not checked (``verify --tree`` does that).
    """
    r = load_receipt(layout, name)
    if r is None or not r.complete or r.tree != tree_id(layout):
        return False
    if sha1 is not None and r.sha1 != sha1:
        return False
    if listing is None:
        return r.covers(selector)
    for m in plan_members(listing, selector):
        if m.kind is Kind.FILE:
            rec = r.members.get(m.path)
            if rec is None or rec.unverified:
                return False
    return True


def tree_id(layout: Layout) -> str:
    """How receipts name the tree they describe: its absolute path."""
    return os.path.abspath(layout.tree)
