"""The command line: parses options, calls the core, renders results, maps errors to exits.

The only module that imports click. It never touches sockets or tar members.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from bimcv_fetch import __version__
from bimcv_fetch.catalog import Selection, load_catalog
from bimcv_fetch.errors import BimcvError, ConfigError, ExitCode
from bimcv_fetch.mids import Selector, parse_subjects, parse_subset, subset_label
from bimcv_fetch.progress import human_bytes, json_line, make_reporter
from bimcv_fetch.share import DEFAULT_SERVER, PROTOCOLS, Protocol, Share
from bimcv_fetch.store import Layout

F = TypeVar("F", bound=Callable[..., Any])
ENV = "BIMCV_FETCH_"


# ------------------------------------------------------------------ settings


@dataclass
class Settings:
    dest: Path
    out: Path | None
    server: str
    token: str | None
    password: str
    protocol: Protocol
    ca_bundle: str | None
    json: bool
    quiet: bool
    verbose: bool
    release: str | None
    iterations: str | None
    timeout: float = 30.0

    @property
    def layout(self) -> Layout:
        return Layout(self.dest, self.out)

    @functools.cached_property
    def selection(self) -> Selection:
        return load_catalog().select(iterations=self.iterations, release=self.release)

    def share(self) -> Share:
        token = self.token or self.selection.release.token
        verify: bool | str = True
        if self.ca_bundle:
            if not Path(self.ca_bundle).is_file():
                raise ConfigError(f"--ca-bundle {self.ca_bundle}: no such file")
            verify = self.ca_bundle
        return Share(
            server=self.server,
            token=token,
            password=self.password,
            protocol=self.protocol,
            verify=verify,
            timeout=self.timeout,
        )

    def selector(self, subset: str | None, subjects: tuple[str, ...] = ()) -> Selector:
        sel = self.selection
        return Selector(
            subset=parse_subset(subset),
            subjects=parse_subjects(subjects),
            release=sel.release,
            iterations=sel.iterations,
        )

    # human output: messages to stderr; results to stdout unless --json
    def note(self, text: str) -> None:
        if not self.quiet and not self.json:
            click.echo(text, err=True)

    def event(self, obj: dict[str, Any]) -> None:
        if self.json:
            json_line(obj)


def common_options(func: F) -> F:
    """The options every command accepts, after the command name."""
    options = [
        click.option(
            "--dest",
            type=click.Path(path_type=Path),
            envvar=ENV + "DEST",
            default=Path("bimcv-covid19"),
            show_default=True,
            help="Dataset folder: archives/, manifests/, the MIDS tree.",
        ),
        click.option(
            "--server",
            envvar=ENV + "SERVER",
            default=DEFAULT_SERVER,
            show_default=True,
            help="Nextcloud server holding the share.",
        ),
        click.option(
            "--token",
            envvar=ENV + "TOKEN",
            default=None,
            help="Share token (default: the release's, from the catalog).",
        ),
        click.option(
            "--password",
            envvar=ENV + "PASSWORD",
            default="",
            help="Share password, if the share has one.",
        ),
        click.option(
            "--protocol",
            type=click.Choice(PROTOCOLS),
            envvar=ENV + "PROTOCOL",
            default="webdav",
            show_default=True,
            help="webdav (legacy public WebDAV), dav (v2) or https (share link).",
        ),
        click.option(
            "--ca-bundle",
            envvar=ENV + "CA_BUNDLE",
            default=None,
            help="CA certificates (PEM) to verify the server with.",
        ),
        click.option(
            "--release",
            "release",
            envvar=ENV + "RELEASE",
            default=None,
            help="Release id (posi-1, posi-1-2, posi-1-2-3, neg-1-2).",
        ),
        click.option(
            "--iter",
            "iterations",
            envvar=ENV + "ITER",
            default=None,
            help="Iterations, e.g. 1,2 (picks the release).",
        ),
        click.option(
            "--json",
            "json_mode",
            is_flag=True,
            help="JSON lines on stdout, ending with a summary line.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress or notes."),
        click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors."),
    ]
    for opt in reversed(options):
        func = opt(func)

    @functools.wraps(func)
    def wrapper(**kw: Any) -> Any:
        settings = Settings(
            dest=kw.pop("dest"),
            out=None,
            server=kw.pop("server"),
            token=kw.pop("token"),
            password=kw.pop("password"),
            protocol=kw.pop("protocol"),
            ca_bundle=kw.pop("ca_bundle"),
            json=kw.pop("json_mode"),
            quiet=kw.pop("quiet"),
            verbose=kw.pop("verbose"),
            release=kw.pop("release"),
            iterations=kw.pop("iterations"),
        )
        return func(settings, **kw)

    return wrapper  # type: ignore[return-value]


subset_option = click.option(
    "--subset",
    default=None,
    envvar=ENV + "SUBSET",
    help="Modalities to keep: CT, CR, DX or a list such as CR,DX (default: all).",
)


# ------------------------------------------------------------------ the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bimcv-fetch")
def cli() -> None:
    """Download, verify and unpack the BIMCV-COVID19 chest imaging dataset."""


@cli.command("releases")
@common_options
def releases_cmd(s: Settings) -> None:
    """The releases this tool knows (the catalog)."""
    cat = load_catalog()
    for rel in cat.releases.values():
        row = {
            "release": rel.id,
            "title": rel.title,
            "iterations": list(rel.iterations),
            "default": rel.id == cat.default,
            "subject_archive": rel.subject_archive,
            "metadata_archives": list(rel.metadata_archives),
            "checksum_files": list(rel.checksum_files),
            "top_folder": rel.top_folder,
            "doi": rel.doi,
        }
        if s.json:
            json_line({"event": "release", **row})
        else:
            mark = " (default)" if row["default"] else ""
            its = ",".join(map(str, rel.iterations))
            click.echo(f"{rel.id:<12} iter {its:<6} {rel.title}{mark}")
    s.event({"event": "summary", "releases": len(cat.releases)})


# ------------------------------------------------------------------ list


@cli.command("list")
@common_options
@subset_option
@click.option("--offline", is_flag=True, help="Use the cached manifests alone.")
def list_cmd(s: Settings, subset: str | None, offline: bool) -> None:
    """The archives of a release: sizes, members, modalities, local state."""
    from bimcv_fetch.plan import describe

    selector = s.selector(subset)
    s.note(f"release {s.selection.describe()}")
    share = None if offline else s.share()
    index = _load_index(s, share, offline=offline)
    rows = describe(index, s.layout, selector)
    shown = [r for r in rows if r.wanted] if selector.subset is not None else rows
    skipped = [r for r in rows if not r.wanted]
    for w in index.warnings:
        s.note(f"warning: {w}")
    if s.json:
        for r in shown:
            json_line({"event": "archive", **r.as_json()})
    else:
        _print_table(shown)
    total_packed = sum(r.packed or 0 for r in shown)
    saved = sum(r.packed or 0 for r in skipped)
    summary = {
        "event": "summary",
        "release": index.release.id,
        "iterations": list(s.selection.iterations),
        "subset": subset_label(selector.subset),
        "archives": len(shown),
        "archives_total": len(rows),
        "packed": total_packed,
        "unpacked": sum(r.unpacked or 0 for r in shown),
        "wanted_bytes": sum(r.wanted_bytes or 0 for r in shown),
        "saved": saved,
        "states": _count_states(shown),
    }
    if s.json:
        json_line(summary)
    else:
        line = f"{len(shown)} archives, {human_bytes(total_packed)} packed"
        if selector.subset is not None or skipped:
            line += (
                f"; subset {summary['subset']} skips {len(skipped)} of {len(rows)} archives,"
                f" saving {human_bytes(saved)}"
            )
        click.echo(line)


def _count_states(rows: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.state] = out.get(r.state, 0) + 1
    return out


def _print_table(rows: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col, just in (
        ("archive", "left"),
        ("packed", "right"),
        ("members", "right"),
        ("CT", "right"),
        ("CR", "right"),
        ("DX", "right"),
        ("unpacked", "right"),
        ("state", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            r.name,
            human_bytes(r.packed),
            "?" if r.members is None else str(r.members),
            str(r.images.get("CT", 0)),
            str(r.images.get("CR", 0)),
            str(r.images.get("DX", 0)),
            human_bytes(r.unpacked),
            r.state,
        )
    Console(width=max(120, _term_width()), soft_wrap=False).print(table)


def _term_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


def _load_index(
    s: Settings, share: Share | None, *, offline: bool = False, with_listings: bool = True
) -> Any:
    from bimcv_fetch.index import load_index
    from bimcv_fetch.share import new_session

    session = None if offline else new_session()
    try:
        return load_index(
            s.selection,
            s.layout,
            share=share,
            session=session,
            offline=offline,
            with_listings=with_listings,
            note=s.note,
        )
    finally:
        if session is not None:
            session.close()


# ------------------------------------------------------------------ status


@cli.command("status")
@common_options
def status_cmd(s: Settings) -> int:
    """Per archive and in total: missing, partial, downloaded, verified, extracted."""
    from bimcv_fetch.status import archive_status

    index = None
    try:
        index = _load_index(s, None, offline=True, with_listings=False)
    except BimcvError as exc:
        s.note(f"note: no usable cached manifests ({exc}); showing what is on disk")
    rows = archive_status(s.layout, index)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
        if s.json:
            json_line({"event": "archive", **r.as_json()})
    if not s.json:
        for r in rows:
            pct = f" {r.percent:.0f}%" if r.percent is not None else ""
            sub = f" [{r.subset}]" if r.subset else ""
            click.echo(f"{r.state:<10} {r.name}{pct}{sub}")
        total = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "nothing"
        click.echo(f"{len(rows)} archives: {total}")
    s.event({"event": "summary", "archives": len(rows), **counts})
    return 0


# ------------------------------------------------------------------ verify


@cli.command("verify")
@common_options
@subset_option
@click.option("--deep", is_flag=True, help="Also read each archive and check every member.")
@click.option("--tree", is_flag=True, help="Audit the extracted MIDS tree (no archive needed).")
@click.option("--hash", "hash_", is_flag=True, help="With --tree: compare file contents too.")
@click.option("--force", is_flag=True, help="Rehash archives already proven by a stamp.")
@click.option("-j", "--jobs", type=click.IntRange(1, 32), default=2, show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the MIDS tree is (default: DEST).",
)
def verify_cmd(
    s: Settings,
    subset: str | None,
    deep: bool,
    tree: bool,
    hash_: bool,
    force: bool,
    jobs: int,
    out: Path | None,
) -> int:
    """Check archives against sha1sums (and members, and the extracted tree), offline."""
    from bimcv_fetch.errors import worst
    from bimcv_fetch.verify import audit_tree, deep_check, problems_exit_code, verify_archives

    s.out = out
    index = _load_index(s, None, offline=True)
    layout = s.layout
    reporter = make_reporter(json_mode=s.json, quiet=s.quiet)
    codes: list[int] = []
    summary: dict[str, Any] = {"event": "summary"}
    try:
        with _terminate_as_interrupt():
            checks = verify_archives(
                layout, index.checksums, index.archives, jobs=jobs, reporter=reporter, force=force
            )
            _close(reporter)
            by_status: dict[str, int] = {}
            for c in checks:
                by_status[c.status] = by_status.get(c.status, 0) + 1
                codes.append(c.exit_code)
                if s.json:
                    json_line(
                        {
                            "event": "archive",
                            "archive": c.name,
                            "status": c.status,
                            "expected": c.expected,
                            "actual": c.actual,
                            "cached": c.cached,
                            "detail": c.detail or None,
                        }
                    )
                elif c.status == "mismatch":
                    click.echo(
                        f"MISMATCH {c.name}: expected {c.expected}, got {c.actual}", err=True
                    )
                elif c.status in ("error", "unknown"):
                    click.echo(
                        f"{c.status.upper()} {c.name}: {c.detail or 'no published SHA1'}", err=True
                    )
            summary["archives"] = by_status
            ok_names = [c.name for c in checks if c.ok]
            if deep:
                problems = []
                reporter = make_reporter(json_mode=s.json, quiet=s.quiet)
                for name in ok_names:
                    listing = index.listing(name)
                    if listing is None:
                        continue
                    problems += deep_check(
                        layout.archive(name), listing, name=name, reporter=reporter
                    )
                _close(reporter)
                _print_problems(s, problems)
                codes.append(problems_exit_code(problems))
                summary["deep_checked"] = len(ok_names)
                summary["deep_problems"] = len(problems)
            if tree:
                selector = s.selector(subset) if subset else _receipts_only(s)
                problems = audit_tree(
                    layout, index.listings, selector, hash=hash_, only_extracted=True, jobs=jobs
                )
                _print_problems(s, problems)
                codes.append(problems_exit_code(problems))
                summary["tree_problems"] = len(problems)
                summary["tree_hashed"] = hash_
    finally:
        _close(reporter)
    code = worst(codes)
    summary["exit_code"] = code
    checked = by_status.get("ok", 0) + by_status.get("mismatch", 0)
    not_checked = {k: v for k, v in by_status.items() if k in ("missing", "partial", "unknown")}
    if s.json:
        json_line(summary)
    else:
        line = f"{checked} archives checked by SHA1: {by_status.get('ok', 0)} ok"
        if by_status.get("mismatch"):
            line += f", {by_status['mismatch']} MISMATCH"
        if not_checked:
            line += "; not checked: " + ", ".join(f"{v} {k}" for k, v in not_checked.items())
        if deep:
            line += f"; deep: {summary['deep_problems']} problems in {len(ok_names)} archives"
        else:
            line += "; members not checked (--deep)"
        if tree:
            line += f"; tree: {summary['tree_problems']} problems"
            line += " (contents hashed)" if hash_ else " (sizes only; --hash for contents)"
        else:
            line += "; extracted tree not checked (--tree)"
        click.echo(line, err=True)
    return code


def _receipts_only(s: Settings) -> Selector:
    """A selector that expects no image of its own: the receipts say what was extracted."""
    sel = s.selection
    return Selector(subset=frozenset(), release=sel.release, iterations=sel.iterations)


def _print_problems(s: Settings, problems: list[Any]) -> None:
    from dataclasses import asdict

    for p in problems:
        if s.json:
            json_line({"event": "problem", **asdict(p)})
        else:
            where = f" ({p.archive})" if p.archive else ""
            click.echo(f"{p.kind.upper():<8} {p.path}{where}: {p.detail}", err=True)


# ------------------------------------------------------------------ extract


@cli.command("extract")
@common_options
@subset_option
@click.option("--subjects", multiple=True, help="Only these subjects (repeat or comma-separate).")
@click.option("--archives", "archive_names", multiple=True, help="Only these archives.")
@click.option("-j", "--jobs", type=click.IntRange(1, 32), default=2, show_default=True)
@click.option(
    "--delete-archives", is_flag=True, help="Remove each archive once its receipt is written."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the MIDS tree goes (default: DEST).",
)
def extract_cmd(
    s: Settings,
    subset: str | None,
    subjects: tuple[str, ...],
    archive_names: tuple[str, ...],
    jobs: int,
    delete_archives: bool,
    out: Path | None,
) -> int:
    """Unpack the wanted members of verified archives into the MIDS tree, offline."""
    from bimcv_fetch.errors import worst
    from bimcv_fetch.extract import ExtractJob, extract_many, receipt_covers
    from bimcv_fetch.verify import verify_archives

    s.out = out
    selector = s.selector(subset, subjects)
    index = _load_index(s, None, offline=True)
    layout = s.layout
    names = [n.strip() for v in archive_names for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in index.archives]
    if unknown:
        raise ConfigError(f"--archives: not in the release: {', '.join(unknown)}")
    candidates = names or index.archives
    present = [n for n in candidates if layout.archive(n).exists()]
    absent = [n for n in candidates if n not in present and not receipt_covers(layout, n, selector)]
    codes: list[int] = []
    reporter = make_reporter(json_mode=s.json, quiet=s.quiet)
    try:
        with _terminate_as_interrupt():
            checks = verify_archives(layout, index.checksums, present, jobs=jobs, reporter=reporter)
            jobs_list = []
            for c in checks:
                if not c.ok:
                    codes.append(c.exit_code or int(ExitCode.CHECKSUM))
                    click.echo(
                        f"bimcv-fetch: {c.name}: not extracted: SHA1 {c.status}"
                        + (f" (expected {c.expected}, got {c.actual})" if c.actual else ""),
                        err=True,
                    )
                    continue
                listing = index.listing(c.name)
                if listing is None:
                    codes.append(int(ExitCode.CONFIG))
                    click.echo(
                        f"bimcv-fetch: {c.name}: no listing; cannot extract safely", err=True
                    )
                    continue
                jobs_list.append(
                    ExtractJob(
                        c.name, layout.archive(c.name), listing, c.actual or c.expected or ""
                    )
                )
            results = extract_many(
                jobs_list,
                jobs,
                layout,
                selector=selector,
                reporter=reporter,
                delete_archives=delete_archives,
            )
    finally:
        _close(reporter)
    written = 0
    for r in results:
        codes.append(r.exit_code)
        if r.error is not None:
            click.echo(f"bimcv-fetch: {r.name}: {r.error}", err=True)
        elif r.receipt is not None:
            written += r.receipt.written
        if s.json:
            json_line(
                {
                    "event": "archive",
                    "archive": r.name,
                    "status": "ok" if r.ok else "failed",
                    "exit_code": r.exit_code,
                    "written": r.receipt.written if r.receipt else 0,
                    "error": str(r.error) if r.error else None,
                }
            )
    needed_absent = [n for n in absent if index.listing(n) is None or _holds(index, n, selector)]
    code = worst(codes)
    summary = {
        "event": "summary",
        "archives": len(results),
        "files_written": written,
        "not_downloaded": needed_absent,
        "subset": subset_label(selector.subset),
        "tree": str(layout.tree),
        "exit_code": code,
    }
    if s.json:
        json_line(summary)
    else:
        ok = sum(1 for r in results if r.ok)
        s.note(
            f"{ok} of {len(results)} archives extracted into {layout.tree} "
            f"({written} files written, subset {summary['subset']})"
        )
        if needed_absent:
            s.note(
                f"{len(needed_absent)} wanted archives are not downloaded yet "
                f"(bimcv-fetch download{' --subset ' + subset if subset else ''})"
            )
    return code


def _holds(index: Any, name: str, selector: Selector) -> bool:
    from bimcv_fetch.plan import holds_wanted

    return holds_wanted(index.listing(name), selector, index.is_metadata(name))


# ------------------------------------------------------------------ download


@cli.command("download")
@common_options
@subset_option
@click.option(
    "--archives",
    "archive_names",
    multiple=True,
    help="Only these archives (repeat, or comma-separate).",
)
@click.option("--subjects", multiple=True, help="Only these subjects (with --extract).")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 32),
    default=3,
    show_default=True,
    envvar=ENV + "JOBS",
    help="Archives transferred at once.",
)
@click.option("--shard", default=None, help="Take the K-th of N stable, size-balanced parts: K/N.")
@click.option("--limit-rate", default=None, help="Cap the total rate, e.g. 50M (bytes/s).")
@click.option("--dry-run", is_flag=True, help="Print the plan; move no byte.")
@click.option("--keep-going", is_flag=True, help="Finish the other archives when one fails.")
@click.option(
    "--stall-timeout",
    type=click.FloatRange(0.1),
    default=60.0,
    show_default=True,
    help="Seconds without a byte before a request is dropped and resumed.",
)
@click.option(
    "--extract",
    "do_extract",
    is_flag=True,
    help="Extract the wanted members while the bytes land (one pass).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the MIDS tree goes (default: DEST).",
)
def download_cmd(
    s: Settings,
    subset: str | None,
    archive_names: tuple[str, ...],
    subjects: tuple[str, ...],
    jobs: int,
    shard: str | None,
    limit_rate: str | None,
    dry_run: bool,
    keep_going: bool,
    stall_timeout: float,
    do_extract: bool,
    out: Path | None,
) -> int:
    """Fetch a release's archives: resumable, parallel, SHA1-checked."""
    from bimcv_fetch.download import (
        DownloadOptions,
        check_space,
        exit_code,
        make_plan,
        run_download,
    )
    from bimcv_fetch.plan import parse_shard
    from bimcv_fetch.share import new_session
    from bimcv_fetch.transfer import TransferOptions, parse_rate

    s.out = out
    selector = s.selector(subset, subjects)
    shard_kn = parse_shard(shard)
    rate = parse_rate(limit_rate) if limit_rate else None
    names = [n.strip() for v in archive_names for n in v.split(",") if n.strip()]
    share = s.share()
    s.note(f"release {s.selection.describe()}")
    index = _load_index(s, share)
    for w in index.warnings:
        s.note(f"warning: {w}")
    plan = make_plan(index, s.layout, selector, shard=shard_kn, names=names, extract=do_extract)
    _show_plan(s, plan, selector, shard)
    if dry_run:
        s.event(
            {
                "event": "summary",
                "dry_run": True,
                "archives": len(plan.items),
                "to_fetch": plan.to_fetch,
                "space_needed": plan.space_needed(),
            }
        )
        return 0
    check_space(plan, s.layout)
    options = DownloadOptions(
        jobs=jobs,
        keep_going=keep_going,
        limit_rate=rate,
        transfer=TransferOptions(stall_timeout=stall_timeout),
        command="download",
    )
    extractor = _extractor_factory(s, selector) if do_extract else None
    session = new_session(pool_size=max(10, jobs * 2))
    reporter = make_reporter(json_mode=s.json, quiet=s.quiet)
    try:
        with _terminate_as_interrupt():
            results = run_download(
                plan, share, session, s.layout, options, extractor=extractor, reporter=reporter
            )
    finally:
        _close(reporter)
        session.close()
    code = exit_code(results)
    for r in results:
        if r.status == "failed":
            click.echo(f"bimcv-fetch: {r.name}: {r.error}", err=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = {
        "event": "summary",
        "archives": len(results),
        "exit_code": code,
        "bytes": sum(r.bytes for r in results),
        **counts,
    }
    if s.json:
        json_line(summary)
    else:
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        moved = sum(r.bytes for r in results)
        s.note(f"{len(results)} archives: {parts}; {human_bytes(moved)} transferred")
        if code:
            s.note("rerun the same command to retry what failed; finished archives are kept")
    return code


def _show_plan(s: Settings, plan: Any, selector: Selector, shard: str | None) -> None:
    for item in plan.items:
        obj = {
            "event": "plan",
            "archive": item.name,
            "action": item.action,
            "packed": item.info.packed,
            "on_disk": item.on_disk,
            "to_fetch": item.to_fetch,
        }
        if s.json:
            json_line(obj)
        elif not s.quiet:
            extra = f" ({human_bytes(item.on_disk)} on disk)" if item.on_disk else ""
            click.echo(
                f"  {item.action:<8} {item.name}  {human_bytes(item.info.packed)}{extra}", err=True
            )
    skipped = [a for a in plan.skipped]
    what = f"subset {subset_label(selector.subset)}" + (f", shard {shard}" if shard else "")
    s.note(
        f"plan: {len(plan.work)} of {len(plan.items)} archives to do, "
        f"{human_bytes(plan.to_fetch)} to fetch; {len(skipped)} archives left out ({what}, "
        f"{human_bytes(sum(a.packed or 0 for a in skipped))})"
    )


def _extractor_factory(s: Settings, selector: Selector) -> Any:
    from bimcv_fetch.extract import extract_hook_factory

    return extract_hook_factory(s.layout, s.selection.release, selector)


def _close(reporter: Any) -> None:
    close = getattr(reporter, "close", None)
    if callable(close):
        close()


class _terminate_as_interrupt:
    """SIGTERM (SLURM's scancel, kill) stops as cleanly as Ctrl-C."""

    def __enter__(self) -> None:
        import signal

        self._old = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# ------------------------------------------------------------------ sample, serve


@cli.command("sample")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--release", default="posi-1-2", show_default=True, help="Release to imitate.")
@click.option(
    "--archives",
    type=click.IntRange(1, 600),
    default=3,
    show_default=True,
    help="Subject archives (their letters have gaps, as on the real share).",
)
@click.option("--subjects-per-archive", type=click.IntRange(1, 1000), default=2, show_default=True)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="The same seed gives byte-identical archives.",
)
@click.option(
    "--size-scale",
    type=click.FloatRange(0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiplies image sizes (1: kilobytes; 10000: GBs).",
)
@click.option("--json", "json_mode", is_flag=True, help="JSON lines on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors.")
def sample_cmd(
    folder: Path,
    release: str,
    archives: int,
    subjects_per_archive: int,
    seed: int,
    size_scale: float,
    json_mode: bool,
    verbose: bool,
) -> int:
    """Write a miniature release laid out exactly like the real share."""
    from bimcv_fetch.server import build_sample

    load_catalog().get(release)  # a clear error for an unknown id
    built = build_sample(
        folder,
        release=release,
        archives=archives,
        subjects_per_archive=subjects_per_archive,
        seed=seed,
        size_scale=size_scale,
    )
    total = sum(built.sizes.values())
    if json_mode:
        for name in built.files:
            json_line(
                {"event": "file", "name": name, "size": built.sizes[name], "sha1": built.sha1[name]}
            )
        json_line(
            {
                "event": "summary",
                "folder": str(built.root),
                "release": release,
                "files": len(built.files),
                "bytes": total,
                "token": built.token,
            }
        )
    else:
        click.echo(
            f"wrote {len(built.files)} files ({human_bytes(total)}) of a {release} "
            f"sample into {built.root}"
        )
        click.echo(f"serve it with: bimcv-fetch serve {built.root} --token {built.token}")
    return 0


@cli.command("serve")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default)."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="0 picks a free port.",
)
@click.option("--token", default=None, help="Share token clients use (default: the release's).")
@click.option(
    "--release", default="posi-1-2", show_default=True, help="Release whose token is the default."
)
@click.option("--password", default="", help="Share password (default: none).")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--tls-self-signed",
    is_flag=True,
    help="Make a CA and a certificate for loopback; prints the CA path.",
)
@click.option(
    "--share-link",
    type=click.Choice(["direct", "zip"]),
    default="direct",
    show_default=True,
    help="Share-link mode: the file, or Nextcloud 31's zip.",
)
@click.option("--rate-limit", default=None, help="Bytes/s per connection, e.g. 20M.")
@click.option(
    "--faults",
    "faults_file",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="A fault plan (JSON or TOML) for testing clients.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every request (token masked).")
