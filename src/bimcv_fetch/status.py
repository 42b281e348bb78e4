"""What is where, from disk alone: per archive and in total."""

from __future__ import annotations

from dataclasses import dataclass

from bimcv_fetch.index import ReleaseIndex
from bimcv_fetch.manifest import is_archive_name
from bimcv_fetch.mids import subset_label
from bimcv_fetch.receipts import load_receipt
from bimcv_fetch.store import PART_SUFFIX, Layout, local_state


@dataclass(frozen=True)
class StatusRow:
    name: str
    state: str  # missing, partial, downloaded, verified, extracted
    size: int | None  # published size, when known
    on_disk: int  # bytes of the archive or its .part
    subset: str | None  # what extraction covered, from the receipt
    archive_present: bool

    @property
    def percent(self) -> float | None:
        if self.state != "partial" or not self.size:
            return None
        return 100.0 * self.on_disk / self.size

    def as_json(self) -> dict[str, object]:
        return {
            "archive": self.name,
            "state": self.state,
            "size": self.size,
            "on_disk": self.on_disk,
            "percent": None if self.percent is None else round(self.percent, 1),
            "extracted_subset": self.subset,
            "archive_present": self.archive_present,
        }


def _receipt_subset(layout: Layout, name: str) -> str | None:
    r = load_receipt(layout, name)
    if r is None:
        return None
    label = subset_label(r.subsets)
    return label if r.complete else f"{label} (incomplete)"


def archive_status(layout: Layout, index: ReleaseIndex | None) -> list[StatusRow]:
    """Rows for every archive the cached index knows, plus any other found on disk."""
    names: set[str] = set(index.archives) if index is not None else set()
    if layout.archives.is_dir():
        for p in layout.archives.iterdir():
            n = p.name[: -len(PART_SUFFIX)] if p.name.endswith(PART_SUFFIX) else p.name
            if is_archive_name(n):
                names.add(n)
    rows: list[StatusRow] = []
    for name in sorted(names):
        sha1 = index.sha1(name) if index is not None else None
        size = index.size(name) if index is not None else None
        state = local_state(layout, name, sha1)
        on_disk = 0
        for p in (layout.archive(name), layout.part(name)):
            if p.exists():
                on_disk = p.stat().st_size
                break
        rows.append(
            StatusRow(
                name,
                state,
                size,
                on_disk,
                _receipt_subset(layout, name),
                layout.archive(name).exists(),
            )
        )
    return rows
