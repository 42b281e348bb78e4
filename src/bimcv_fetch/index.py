"""The release index: share listing + checksums + member listings, fetched once and cached.

    PROPFIND the share  →  sha1sums*.txt (the authority)  →  NAME.tar-tvf.txt per archive,
    each listing checked against its published SHA1 before it is cached.

Everything lands under ``<dest>/manifests/``; ``offline=True`` uses that cache alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # requests is imported where it is used: offline commands start faster
    import requests

from bimcv_fetch.catalog import Release, Selection
from bimcv_fetch.errors import ChecksumError, ConfigError, NetworkError
from bimcv_fetch.httputil import backoff_delay, parse_retry_after
from bimcv_fetch.manifest import (
    Checksums,
    Listing,
    is_archive_name,
    listing_names,
    merge_checksums,
    parse_listing,
    parse_sha1sums,
)
from bimcv_fetch.share import Protocol, RemoteFile, Share, check_status, list_share
from bimcv_fetch.store import Layout, atomic_write_bytes, atomic_write_json, read_json

SHARE_CACHE = "share.json"


@dataclass
class ReleaseIndex:
    """All a command needs to know about a release, without moving archive bytes."""

    selection: Selection
    remote: dict[str, RemoteFile]
    checksums: Checksums
    listings: dict[str, Listing] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def release(self) -> Release:
        return self.selection.release

    @property
    def archives(self) -> list[str]:
        """Every archive the share publishes (listing ∪ checksums), sorted, metadata last."""
        names = {n for n in self.remote if is_archive_name(n)}
        names |= {n for n in self.checksums.names() if is_archive_name(n)}
        return sorted(names, key=lambda n: (not self.release.is_subject_archive(n), n))

    def is_metadata(self, name: str) -> bool:
        return not self.release.is_subject_archive(name)

    def size(self, name: str) -> int | None:
        rf = self.remote.get(name)
        return rf.size if rf else None

    def sha1(self, name: str) -> str | None:
        return self.checksums.get(name)

    def listing(self, name: str) -> Listing | None:
        return self.listings.get(name)


def _get_small(share: Share, session: requests.Session, name: str, attempts: int = 4) -> bytes:
    """GET a small manifest file, with a short retry on 429/5xx and connection errors."""
    import requests

    proto: Protocol = "dav" if share.protocol == "dav" else "webdav"
    url = share.file_url(name, proto)
    rng = random.Random()
    last = ""
    for attempt in range(1, attempts + 1):
        wait: float | None = None
        try:
            r = session.get(url, auth=share.auth(proto), verify=share.verify, timeout=share.timeout)
        except requests.RequestException as exc:
            last = type(exc).__name__
        else:
            if r.status_code == 200:
                return r.content
            if r.status_code != 429 and r.status_code < 500:
                check_status(share, r, name)
                raise NetworkError(f"{name}: unexpected answer {r.status_code}")
            last = f"HTTP {r.status_code}"
            wait = parse_retry_after(r.headers.get("Retry-After"), time.time())
        if attempt < attempts:
            time.sleep(
                min(30.0, wait if wait is not None else backoff_delay(attempt, 1.0, 30.0, rng))
            )
    raise NetworkError(f"{name}: could not fetch it ({last})")


def _checksum_names(release: Release, remote: dict[str, RemoteFile]) -> list[str]:
    names = [n for n in release.checksum_files if n in remote]
    if not names:
        names = sorted(n for n in remote if n.startswith("sha1sum") and n.endswith(".txt"))
    return names


def _remote_to_json(remote: dict[str, RemoteFile]) -> list[dict[str, object]]:
    return [asdict(rf) for rf in remote.values()]


def _remote_from_json(raw: object) -> dict[str, RemoteFile]:
    out: dict[str, RemoteFile] = {}
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict) and "name" in item:
                with contextlib.suppress(TypeError):
                    rf = RemoteFile(**item)
                    out[rf.name] = rf
    return out


def _parse_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def load_index(
    selection: Selection,
    layout: Layout,
    *,
    share: Share | None = None,
    session: requests.Session | None = None,
    offline: bool = False,
    with_listings: bool = True,
    jobs: int = 4,
    note: Callable[[str], None] | None = None,
) -> ReleaseIndex:
    """Build the release index from the share (or, offline, from the cache alone)."""
    if not offline:
        layout.ensure()
    say = note or (lambda _text: None)
    cache_path = layout.manifest(SHARE_CACHE)
    cached = read_json(cache_path)
    cached_remote = _remote_from_json(cached.get("files") if isinstance(cached, dict) else None)
    if offline:
        if not cached_remote:
            raise ConfigError(
                f"no cached share listing in {layout.manifests}",
                hint="run `bimcv-fetch list` once, online, to fetch and cache them",
            )
        remote = cached_remote
    else:
        if share is None or session is None:
            raise ConfigError("a share and a session are needed unless offline")
        remote = {rf.name: rf for rf in list_share(share, session) if not rf.is_dir}
        atomic_write_json(
            cache_path,
            {
                "release": selection.release.id,
                "fetched": time.time(),
                "files": _remote_to_json(remote),
            },
        )

    # ---- checksums: the authority; refetched when the share's ETag changed
    parts: list[Checksums] = []
    names = _checksum_names(selection.release, remote)
    if not names:
        raise ConfigError(
            f"the share lists no checksum file ({', '.join(selection.release.checksum_files)})",
            hint="is --release right for this token?",
        )
    for name in names:
        path = layout.manifest(name)
        fresh = not path.exists()
        if not fresh and not offline:
            old = cached_remote.get(name)
            fresh = old is None or old.etag != remote[name].etag or old.size != remote[name].size
        if fresh:
            if offline:
                raise ConfigError(f"{name} is not cached in {layout.manifests}")
            assert share is not None and session is not None
            say(f"fetching {name}")
            atomic_write_bytes(path, _get_small(share, session, name))
        parts.append(parse_sha1sums(_parse_text(path.read_bytes()), name))
    checksums = merge_checksums(parts)
    index = ReleaseIndex(selection, remote, checksums)
    if with_listings:
        _load_listings(index, layout, share, session, offline, jobs, say)
    return index


def _listing_remote_name(index: ReleaseIndex, archive: str) -> str | None:
    for cand in listing_names(archive):
        if cand in index.remote or cand in index.checksums:
            return cand
    return None


def _load_listings(
    index: ReleaseIndex,
    layout: Layout,
    share: Share | None,
    session: requests.Session | None,
    offline: bool,
    jobs: int,
    say: Callable[[str], None],
) -> None:
    todo: list[tuple[str, str]] = []
    for archive in index.archives:
        lname = _listing_remote_name(index, archive)
        if lname is None:
            index.warnings.append(f"{archive}: the share has no tar -tvf listing for it")
            continue
        todo.append((archive, lname))

    def one(item: tuple[str, str]) -> tuple[str, Listing]:
        archive, lname = item
        path = layout.manifest(lname)
        expected = index.checksums.get(lname)
        data: bytes | None = None
        if path.exists():
            data = path.read_bytes()
            if expected and hashlib.sha1(data).hexdigest() != expected:
                data = None  # stale or damaged cache: fetch again
        if data is None:
            if offline:
                raise ConfigError(f"{lname} is not cached in {layout.manifests}")
            assert share is not None and session is not None
            data = _get_small(share, session, lname)
            actual = hashlib.sha1(data).hexdigest()
            if expected and actual != expected:
                raise ChecksumError(lname, expected, actual)
            atomic_write_bytes(path, data)
        return archive, parse_listing(_parse_text(data), lname)

    if todo and not offline:
        missing = sum(1 for _a, ln in todo if not layout.manifest(ln).exists())
        if missing:
            say(f"fetching {missing} listings")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for archive, listing in pool.map(one, todo):
            index.listings[archive] = listing
    for archive in index.archives:
        if index.sha1(archive) is None:
            index.warnings.append(f"{archive}: no published SHA1; it cannot be verified")