def serve_cmd(
    folder: Path,
    host: str,
    port: int,
    token: str | None,
    release: str,
    password: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_self_signed: bool,
    share_link: str,
    rate_limit: str | None,
    faults_file: Path | None,
    verbose: bool,
) -> int:
    """Serve a folder like b2drop's public share (a sample release or a mirror).

    FOLDER is a flat folder of share files, or a bimcv-fetch --dest folder, whose
    archives/ and manifests/ are then served together.
    """
    import logging

    from bimcv_fetch.server import FaultPlan, ShareServer, make_tls_files
    from bimcv_fetch.transfer import parse_rate

    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    root = _mirror_view(folder)
    tok = token or load_catalog().get(release).token
    tls = None
    ca: Path | None = None
    if tls_cert is not None and tls_key is not None:
        tls = (tls_cert, tls_key)
    elif tls_self_signed:
        import tempfile

        files = make_tls_files(Path(tempfile.mkdtemp(prefix="bimcv-fetch-tls-")))
        tls, ca = files.server_pair, files.ca
    server = ShareServer(
        root,
        token=tok,
        password=password,
        host=host,
        port=port,
        tls=tls,
        share_link_mode=share_link,  # type: ignore[arg-type]
        rate_limit=float(parse_rate(rate_limit)) if rate_limit else None,
        faults=FaultPlan.from_file(faults_file) if faults_file else None,
    )
    server.start()
    click.echo(f"serving {folder} at {server.url}")
    click.echo(f"token: {tok}" + (" (password protected)" if password else ""))
    if ca is not None:
        click.echo(f"CA certificate: {ca}")
    ca_opt = f" --ca-bundle {ca}" if ca is not None else ""
    click.echo(f"try: bimcv-fetch list --server {server.url} --token {tok}{ca_opt}")
    click.echo("Ctrl-C stops the server.")
    server.serve_forever()
    return 0


