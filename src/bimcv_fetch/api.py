"""The library API: the same download as the command line, callable from Python.

    >>> import bimcv_fetch
    >>> results = bimcv_fetch.download("data/bimcv", iterations="1,2", subset="CT")

Errors are raised as :class:`bimcv_fetch.errors.BimcvError` subclasses (each with
its ``exit_code``); progress is a tqdm bar per archive (it renders in notebooks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bimcv_fetch.catalog import load_catalog
from bimcv_fetch.events import Reporter
from bimcv_fetch.index import load_index
from bimcv_fetch.mids import selector_for
from bimcv_fetch.scheduler import ArchiveResult, DownloadOptions, execute_plan, make_plan
from bimcv_fetch.share import DEFAULT_SERVER, Protocol, Share, new_session
from bimcv_fetch.store import Layout
from bimcv_fetch.transfer import TransferOptions


def download(
    dest: str | Path = "bimcv-covid19",
    *,
    iterations: str | None = None,
    release: str | None = None,
    subset: str | None = None,
    subjects: list[str] | None = None,
    archives: list[str] | None = None,
    jobs: int = 3,
    shard: tuple[int, int] | None = None,
    extract: bool = False,
    out: str | Path | None = None,
    server: str = DEFAULT_SERVER,
    token: str | None = None,
    password: str = "",
    protocol: Protocol = "webdav",
    ca_bundle: str | None = None,
    stall_timeout: float = 60.0,
    limit_rate: float | None = None,
    keep_going: bool = True,
    progress: bool | Reporter = True,
) -> list[ArchiveResult]:
    """Download (and with ``extract=True`` unpack) a release; returns one result per archive."""
    selection = load_catalog().select(iterations=iterations, release=release)
    layout = Layout(Path(dest), Path(out) if out is not None else None)
    share = Share(
        server=server,
        token=token or selection.release.token,
        password=password,
        protocol=protocol,
        verify=ca_bundle or True,
    )
    selector = selector_for(selection, subset, subjects or ())
    reporter: Any = None
    if progress is True:
        from bimcv_fetch.progress import TqdmReporter

        reporter = TqdmReporter()
    elif callable(progress):
        reporter = progress
    try:
        session = new_session()
        try:
            index = load_index(selection, layout, share=share, session=session)
        finally:
            session.close()
        plan = make_plan(
            index, layout, selector, shard=shard, names=archives or (), extract=extract
        )
        options = DownloadOptions(
            jobs=jobs,
            keep_going=keep_going,
            limit_rate=limit_rate,
            transfer=TransferOptions(stall_timeout=stall_timeout),
            command="api",
        )
        return execute_plan(plan, share, layout, selector, options, reporter=reporter)
    finally:
        close = getattr(reporter, "close", None)
        if callable(close):
            close()
