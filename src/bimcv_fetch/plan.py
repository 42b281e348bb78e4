"""From the release index and the local state, what each archive holds and what to fetch."""

from __future__ import annotations

from dataclasses import dataclass, field

from bimcv_fetch.errors import ConfigError
from bimcv_fetch.index import ReleaseIndex
from bimcv_fetch.manifest import Listing
from bimcv_fetch.mids import MODALITIES, MidsFile, Role, Selector, parse_path
from bimcv_fetch.store import Layout, local_state


@dataclass(frozen=True)
class ArchiveInfo:
    name: str
    packed: int | None
    sha1: str | None
    metadata: bool
    members: int | None  # regular files in the listing
    images: dict[str, int] = field(default_factory=dict)
    unpacked: int | None = None
    wanted: bool = True
    wanted_files: int | None = None
    wanted_bytes: int | None = None
    state: str = "missing"

    def as_json(self) -> dict[str, object]:
        return {
            "archive": self.name,
            "packed": self.packed,
            "sha1": self.sha1,
            "metadata": self.metadata,
            "members": self.members,
            **{m.lower(): self.images.get(m, 0) for m in MODALITIES},
            "unpacked": self.unpacked,
            "wanted": self.wanted,
            "wanted_files": self.wanted_files,
            "wanted_bytes": self.wanted_bytes,
            "state": self.state,
        }


def _reason_to_fetch(f: MidsFile, selector: Selector) -> bool:
    """A member that makes its subject archive worth fetching for the selection.

    An image (or sidecar) of a wanted modality of a wanted subject; the tables
    a subject archive also holds are not reason enough to fetch gigabytes of
    unwanted images.
    """
    if f.subject is None or not selector.wants_file(f):
        return False
    return selector.subset is None or f.role is not Role.OTHER


def holds_wanted(listing: Listing | None, selector: Selector, metadata: bool) -> bool:
    """Is this archive worth fetching for the selection? Metadata archives always are."""
    if metadata or listing is None or selector.is_everything:
        return True
    return any(_reason_to_fetch(parse_path(m.path), selector) for m in listing.files)


def describe(index: ReleaseIndex, layout: Layout, selector: Selector) -> list[ArchiveInfo]:
    """Per-archive facts for ``list`` and the plan, in one pass over each listing."""
    everything = selector.is_everything
    out: list[ArchiveInfo] = []
    for name in index.archives:
        listing = index.listing(name)
        metadata = index.is_metadata(name)
        wanted = metadata or listing is None or everything
        images = dict.fromkeys(MODALITIES, 0)
        members = unpacked = wanted_files = wanted_bytes = None
        if listing is not None:
            members = unpacked = wanted_files = wanted_bytes = 0
            for m in listing.files:
                f = parse_path(m.path)
                members += 1
                unpacked += m.size
                if f.role is Role.IMAGE and f.modality:
                    images[f.modality] += 1
                if selector.wants_file(f):
                    wanted_files += 1
                    wanted_bytes += m.size
                    wanted = wanted or _reason_to_fetch(f, selector)
        sha1 = index.sha1(name)
        out.append(
            ArchiveInfo(
                name=name,
                packed=index.size(name),
                sha1=sha1,
                metadata=metadata,
                members=members,
                images=images,
                unpacked=unpacked,
                wanted=wanted,
                wanted_files=wanted_files,
                wanted_bytes=wanted_bytes,
                state=local_state(layout, name, sha1),
            )
        )
    return out


# ------------------------------------------------------------------ shards


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected K/N, e.g. 1/4") from None
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"--shard {text!r}: K must be between 1 and N")
    return k, n


def shard_of(items: list[ArchiveInfo], k: int, n: int) -> list[ArchiveInfo]:
    """A stable, size-balanced K-th of N shares: the same on every machine.

    Largest first, each to the least loaded bin (ties to the lowest bin). The
    input must be the full wanted set, before local state is looked at, so
    every machine computes the same split.
    """
    bins = [0] * n
    chosen: list[ArchiveInfo] = []
    for item in sorted(items, key=lambda a: (-(a.packed or 0), a.name)):
        b = min(range(n), key=lambda i: (bins[i], i))
        bins[b] += item.packed or 0
        if b == k - 1:
            chosen.append(item)
    return sorted(chosen, key=lambda a: (a.metadata, a.name))


def receipt_covers(layout: Layout, name: str, selector: Selector, sha1: str | None = None) -> bool:
    """Whether a complete extraction receipt (of this very archive) covers this selection."""
    from bimcv_fetch.extract import receipt_covers as covers

    return covers(layout, name, selector, sha1=sha1)
