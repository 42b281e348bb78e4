"""The sample releases the benches download, built once and cached.

:func:`bimcv_fetch.server.build_sample` makes a release of ``archives`` subject
archives (plus the release's three small metadata archives) whose image
payloads are seeded random bytes: incompressible, like the real PNG and
NIfTI-gz images. ``size_scale`` multiplies every image size; the bytes of the
archives are an affine function of it (tar headers, JSON sidecars and TSV
tables do not scale), so two tiny probe builds give the relation and the scale
for the wanted total is solved from it (the result is within a fraction of a
percent; the real total is recorded).

The sample is cached under ``benchmarks/cache/<key>/`` (git-ignored) with a
``bench-sample.json`` marker written last; a folder without the marker is an
interrupted build and is built again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bimcv_fetch.server import build_sample

MARKER = "bench-sample.json"
PROBE_SCALES = (4.0, 8.0)


@dataclass
class SampleInfo:
    root: str
    release: str
    token: str
    top_folder: str
    seed: int
    subjects_per_archive: int
    size_scale: float
    archives: list[str]  # every archive, subject shards first
    subject_archives: list[str]
    metadata_archives: list[str]
    ct_archives: list[str]  # subject archives that hold at least one CT image
    sha1: dict[str, str]  # archive → SHA1
    sizes: dict[str, int]  # archive → bytes
    files: dict[str, int]  # archive → regular files inside
    unpacked: dict[str, int]  # archive → bytes of its regular files
    ct_bytes: dict[str, int]  # archive → bytes of CT images inside
    checksum_file: str  # the sha1sums file covering the archives
    build_seconds: float

    @property
    def path(self) -> Path:
        return Path(self.root)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes[a] for a in self.archives)

    def bytes_of(self, names: list[str]) -> int:
        return sum(self.sizes[a] for a in names)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["total_files"] = sum(self.files.values())
        return d


def _isal() -> bool:
    try:
        import isal  # noqa: F401
    except ImportError:
        return False
    return True


def _total(release: Any) -> int:
    return sum(release.sizes[a] for a in release.archives)


def _info(rel: Any, seed: int, spa: int, scale: float, seconds: float) -> SampleInfo:
    ct_archives, files, unpacked, ct_bytes = [], {}, {}, {}
    for a in rel.archives:
        members = [m for m in rel.members[a] if not m.is_dir]
        files[a] = len(members)
        unpacked[a] = sum(m.size for m in members)
        ct = [m for m in members if m.name.endswith("_ct.nii.gz")]
        ct_bytes[a] = sum(m.size for m in ct)
        if ct and a in rel.subject_archives:
            ct_archives.append(a)
    return SampleInfo(
        root=str(rel.root),
        release=rel.release_id,
        token=rel.token,
        top_folder=rel.release.top_folder,
        seed=seed,
        subjects_per_archive=spa,
        size_scale=scale,
        archives=list(rel.archives),
        subject_archives=list(rel.subject_archives),
        metadata_archives=list(rel.metadata_archives),
        ct_archives=ct_archives,
        sha1={a: rel.sha1[a] for a in rel.archives},
        sizes={a: rel.sizes[a] for a in rel.archives},
        files=files,
        unpacked=unpacked,
        ct_bytes=ct_bytes,
        checksum_file=rel.checksum_files[0],
        build_seconds=round(seconds, 2),
    )


def scale_for(
    target_bytes: int, *, archives: int, spa: int, seed: int, scratch: Path
) -> tuple[float, dict[str, float]]:
    """The ``size_scale`` whose archives total ``target_bytes`` (two probe builds, a line)."""
    totals = []
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for i, s in enumerate(PROBE_SCALES):
            rel = build_sample(
                Path(tmp) / f"p{i}",
                archives=archives,
                subjects_per_archive=spa,
                seed=seed,
                size_scale=s,
                fast=_isal(),
            )
            totals.append(_total(rel))
    (s1, s2), (b1, b2) = PROBE_SCALES, totals
    slope = (b2 - b1) / (s2 - s1)
    fixed = b1 - slope * s1
    scale = max(0.01, (target_bytes - fixed) / slope)
    return scale, {"bytes_per_unit_scale": slope, "fixed_bytes": fixed}


def builder_id() -> str:
    """A short hash of the sample builder's source: a changed builder means a new sample."""
    import hashlib

    import bimcv_fetch.server.sample as mod

    try:
        data = Path(mod.__file__).read_bytes()
    except OSError:
        return "unknown"
    return hashlib.sha1(data).hexdigest()[:12] + ("-isal" if _isal() else "")


