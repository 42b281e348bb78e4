"""Offline commands over what is on disk: verify and extract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bimcv_fetch.cli.app import cli
from bimcv_fetch.cli.common import (
    Settings,
    archives_option,
    close_reporter,
    common_options,
    jobs_option,
    load_index_for,
    out_option,
    split_names,
    subjects_option,
    subset_option,
)
from bimcv_fetch.errors import ConfigError, ExitCode
from bimcv_fetch.mids import Selector, subset_label
from bimcv_fetch.progress import json_line, make_reporter

# ------------------------------------------------------------------ verify


@cli.command("verify")
@common_options
@subset_option
@click.option("--deep", is_flag=True, help="Also read each archive and check every member.")
@click.option("--tree", is_flag=True, help="Audit the extracted MIDS tree (no archive needed).")
@click.option("--hash", "hash_", is_flag=True, help="With --tree: compare file contents too.")
@click.option("--force", is_flag=True, help="Rehash archives already proven by a stamp.")
@jobs_option(2, "Archives hashed")
@out_option
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
    index = load_index_for(s, None, offline=True)
    layout = s.layout
    reporter = make_reporter(json_mode=s.json, quiet=s.quiet)
    codes: list[int] = []
    summary: dict[str, Any] = {"event": "summary"}
    try:
        checks = verify_archives(
            layout, index.checksums, index.archives, jobs=jobs, reporter=reporter, force=force
        )
        close_reporter(reporter)
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
                click.echo(f"MISMATCH {c.name}: expected {c.expected}, got {c.actual}", err=True)
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
                problems += deep_check(layout.archive(name), listing, name=name, reporter=reporter)
            close_reporter(reporter)
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
        close_reporter(reporter)
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
@subjects_option
@archives_option
@jobs_option(2, "Archives extracted")
@click.option(
    "--delete-archives", is_flag=True, help="Remove each archive once its receipt is written."
)
@out_option
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
    index = load_index_for(s, None, offline=True)
    layout = s.layout
    names = split_names(archive_names)
    unknown = [n for n in names if n not in index.archives]
    if unknown:
        raise ConfigError(f"--archives: not in the release: {', '.join(unknown)}")
    candidates = names or index.archives
    present = [n for n in candidates if layout.archive(n).exists()]
    absent = [n for n in candidates if n not in present and not receipt_covers(layout, n, selector)]
    codes: list[int] = []
    reporter = make_reporter(json_mode=s.json, quiet=s.quiet)
    try:
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
                click.echo(f"bimcv-fetch: {c.name}: no listing; cannot extract safely", err=True)
                continue
            jobs_list.append(
                ExtractJob(c.name, layout.archive(c.name), listing, c.actual or c.expected or "")
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
        close_reporter(reporter)
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
    if needed_absent:
        codes.append(int(ExitCode.CONFIG))  # asked for, but there is nothing to extract it from
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
                f"(bimcv-fetch download{' --subset ' + subset if subset else ''}): "
                + ", ".join(needed_absent[:5])
                + (f" and {len(needed_absent) - 5} more" if len(needed_absent) > 5 else "")
            )
    return code


def _holds(index: Any, name: str, selector: Selector) -> bool:
    from bimcv_fetch.plan import holds_wanted

    return holds_wanted(index.listing(name), selector, index.is_metadata(name))