@cli.command("demo")
@click.option(
    "--keep",
    type=click.Path(path_type=Path),
    default=None,
    help="Build in this folder and keep it (default: a temporary folder).",
)
@click.option("--archives", type=click.IntRange(1, 26), default=3, show_default=True)
@click.option("--subset", default=None, help="Extract only these modalities, e.g. CT.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors.")
def demo_cmd(keep: Path | None, archives: int, subset: str | None, verbose: bool) -> int:
    """Offline tour: build a sample release, serve it with TLS, download, extract, verify."""
    import shutil
    import tempfile

    from bimcv_fetch.server import ShareServer, build_sample, make_tls_files

    base = keep if keep is not None else Path(tempfile.mkdtemp(prefix="bimcv-fetch-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        click.echo(f"1. building a miniature posi-1-2 release in {base / 'share'}", err=True)
        sample = build_sample(base / "share", archives=archives, seed=0)
        tls = make_tls_files(base / "tls")
        server = ShareServer(sample.root, token=sample.token, tls=tls.server_pair)
        with server:
            click.echo(f"2. serving it like b2drop at {server.url} (TLS, test CA)", err=True)
            opts = [
                "--server",
                server.url,
                "--ca-bundle",
                str(tls.ca),
                "--dest",
                str(base / "dest"),
            ]
            if subset:
                opts += ["--subset", subset]
            steps = [
                ("3. bimcv-fetch list", ["list", *opts]),
                ("4. bimcv-fetch download --extract", ["download", *opts, "--extract"]),
            ]
            verify_opts = [o for o in opts if o not in ("--subset", subset)]
            steps.append(
                (
                    "5. bimcv-fetch verify --deep --tree --hash",
                    ["verify", *verify_opts, "--deep", "--tree", "--hash"],
                )
            )
            for title, args in steps:
                click.echo(f"\n{title}", err=True)
                rc = cli.main(args=args, prog_name="bimcv-fetch", standalone_mode=False)
                if rc:
                    click.echo(f"demo: step failed with exit code {rc}", err=True)
                    return int(rc)
        tree = base / "dest" / sample.release.top_folder
        click.echo(f"\n6. the MIDS tree in {tree}:", err=True)
        files = sorted(p for p in tree.rglob("*") if p.is_file())
        for line in _tree_lines(tree, limit=45):
            click.echo("   " + line)
        total = sum(p.stat().st_size for p in files)
        click.echo(
            f"\ndemo done: {len(files)} files, {human_bytes(total)}, downloaded over "
            f"HTTPS, SHA1-checked, extracted and audited.",
            err=True,
        )
        if keep is None:
            click.echo("(the demo folder is removed; --keep DIR keeps it)", err=True)
        return 0
    finally:
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)


def _tree_lines(root: Path, limit: int) -> list[str]:
    """An indented picture of a folder, at most ``limit`` lines."""
    lines: list[str] = [f"{root.name}/"]
    hidden = 0

    def walk(d: Path, depth: int) -> None:
        nonlocal hidden
        for p in sorted(d.iterdir(), key=lambda x: (x.is_file(), x.name)):
            if len(lines) >= limit:
                hidden += sum(1 for q in p.rglob("*") if q.is_file()) if p.is_dir() else 1
                continue
            pad = "    " * depth
            if p.is_dir():
                lines.append(f"{pad}{p.name}/")
                walk(p, depth + 1)
            else:
                lines.append(f"{pad}{p.name}  ({human_bytes(p.stat().st_size)})")

    walk(root, 1)
    if hidden:
        lines.append(f"… and {hidden} more files")
    return lines


def _mirror_view(folder: Path) -> Path:
    """A flat view of a --dest folder (hard links to archives/ and manifests/)."""
    archives, manifests = folder / "archives", folder / "manifests"
    if not (archives.is_dir() and manifests.is_dir()):
        return folder
    import shutil

    view = folder / ".bimcv-fetch" / "mirror"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for src_dir in (manifests, archives):
        for p in src_dir.iterdir():
            if not p.is_file() or p.name.startswith(".") or p.name == "share.json":
                continue
            if p.name.endswith((".part", ".part.state")):
                continue
            try:
                os.link(p, view / p.name)
            except OSError:
                shutil.copy2(p, view / p.name)
    return view


# ------------------------------------------------------------------ entry point


def _wants_traceback(argv: list[str]) -> bool:
    return any(a in ("-v", "--verbose") for a in argv)


def _secrets(argv: list[str]) -> list[str]:
    """Every token this run may know: never shown, not even in a -v traceback."""
    from urllib.parse import quote

    found = [os.environ.get(ENV + "TOKEN", ""), os.environ.get(ENV + "PASSWORD", "")]
    for i, a in enumerate(argv):
        if a in ("--token", "--password") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif a.startswith(("--token=", "--password=")):
            found.append(a.split("=", 1)[1])
    with contextlib.suppress(BimcvError):
        found += [r.token for r in load_catalog().releases.values()]
    out = {t for t in found if len(t) >= 4}
    out |= {quote(t, safe="") for t in out}
    return sorted(out, key=len, reverse=True)


def _say_error(text: str, argv: list[str], verbose: bool) -> None:
    secrets = _secrets(argv)

    def clean(t: str) -> str:
        for secret in secrets:
            t = t.replace(secret, "***")
        return t

    if verbose:
        click.echo(clean(traceback.format_exc()).rstrip(), err=True)
    click.echo(clean(text), err=True)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _wants_traceback(args)
    try:
        rc = cli.main(args=args, prog_name="bimcv-fetch", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("bimcv-fetch: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BimcvError as exc:
        _say_error(f"bimcv-fetch: error: {exc}", args, verbose)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        click.echo("bimcv-fetch: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except OSError as exc:
        _say_error(f"bimcv-fetch: error: {exc}", args, verbose)
        sys.exit(ExitCode.DISK)
    except Exception as exc:  # the last line of defence: one line, exit 1
        _say_error(
            f"bimcv-fetch: unexpected error: {type(exc).__name__}: {exc} (rerun with -v)",
            args,
            verbose,
        )
        sys.exit(ExitCode.UNEXPECTED)
    sys.exit(rc if isinstance(rc, int) else 0)
