"""The download plan and the parallel scheduler: shards, locks, cancellation, keep-going.

Each archive is fetched by :func:`bimcv_fetch.transfer.fetch_file` under its
own lock file, so runs on other machines (``--shard``) or a second run on the
same destination never write the same file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import requests

from bimcv_fetch.errors import (
    BimcvError,
    ChecksumError,
    ConfigError,
    DiskError,
    ExitCode,
    Interrupted,
    worst,
)
from bimcv_fetch.events import Event, Reporter, ThreadSafeReporter, null_reporter
from bimcv_fetch.index import ReleaseIndex
from bimcv_fetch.mids import Selector
from bimcv_fetch.plan import ArchiveInfo, describe, receipt_covers, shard_of
from bimcv_fetch.ratelimit import RateLimiter
from bimcv_fetch.share import Share
from bimcv_fetch.store import Layout, archive_lock, free_space, is_verified, write_verified
from bimcv_fetch.stream import Consumer, sha1_file
from bimcv_fetch.transfer import TransferOptions, fetch_file

SPACE_MARGIN = 16 << 20  # keep this much free beyond the plan


@dataclass(frozen=True)
class PlanItem:
    info: ArchiveInfo
    action: str  # "fetch", "resume", "extract" (on disk, not yet extracted), "have"
    on_disk: int = 0  # bytes of a .part already there

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def to_fetch(self) -> int:
        if self.action not in ("fetch", "resume"):
            return 0
        return max(0, (self.info.packed or 0) - self.on_disk)


@dataclass(frozen=True)
class DownloadPlan:
    items: tuple[PlanItem, ...]
    skipped: tuple[ArchiveInfo, ...]  # not wanted for the selection, or not in this shard
    extract: bool

    @property
    def to_fetch(self) -> int:
        return sum(i.to_fetch for i in self.items)

    @property
    def work(self) -> list[PlanItem]:
        return [i for i in self.items if i.action != "have"]

    def space_needed(self) -> int:
        need = self.to_fetch
        if self.extract:
            need += sum(i.info.wanted_bytes or 0 for i in self.items if i.action != "have")
        return need


def make_plan(
    index: ReleaseIndex,
    layout: Layout,
    selector: Selector,
    *,
    shard: tuple[int, int] | None = None,
    names: Sequence[str] = (),
    extract: bool = False,
) -> DownloadPlan:
    """What to fetch: wanted archives (metadata always), this shard's share, minus what is here."""
    infos = describe(index, layout, selector)
    if names:
        known = {i.name for i in infos}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"--archives: not in the share: {', '.join(unknown)}")
        chosen = [i for i in infos if i.name in set(names)]
    else:
        chosen = [i for i in infos if i.wanted]
    if shard is not None:
        chosen = shard_of(chosen, *shard)
    chosen_names = {i.name for i in chosen}
    skipped = tuple(i for i in infos if i.name not in chosen_names)
    items: list[PlanItem] = []
    for info in chosen:
        items.append(_item(index, layout, selector, info, extract))
    return DownloadPlan(tuple(items), skipped, extract)


def _item(
    index: ReleaseIndex, layout: Layout, selector: Selector, info: ArchiveInfo, extract: bool
) -> PlanItem:
    name = info.name
    covered = receipt_covers(layout, name, selector, info.sha1)
    if layout.archive(name).exists():
        if info.sha1 is None:
            # Nothing published to check it against (never so in the real releases):
            # keep it as it is, never delete what cannot be proven wrong.
            return PlanItem(info, "extract" if extract and not covered else "have")
        if not is_verified(layout, name, info.sha1):
            return PlanItem(info, "verify")  # hashed before anything else is decided
        if extract and not covered:
            return PlanItem(info, "extract")
        return PlanItem(info, "have")
    if covered:
        return PlanItem(info, "have")  # extracted earlier, archive deleted on purpose
    part = layout.part(name)
    if part.exists():
        return PlanItem(info, "resume", part.stat().st_size)
    return PlanItem(info, "fetch")