def ensure_sample(
    cache: Path,
    target_bytes: int,
    *,
    archives: int,
    spa: int,
    seed: int = 0,
    echo: Any = print,
) -> SampleInfo:
    """The cached sample of about ``target_bytes`` (all archives), built if missing."""
    key = f"posi-1-2-a{archives}-spa{spa}-seed{seed}-{target_bytes}"
    folder = cache / key
    marker = folder / MARKER
    if marker.is_file():
        raw = json.loads(marker.read_text())
        if raw.pop("builder", None) == builder_id():
            info = SampleInfo(**raw)
            if all((folder / a).is_file() for a in info.archives):
                info.root = str(folder)
                return info
    if folder.exists():
        shutil.rmtree(folder)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    scale, fit = scale_for(target_bytes, archives=archives, spa=spa, seed=seed, scratch=cache)
    echo(
        f"building sample {key}: size_scale {scale:.2f} "
        f"({fit['bytes_per_unit_scale'] / 1e3:.1f} kB per unit of scale"
        f" + {fit['fixed_bytes'] / 1e3:.1f} kB fixed)"
    )
    rel = build_sample(
        folder,
        archives=archives,
        subjects_per_archive=spa,
        seed=seed,
        size_scale=scale,
        fast=_isal(),
    )
    info = _info(rel, seed, spa, scale, time.monotonic() - t0)
    echo(
        f"  built {info.total_bytes / 2**20:.1f} MiB in {info.build_seconds:.1f} s "
        f"(asked {target_bytes / 2**20:.1f} MiB)"
    )
    marker.write_text(json.dumps({**asdict(info), "builder": builder_id()}, indent=1) + "\n")
    return info


def balanced_seed(
    *, archives: int, spa: int, want: int, scratch: Path, tries: int = 40, good: float = 0.97
) -> tuple[int, list[str], float]:
    """A seed whose ``want`` largest CT-holding shards are nearly equal in size.

    Used by the parallel-scaling row: with a per-connection rate cap, N archives
    fetched N at a time finish when the largest one does, so the best possible
    throughput ratio is ``sum / max`` of their sizes; this picks a sample where
    that is close to N (``sum / (N·max) ≥ good``), so the row measures the
    scheduler, not the sample. Returns the seed, the chosen archives and
    ``sum / max``.
    """
    best: tuple[float, int, list[str]] = (0.0, 0, [])
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for seed in range(tries):
            rel = build_sample(
                Path(tmp) / f"s{seed}",
                archives=archives,
                subjects_per_archive=spa,
                seed=seed,
                size_scale=1.0,
            )
            info = _info(rel, seed, spa, 1.0, 0.0)
            shards = sorted(info.ct_archives, key=lambda a: info.sizes[a], reverse=True)
            if len(shards) < want:
                continue
            # the `want` consecutive (by size) shards with the smallest spread
            for i in range(len(shards) - want + 1):
                pick = shards[i : i + want]
                sizes = [info.sizes[a] for a in pick]
                ideal = sum(sizes) / max(sizes)
                if ideal > best[0]:
                    best = (ideal, seed, sorted(pick))
            if best[0] >= good * want:
                break
    ideal, seed, pick = best
    return seed, pick, ideal
