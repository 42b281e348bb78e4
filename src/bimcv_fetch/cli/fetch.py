"""Commands that talk to the share: releases, list, status, download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from bimcv_fetch.catalog import load_catalog
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
    syntax,
)
from bimcv_fetch.errors import BimcvError
from bimcv_fetch.mids import Selector, subset_label
from bimcv_fetch.plan import parse_shard
from bimcv_fetch.progress import human_bytes, json_line, make_reporter
from bimcv_fetch.ratelimit import parse_rate


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
    index = load_index_for(s, share, offline=offline)
    rows = describe(index, s.layout, selector)
    shown = rows if selector.is_everything else [r for r in rows if r.wanted]
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
        if not selector.is_everything:
            its = ",".join(map(str, s.selection.iterations))
            line += (
                f"; the selection (subset {summary['subset']}, iterations {its}) skips "
                f"{len(skipped)} of {len(rows)} archives, saving {human_bytes(saved)}"
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


# ------------------------------------------------------------------ status


@cli.command("status")
@common_options
def status_cmd(s: Settings) -> int:
    """Per archive and in total: missing, partial, downloaded, verified, extracted."""
    from bimcv_fetch.status import archive_status

    index = None
    try:
        index = load_index_for(s, None, offline=True, with_listings=False)
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


# ------------------------------------------------------------------ download


@cli.command("download")
@common_options
@subset_option
@archives_option
@subjects_option
@jobs_option(3, "Archives transferred")
@click.option(
    "--shard",
    default=None,
    callback=syntax(parse_shard),
    help="Take the K-th of N stable, size-balanced parts: K/N.",
)
@click.option(
    "--limit-rate",
    default=None,
    callback=syntax(parse_rate),
    help="Cap the total rate, e.g. 50M (bytes/s).",
)
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
@out_option
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
    from bimcv_fetch.plan import parse_shard
    from bimcv_fetch.scheduler import DownloadOptions, execute_plan, exit_code, make_plan
    from bimcv_fetch.transfer import TransferOptions, parse_rate

    s.out = out
    selector = s.selector(subset, subjects)
    shard_kn = parse_shard(shard)
    rate = parse_rate(limit_rate) if limit_rate else None
    names = split_names(archive_names)
    share = s.share()
    s.note(f"release {s.selection.describe()}")
    index = load_index_for(s, share)
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
    options = DownloadOptions(
        jobs=jobs,
        keep_going=keep_going,
        limit_rate=rate,
        transfer=TransferOptions(stall_timeout=stall_timeout),
        command="download",
    )
    reporter = make_reporter(json_mode=s.json, quiet=s.quiet)
    try:
        results = execute_plan(plan, share, s.layout, selector, options, reporter=reporter)
    finally:
        close_reporter(reporter)
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
