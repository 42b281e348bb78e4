"""The MIDS tree: what a member path says about subject, session, modality and role.

    covid19_posi/sub-S03044/ses-E06138/mod-rx/sub-S03044_ses-E06138_run-1_bp-chest_vp-pa_dx.png

Modality is the suffix of the file name (``_ct``, ``_cr``, ``_dx``); a ``.json``
with the same stem is the image's sidecar. A subset filters images and their
sidecars only: every other file (tables, scripts, documents) is always kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from bimcv_fetch.catalog import Release, Selection
from bimcv_fetch.errors import ConfigError

MODALITIES = ("CT", "CR", "DX")
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm")
SIDECAR_EXTENSION = ".json"

_SUBJECT_RE = re.compile(r"sub-([A-Za-z0-9]+)")
_SESSION_RE = re.compile(r"ses-([A-Za-z0-9]+)")


class Role(str, Enum):
    IMAGE = "image"
    SIDECAR = "sidecar"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class MidsFile:
    path: str
    subject: str | None
    session: str | None
    entities: tuple[tuple[str, str], ...]
    suffix: str | None
    extension: str
    modality: str | None
    role: Role

    @property
    def stem(self) -> str:
        name = self.path.rsplit("/", 1)[-1]
        return name[: len(name) - len(self.extension)] if self.extension else name

    def entity(self, key: str) -> str | None:
        for k, v in self.entities:
            if k == key:
                return v
        return None

    @property
    def sidecar_path(self) -> str | None:
        """For an image, the path its ``.json`` sidecar would have."""
        if self.role is not Role.IMAGE:
            return None
        return self.path[: len(self.path) - len(self.extension)] + SIDECAR_EXTENSION

    @property
    def image_stem(self) -> str | None:
        """For a sidecar, the path of its image without extension."""
        if self.role is not Role.SIDECAR:
            return None
        return self.path[: len(self.path) - len(self.extension)]


def _split_extension(name: str) -> tuple[str, str]:
    lower = name.lower()
    for ext in (*IMAGE_EXTENSIONS, ".tar.gz"):
        if lower.endswith(ext):
            return name[: -len(ext)], name[-len(ext) :]
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:]


def parse_path(path: str) -> MidsFile:
    """Read a member path (or a path relative to the MIDS top folder)."""
    path = path.rstrip("/")
    name = path.rsplit("/", 1)[-1]
    stem, ext = _split_extension(name)
    parts = stem.split("_")
    entities: list[tuple[str, str]] = []
    suffix: str | None = None
    for i, part in enumerate(parts):
        key, sep, value = part.partition("-")
        if sep and key and value:
            entities.append((key, value))
        elif i == len(parts) - 1 and i > 0:
            suffix = part
    subject = dict(entities).get("sub")
    session = dict(entities).get("ses")
    if subject is None:
        m = _SUBJECT_RE.search(path)
        subject = m.group(1) if m else None
    if session is None:
        m = _SESSION_RE.search(path)
        session = m.group(1) if m else None
    modality = suffix.upper() if suffix and suffix.upper() in MODALITIES else None
    role = Role.OTHER
    if modality is not None:
        if ext.lower() == SIDECAR_EXTENSION:
            role = Role.SIDECAR
        elif ext.lower() in IMAGE_EXTENSIONS:
            role = Role.IMAGE
        else:
            modality = None
    return MidsFile(path, subject, session, tuple(entities), suffix, ext, modality, role)


def subject_iteration(subject: str | None, release: Release) -> int | None:
    """1 for a subject inside the release's iteration-1 range, else its later iteration.

    Only the subject ID range tells iterations apart (nothing in the 1+2 release
    marks them), so anything outside the range of a 1+2 release counts as 2.
    """
    if subject is None or release.iter1_subjects is None:
        return None
    lo, hi = release.iter1_subjects
    key = _subject_key(subject)
    if _subject_key(lo) <= key <= _subject_key(hi):
        return 1
    later = [i for i in release.iterations if i != 1]
    return later[0] if len(later) == 1 else None


def _subject_key(subject: str) -> tuple[str, int]:
    m = re.fullmatch(r"([A-Za-z]*)(\d+)", subject)
    return (m.group(1), int(m.group(2))) if m else (subject, -1)


def parse_subset(text: str | None) -> frozenset[str] | None:
    """``"CT"`` or ``"CR,DX"`` → modalities; ``None``/``""``/``"all"`` → everything."""
    if text is None or not text.strip() or text.strip().lower() == "all":
        return None
    wanted = {p.strip().upper() for p in text.split(",") if p.strip()}
    unknown = sorted(wanted - set(MODALITIES))
    if unknown:
        raise ConfigError(
            f"--subset: unknown modality {', '.join(unknown)}", hint="choose from CT, CR, DX"
        )
    return frozenset(wanted)


def subset_label(subset: frozenset[str] | None) -> str:
    return "all" if subset is None else ",".join(m for m in MODALITIES if m in subset)


@dataclass(frozen=True)
class Selector:
    """Which members of an archive a user wants."""

    subset: frozenset[str] | None = None
    subjects: frozenset[str] | None = None  # bare IDs such as "S03044"
    release: Release | None = None
    iterations: tuple[int, ...] | None = None

    def wants(self, path: str) -> bool:
        f = parse_path(path)
        return self.wants_file(f)

    def wants_file(self, f: MidsFile) -> bool:
        if self.subset is not None and f.modality is not None and f.modality not in self.subset:
            return False
        if f.subject is not None:
            if self.subjects is not None and f.subject not in self.subjects:
                return False
            if self._iter_restricted:
                assert self.release is not None and self.iterations is not None
                if self.release.iter1_subjects is not None:
                    # Inside the iteration-1 range, or after it (2 and later together:
                    # the catalog refuses any set the range cannot tell apart).
                    first = subject_iteration(f.subject, self.release) == 1
                    wanted = (
                        (1 in self.iterations) if first else any(i != 1 for i in self.iterations)
                    )
                    if not wanted:
                        return False
        return True

    @property
    def is_everything(self) -> bool:
        return self.subset is None and self.subjects is None and not self._iter_restricted

    @property
    def _iter_restricted(self) -> bool:
        return (
            self.release is not None
            and self.iterations is not None
            and set(self.release.iterations) != set(self.iterations)
        )


def parse_subjects(values: Iterable[str]) -> frozenset[str] | None:
    out: set[str] = set()
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.add(part[4:] if part.startswith("sub-") else part)
    return frozenset(out) if out else None


def modality_counts(paths: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(MODALITIES, 0)
    for p in paths:
        f = parse_path(p)
        if f.role is Role.IMAGE and f.modality:
            counts[f.modality] += 1
    return counts


def selector_for(
    selection: Selection, subset: str | None = None, subjects: Iterable[str] = ()
) -> Selector:
    """The members a user asked for: ``--subset``, ``--subjects`` and the iterations."""
    return Selector(
        subset=parse_subset(subset),
        subjects=parse_subjects(subjects),
        release=selection.release,
        iterations=selection.iterations,
    )