def check_space(plan: DownloadPlan, layout: Layout) -> None:
    need = plan.space_needed()
    if need == 0:
        return
    free = free_space(layout.archives)
    if free < need + SPACE_MARGIN:
        raise DiskError(
            f"not enough free space in {layout.dest}: the plan needs "
            f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free",
            hint="free some space, use --subset or --shard, or pick another --dest",
        )


# ------------------------------------------------------------------ running


@dataclass
class ArchiveResult:
    name: str
    status: str  # ok, have, failed, interrupted, not-started
    exit_code: int = 0
    error: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    extracted: int = 0


@dataclass
class DownloadOptions:
    jobs: int = 3
    keep_going: bool = False
    limit_rate: float | None = None
    transfer: TransferOptions = field(default_factory=TransferOptions)
    command: str = "download"


# An extraction hook: (name, sha1, layout) -> a consumer fed while bytes land,
# with commit()/discard() for after the SHA1 check; or None to fetch only.
ExtractorFactory = Callable[[str, str | None], "ExtractHook"]


class ExtractHook(Protocol):
    """What ``download --extract`` plugs into a transfer (see extract.DownloadExtractHook)."""

    @property
    def consumer(self) -> Consumer: ...

    def commit(self, sha1: str) -> int: ...

    def discard(self) -> None: ...

    def abort(self) -> None: ...

    def extract_local(self, cancel: threading.Event | None = None) -> int: ...


def run_download(
    plan: DownloadPlan,
    share: Share,
    session: requests.Session,
    layout: Layout,
    options: DownloadOptions,
    *,
    extractor: ExtractorFactory | None = None,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
) -> list[ArchiveResult]:
    """Fetch every plan item, ``options.jobs`` at once. Never raises for one archive's failure.

    A KeyboardInterrupt in the calling thread sets ``cancel``; workers stop
    between chunks keeping their ``.part`` files, and Interrupted is raised.
    """
    report = ThreadSafeReporter(reporter or null_reporter)
    cancel = cancel or threading.Event()
    limiter = RateLimiter(options.limit_rate) if options.limit_rate else None
    work = plan.work
    report(Event("overall", total=plan.to_fetch, data={"files": len(work)}))
    results: dict[str, ArchiveResult] = {
        i.name: ArchiveResult(i.name, "have") for i in plan.items if i.action == "have"
    }
    stop_new = threading.Event()

    def job(item: PlanItem) -> ArchiveResult:
        t0 = time.monotonic()
        res = ArchiveResult(item.name, "ok")
        if cancel.is_set() or stop_new.is_set():
            res.status = "not-started"
            return res
        try:
            with archive_lock(layout, item.name, options.command):
                res.bytes, res.extracted = _one(
                    item, share, session, layout, options, limiter, report, cancel, extractor
                )
        except Interrupted as exc:
            res.status, res.exit_code, res.error = "interrupted", exc.exit_code, str(exc)
        except BimcvError as exc:
            res.status, res.exit_code, res.error = "failed", exc.exit_code, share.redact(str(exc))
            report(Event("fail", item.name, data={"error": res.error, "exit_code": res.exit_code}))
        except OSError as exc:
            res.status, res.exit_code = "failed", int(ExitCode.DISK)
            res.error = f"I/O error: {exc}"
            report(Event("fail", item.name, data={"error": res.error, "exit_code": res.exit_code}))
        except Exception as exc:  # a bug: report it against this archive, keep the others
            res.status, res.exit_code = "failed", int(ExitCode.UNEXPECTED)
            res.error = share.redact(f"{type(exc).__name__}: {exc}")
            report(Event("fail", item.name, data={"error": res.error, "exit_code": res.exit_code}))
        if res.status == "failed" and not options.keep_going:
            stop_new.set()
        res.seconds = time.monotonic() - t0
        return res

    pool = ThreadPoolExecutor(max_workers=max(1, options.jobs), thread_name_prefix="fetch")
    futures: dict[Future[ArchiveResult], PlanItem] = {pool.submit(job, i): i for i in work}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for f in done:
                r = f.result()
                results[r.name] = r
    except KeyboardInterrupt:
        cancel.set()
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)
        raise Interrupted(
            "interrupted; every .part file was kept",
            hint="rerun the same command to resume",
        ) from None
    finally:
        pool.shutdown(wait=True)
    if cancel.is_set():
        raise Interrupted(
            "interrupted; every .part file was kept", hint="rerun the same command to resume"
        )
    return [results[i.name] for i in plan.items if i.name in results]


