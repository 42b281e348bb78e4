"""Build test archives (gzip'd tar) and their ``tar -tvf`` listings in code.

Nothing binary is committed: every test builds what it needs into tmp_path.
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bimcv_fetch.manifest import Listing, parse_listing

TOP = "covid19_posi"
MTIME = 1600691640  # 2020-09-21 12:34 UTC


@dataclass(frozen=True)
class Entry:
    """One member to put in a test archive."""

    name: str
    data: bytes = b""
    kind: str = "file"  # file dir symlink hardlink fifo char block
    link: str = ""
    mtime: int = MTIME
    mode: int = 0o644


def dir_entry(name: str) -> Entry:
    return Entry(name.rstrip("/") + "/", kind="dir", mode=0o755)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}


def tarinfo(e: Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.name)
    ti.type = _TYPES[e.kind]
    ti.mtime = e.mtime
    ti.mode = e.mode
    ti.uname, ti.gname = "bimcv", "bimcv"
    ti.uid = ti.gid = 1000
    if e.kind == "file":
        ti.size = len(e.data)
    if e.kind in ("symlink", "hardlink"):
        ti.linkname = e.link
    if e.kind in ("char", "block"):
        ti.devmajor, ti.devminor = 1, 3
    return ti


def tar_bytes(entries: Iterable[Entry], *, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            tar.addfile(tarinfo(e), io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def write_archive(
    path: Path, entries: Iterable[Entry], *, level: int = 1, fmt: int = tarfile.GNU_FORMAT
) -> Path:
    """Write ``entries`` as a ``.tar.gz`` (fast compression level: tests stay quick)."""
    path.write_bytes(gzip.compress(tar_bytes(entries, fmt=fmt), compresslevel=level, mtime=0))
    return path


_MODE_CHAR = {
    tarfile.REGTYPE: "-",
    tarfile.AREGTYPE: "-",
    tarfile.CONTTYPE: "-",
    tarfile.DIRTYPE: "d",
    tarfile.SYMTYPE: "l",
    tarfile.LNKTYPE: "h",
    tarfile.FIFOTYPE: "p",
    tarfile.CHRTYPE: "c",
    tarfile.BLKTYPE: "b",
}


def _perm(mode: int) -> str:
    out = ""
    for shift in (6, 3, 0):
        bits = (mode >> shift) & 7
        out += ("r" if bits & 4 else "-") + ("w" if bits & 2 else "-") + ("x" if bits & 1 else "-")
    return out


def listing_line(ti: tarfile.TarInfo) -> str:
    """One line as GNU ``tar -tvf`` prints it."""
    kind = _MODE_CHAR.get(ti.type, "?")
    size = (
        f"{ti.devmajor},{ti.devminor}"
        if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE)
        else str(ti.size)
    )
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ti.mtime))
    name = ti.name + ("/" if ti.type == tarfile.DIRTYPE and not ti.name.endswith("/") else "")
    if ti.type == tarfile.SYMTYPE:
        name += f" -> {ti.linkname}"
    elif ti.type == tarfile.LNKTYPE:
        name += f" link to {ti.linkname}"
    return f"{kind}{_perm(ti.mode)} {ti.uname}/{ti.gname} {size:>10} {stamp} {name}"


def listing_text(entries: Iterable[Entry]) -> str:
    return "".join(listing_line(tarinfo(e)) + "\n" for e in entries)


def listing_of(entries: Iterable[Entry], source: str = "test.tar-tvf.txt") -> Listing:
    return parse_listing(listing_text(entries), source)


# ------------------------------------------------------------------ a MIDS-like tree


def _blob(rng: random.Random, size: int) -> bytes:
    """Archive-like bytes: mostly incompressible, a little structure."""
    if size <= 0:
        return b""
    head = bytes(rng.getrandbits(8) for _ in range(min(size, 64)))
    return (head + rng.randbytes(size - len(head)))[:size]


def sample_entries(
    *,
    subjects: int = 4,
    sessions: int = 2,
    seed: int = 0,
    image_size: int = 2000,
    ct_size: int = 5000,
    top: str = TOP,
    extras: bool = True,
) -> list[Entry]:
    """A small MIDS tree: subjects with CT, CR and DX images, sidecars and tables.

    Each session gets one image of a modality chosen in turn (CT, CR, DX, ...)
    plus a second DX lateral; quirks: a zero-byte PNG and an image without
    sidecar. ``extras`` adds a top-level ``participants.tsv`` and a script.
    """
    rng = random.Random(seed)
    out: list[Entry] = [dir_entry(top)]
    if extras:
        out.append(Entry(f"{top}/participants.tsv", b"participant\tage\nsub-S1\t50\n"))
        out.append(Entry(f"{top}/README.txt", b"scripts and docs\n"))
    mods = ["ct", "cr", "dx"]
    k = 0
    for s in range(subjects):
        sub = f"sub-S{3044 + s:05d}"
        out.append(dir_entry(f"{top}/{sub}"))
        out.append(Entry(f"{top}/{sub}/{sub}_sessions.tsv", f"session_id\n{sub}\n".encode()))
        for e in range(sessions):
            ses = f"ses-E{6138 + s * 10 + e:05d}"
            base = f"{top}/{sub}/{ses}"
            out.append(dir_entry(base))
            out.append(dir_entry(f"{base}/mod-rx"))
            out.append(Entry(f"{base}/{sub}_{ses}_scans.tsv", b"filename\tacq_time\n"))
            mod = mods[k % 3]
            k += 1
            stem = f"{base}/mod-rx/{sub}_{ses}_run-1_bp-chest"
            if mod == "ct":
                img = f"{stem}_ct.nii.gz"
                data = _blob(rng, ct_size)
            else:
                img = f"{stem}_vp-pa_{mod}.png"
                data = _blob(rng, image_size) if k % 7 else b""  # a zero-byte PNG
            out.append(Entry(img, data))
            if k % 5 != 4:  # an image without its sidecar now and then
                side = img[: -len(".nii.gz")] if img.endswith(".nii.gz") else img[:-4]
                out.append(Entry(side + ".json", b'{"00080060": {"vr": "CS"}}' + _blob(rng, 40)))
            lat = f"{base}/mod-rx/{sub}_{ses}_acq-2_run-2_bp-chest_vp-ll_dx.png"
            out.append(Entry(lat, _blob(rng, image_size // 2)))
            out.append(Entry(lat[:-4] + ".json", b'{"00080060": {"vr": "CS"}}'))
    return out


def files_of(entries: Iterable[Entry]) -> dict[str, bytes]:
    return {e.name: e.data for e in entries if e.kind == "file"}


def tree_files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (relative path → content); symlinks are listed as such."""
    out: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = b"<symlink>"
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def snapshot(root: Path) -> set[str]:
    """Every path under ``root`` (files, folders, links), relative."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}
