"""What several end-to-end test files need: the expected tree, the actual tree, a growing .part."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

from bimcv_fetch.manifest import parse_listing
from bimcv_fetch.mids import Role, Selector, parse_path, parse_subset
from bimcv_fetch.server import SampleRelease

TOP = "covid19_posi"


def expected_files(
    sample: SampleRelease, subset: str | None, *, fetched_only: bool = False
) -> dict[str, str]:
    """Member path → SHA1 of every regular file the subset wants, from the listings.

    ``fetched_only``: only from the archives ``download --subset`` fetches (a
    subject archive without an image of the subset is not downloaded at all).
    """
    rel = sample.release
    selector = Selector(subset=parse_subset(subset), release=rel, iterations=rel.iterations)
    out: dict[str, str] = {}
    for archive in sample.archives:
        listing = parse_listing((sample.root / sample.listings[archive]).read_text())
        images = [m.path for m in listing.files if parse_path(m.path).role is Role.IMAGE]
        subject_archive = archive in sample.subject_archives
        if fetched_only and subject_archive and not any(map(selector.wants, images)):
            continue
        content = {m.path: m.sha1 for m in sample.members[archive] if not m.is_dir}
        for m in listing.files:
            if selector.wants(m.path):
                sha1 = content[m.path]
                assert sha1 is not None
                out[m.path] = sha1
    return out


def tree_files(root: Path) -> dict[str, str]:
    """Relative path → SHA1 of every regular file under ``root/covid19_posi`` (no symlinks)."""
    out: dict[str, str] = {}
    base = root / TOP
    if not base.exists():
        return out
    for p in sorted(base.rglob("*")):
        assert not p.is_symlink(), p
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def wait_for_part(
    dest: Path,
    min_bytes: int,
    proc: subprocess.Popen[str],
    limit: float = 30,
    name: str | None = None,
) -> Path:
    """Wait until a ``.part`` (of ``name``, or any) holds ``min_bytes``; the process must live."""
    pattern = f"{name}.part" if name else "*.part"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for p in (dest / "archives").glob(pattern):
            if p.stat().st_size >= min_bytes:
                return p
        assert proc.poll() is None, proc.communicate(timeout=10)
        time.sleep(0.02)
    raise AssertionError("no .part grew in time")
