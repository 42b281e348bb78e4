"""The release catalog (manifests/releases.toml) and the --iter/--release choice."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from bimcv_fetch.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_PLACEHOLDERS = {"{aa}": "[a-z]{2}", "{n}": "[0-9]+"}


@dataclass(frozen=True)
class Release:
    id: str
    title: str
    token: str
    iterations: tuple[int, ...]
    subject_archive: str
    metadata_archives: tuple[str, ...]
    checksum_files: tuple[str, ...]
    top_folder: str
    iter1_subjects: tuple[str, str] | None
    doi: str | None = None

    @property
    def subject_archive_re(self) -> re.Pattern[str]:
        return _pattern_re(self.subject_archive)

    def is_subject_archive(self, name: str) -> bool:
        return self.subject_archive_re.fullmatch(name) is not None

    def subject_archive_name(self, index: int) -> str:
        """The name of the ``index``-th possible shard (``aa``=0, ``ab``=1 …; ``{n}``=index+1)."""
        name = self.subject_archive
        if "{aa}" in name:
            a, b = divmod(index, 26)
            if a >= 26:
                raise ValueError(f"shard index {index} out of range")
            name = name.replace("{aa}", chr(97 + a) + chr(97 + b))
        return name.replace("{n}", str(index + 1))


@dataclass(frozen=True)
class Selection:
    """A release plus an optional restriction to the subjects of some iterations."""

    release: Release
    iterations: tuple[int, ...]

    @property
    def iteration2_only(self) -> bool:
        """True when the user asked for iteration 2 alone out of the 1+2 release."""
        return 1 in self.release.iterations and 1 not in self.iterations

    def describe(self) -> str:
        text = f"{self.release.id} ({self.release.title})"
        if self.release.iter1_subjects and self.iterations != self.release.iterations:
            lo, hi = self.release.iter1_subjects
            if self.iteration2_only:
                text += f", restricted to iteration-2 subjects (outside sub-{lo} … sub-{hi})"
            else:
                text += f", restricted to iteration-1 subjects (sub-{lo} … sub-{hi})"
        return text


@cache
def _pattern_re(pattern: str) -> re.Pattern[str]:
    out = re.escape(pattern)
    for ph, rx in _PLACEHOLDERS.items():
        out = out.replace(re.escape(ph), rx)
    return re.compile(out)


def _catalog_text() -> str:
    packaged = resources.files("bimcv_fetch").joinpath("_data/releases.toml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # Running from a source checkout (editable install): manifests/ at the top.
    here = Path(__file__).resolve().parents[2] / "manifests" / "releases.toml"
    return here.read_text(encoding="utf-8")


def _release(rid: str, raw: dict[str, Any]) -> Release:
    try:
        rng = raw.get("iter1_subjects") or None
        return Release(
            id=rid,
            title=str(raw["title"]),
            token=str(raw["token"]),
            iterations=tuple(int(i) for i in raw["iterations"]),
            subject_archive=str(raw["subject_archive"]),
            metadata_archives=tuple(str(n) for n in raw.get("metadata_archives", [])),
            checksum_files=tuple(str(n) for n in raw["checksum_files"]),
            top_folder=str(raw["top_folder"]),
            iter1_subjects=(str(rng[0]), str(rng[1])) if rng else None,
            doi=raw.get("doi"),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"releases.toml: release {rid!r} is incomplete ({exc})") from exc


@dataclass(frozen=True)
class Catalog:
    releases: dict[str, Release]
    default: str

    def get(self, rid: str) -> Release:
        try:
            return self.releases[rid]
        except KeyError:
            known = ", ".join(sorted(self.releases))
            raise ConfigError(f"unknown release {rid!r}", hint=f"known: {known}") from None

    def select(self, *, iterations: str | None = None, release: str | None = None) -> Selection:
        """Resolve ``--iter`` / ``--release`` into a :class:`Selection`."""
        if iterations is not None and release is not None:
            rel = self.get(release)
            wanted = parse_iterations(iterations)
            missing = [i for i in wanted if i not in rel.iterations]
            if missing:
                raise ConfigError(f"release {rel.id} does not hold iteration(s) {missing}")
            later = tuple(i for i in rel.iterations if i != 1)
            expressible = wanted in (rel.iterations, (1,)) or (wanted == later and len(later) == 1)
            if not expressible or (wanted != rel.iterations and rel.iter1_subjects is None):
                raise ConfigError(
                    f"--iter {','.join(map(str, wanted))} cannot be selected in {rel.id}",
                    hint="only the subject ID range tells iteration 1 from the rest; "
                    "nothing marks the later iterations apart",
                )
            return Selection(rel, wanted)
        if release is not None:
            rel = self.get(release)
            return Selection(rel, rel.iterations)
        if iterations is None:
            rel = self.get(self.default)
            return Selection(rel, rel.iterations)
        wanted = parse_iterations(iterations)
        positives = [r for r in self.releases.values() if r.id.startswith("posi-")]
        for rel in positives:
            if rel.iterations == wanted:
                return Selection(rel, wanted)
        if wanted == (2,):
            rel = self.get("posi-1-2")
            return Selection(rel, wanted)
        raise ConfigError(
            f"no release holds exactly iterations {','.join(map(str, wanted))}",
            hint="use --iter 1, 2, 1,2 or 1,2,3, or --release ID",
        )


def parse_iterations(text: str) -> tuple[int, ...]:
    try:
        items = sorted({int(p) for p in text.replace(" ", "").split(",") if p})
    except ValueError:
        raise ConfigError(f"--iter {text!r}: expected numbers like 1,2") from None
    if not items or any(i < 1 for i in items):
        raise ConfigError(f"--iter {text!r}: expected numbers like 1,2")
    return tuple(items)


@cache
def load_catalog() -> Catalog:
    try:
        data = tomllib.loads(_catalog_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the release catalog: {exc}") from exc
    releases = {rid: _release(rid, raw) for rid, raw in data.get("releases", {}).items()}
    default = str(data.get("default", "posi-1-2"))
    if default not in releases:
        raise ConfigError(f"releases.toml: default release {default!r} is not defined")
    return Catalog(releases, default)