def _one(
    item: PlanItem,
    share: Share,
    session: requests.Session,
    layout: Layout,
    options: DownloadOptions,
    limiter: RateLimiter | None,
    report: Reporter,
    cancel: threading.Event,
    extractor: ExtractorFactory | None,
) -> tuple[int, int]:
    info = item.info
    hook = extractor(info.name, info.sha1) if extractor is not None else None
    if item.action == "verify":
        path = layout.archive(info.name)
        report(Event("start", info.name, total=path.stat().st_size, data={"verb": "verify"}))

        def progress(n: int) -> None:
            if cancel.is_set():
                raise Interrupted(f"{info.name}: interrupted while verifying")
            report(Event("advance", info.name, done=n))

        actual = sha1_file(str(path), progress=progress)
        if actual == info.sha1:
            write_verified(layout, info.name, actual)
            report(Event("finish", info.name, data={"status": "verified", "sha1": actual}))
            return 0, hook.extract_local(cancel) if hook is not None else 0
        report(Event("finish", info.name, data={"status": "mismatch, fetching again"}))
        path.unlink()
    if item.action in ("fetch", "resume") and is_verified(layout, info.name, info.sha1):
        # Another run (or shard) finished it between our plan and our lock.
        report(Event("finish", info.name, data={"status": "already done by another run"}))
        return 0, hook.extract_local(cancel) if hook is not None else 0
    if item.action == "extract":
        assert hook is not None
        report(Event("message", data={"text": f"extracting {info.name} (already downloaded)"}))
        return 0, hook.extract_local(cancel)
    consumers: list[Consumer] = [hook.consumer] if hook is not None else []
    try:
        result = fetch_file(
            session,
            share,
            info.name,
            layout,
            size=info.packed,
            sha1=info.sha1,
            etag=None,
            consumers=consumers,
            options=options.transfer,
            limiter=limiter,
            reporter=report,
            cancel=cancel,
        )
    except ChecksumError:
        if hook is not None:
            hook.discard()  # files from bytes that failed the SHA1 check must go
        raise
    except BaseException:
        if hook is not None:
            hook.abort()  # keep what was extracted: the rerun resumes and skips it
        raise
    extracted = hook.commit(result.sha1) if hook is not None else 0
    return result.bytes_transferred, extracted


def execute_plan(
    plan: DownloadPlan,
    share: Share,
    layout: Layout,
    selector: Selector,
    options: DownloadOptions,
    *,
    reporter: Reporter | None = None,
) -> list[ArchiveResult]:
    """Check the space, then run the plan on a fresh connection pool (CLI and library alike)."""
    from bimcv_fetch.share import new_session

    check_space(plan, layout)
    extractor: ExtractorFactory | None = None
    if plan.extract:
        from bimcv_fetch.extract_hook import extract_hook_factory

        extractor = extract_hook_factory(layout, selector.release, selector)
    session = new_session(pool_size=max(10, options.jobs * 2))
    try:
        return run_download(
            plan, share, session, layout, options, extractor=extractor, reporter=reporter
        )
    finally:
        session.close()


def exit_code(results: list[ArchiveResult]) -> int:
    return worst([r.exit_code for r in results])
