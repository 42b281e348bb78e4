"""What ``download --extract`` plugs into a transfer for each archive.

:func:`extract_hook_factory` makes one :class:`DownloadExtractHook` per archive
(see ``scheduler.ExtractHook``): it extracts while the bytes land
(:class:`~bimcv_fetch.extract_stream.StreamingExtractor`) or, for an archive
already on disk and verified, with :func:`~bimcv_fetch.extract.extract_archive`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from bimcv_fetch.catalog import Release
from bimcv_fetch.errors import ConfigError
from bimcv_fetch.events import Reporter
from bimcv_fetch.extract import StaleFilesError, extract_archive
from bimcv_fetch.extract_stream import StreamingExtractor
from bimcv_fetch.manifest import Listing, listing_names, parse_listing
from bimcv_fetch.mids import Selector
from bimcv_fetch.store import Layout, clear_verified

__all__ = ["DownloadExtractHook", "cached_listing", "extract_hook_factory"]


def cached_listing(layout: Layout, name: str) -> Listing | None:
    """The listing of archive ``name`` from ``layout.manifests`` (as the index caches it)."""
    for lname in listing_names(name):
        path = layout.manifest(lname)
        try:
            data = path.read_bytes()
        except OSError:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        return parse_listing(text, lname)
    return None


class DownloadExtractHook:
    """One archive's extraction inside ``download --extract`` (see scheduler.ExtractHook).

    ``consumer`` (created on first use) extracts while the bytes land;
    ``commit(sha1)``/``discard()`` follow the SHA1 check; ``extract_local()``
    extracts an archive already on disk and verified. Counts returned are
    files written.
    """

    def __init__(
        self,
        layout: Layout,
        name: str,
        sha1: str | None,
        listing: Listing,
        selector: Selector,
        *,
        reporter: Reporter | None = None,
        delete_archive: bool = False,
    ) -> None:
        self.layout = layout
        self.name = name
        self.sha1 = sha1
        self.listing = listing
        self.selector = selector
        self.reporter = reporter
        self.delete_archive = delete_archive
        self._streaming: StreamingExtractor | None = None

    @property
    def consumer(self) -> StreamingExtractor:
        if self._streaming is None:
            # No progress events here: the transfer already reports this archive's bytes.
            self._streaming = StreamingExtractor(
                self.layout,
                self.name,
                self.listing,
                archive_sha1=self.sha1 or "",
                selector=self.selector,
            )
        return self._streaming

    def commit(self, sha1: str) -> int:
        if self._streaming is None:
            return self.extract_local()
        try:
            receipt = self._streaming.commit(sha1)
        except StaleFilesError:
            # The bytes were fine (SHA1 checked) but files from an earlier, different
            # stream were in the way: redo it from the verified archive on disk.
            self.sha1 = sha1
            return self.extract_local()
        if self.delete_archive:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layout.archive(self.name))
            clear_verified(self.layout, self.name)
        return receipt.written

    def discard(self) -> None:
        if self._streaming is not None:
            self._streaming.discard()

    def abort(self) -> None:
        """Stop for now keeping what was extracted (an interrupted transfer resumes later)."""
        if self._streaming is not None:
            self._streaming.abort()

    def extract_local(self, cancel: threading.Event | None = None) -> int:
        receipt = extract_archive(
            self.layout.archive(self.name),
            self.listing,
            self.layout,
            name=self.name,
            archive_sha1=self.sha1 or "",
            selector=self.selector,
            reporter=self.reporter,
            delete_archive=self.delete_archive,
            cancel=cancel,
        )
        return receipt.written


def extract_hook_factory(
    layout: Layout,
    release: Release | None,
    selector: Selector,
    *,
    listings: Mapping[str, Listing] | None = None,
    reporter: Reporter | None = None,
    delete_archives: bool = False,
) -> Callable[[str, str | None], Any]:
    """What ``download --extract`` calls per archive: ``factory(name, sha1) -> hook``.

    The hooks are :class:`DownloadExtractHook` objects (typed ``Any`` here because
    ``scheduler.ExtractHook`` is a nominal class that this core module does not import).

    Listings come from ``listings`` or the manifest cache in ``layout``; a
    missing one raises ConfigError (nothing is extracted without its listing).
    ``release`` is accepted for the selector's iteration filter (already in
    ``selector``) and not otherwise needed.
    """
    del release

    def factory(name: str, sha1: str | None) -> DownloadExtractHook:
        listing = listings.get(name) if listings is not None else None
        if listing is None:
            listing = cached_listing(layout, name)
        if listing is None:
            raise ConfigError(
                f"{name}: no tar -tvf listing cached in {layout.manifests}",
                hint="run the command again online so the listings are fetched",
            )
        return DownloadExtractHook(
            layout, name, sha1, listing, selector, reporter=reporter, delete_archive=delete_archives
        )

    return factory
