"""Options every command shares, the settings they make, and small CLI helpers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from bimcv_fetch.catalog import Selection, load_catalog
from bimcv_fetch.errors import ConfigError
from bimcv_fetch.mids import Selector, parse_subset, selector_for
from bimcv_fetch.progress import json_line
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
        return selector_for(self.selection, subset, subjects)

    # human output: messages to stderr; results to stdout unless --json
    def note(self, text: str) -> None:
        if not self.quiet and not self.json:
            click.echo(text, err=True)

    def event(self, obj: dict[str, Any]) -> None:
        if self.json:
            json_line(obj)


def syntax(check: Callable[[str], object]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: ``check(value)`` raising ConfigError makes it a usage error (exit 2)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or value == ():
            return value
        try:
            for v in value if isinstance(value, tuple) else (value,):
                check(v)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
        return value

    return callback


def _check_server(url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{url!r} is not an http:// or https:// address")


def _check_iter(text: str) -> None:
    from bimcv_fetch.catalog import parse_iterations

    parse_iterations(text)


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
            callback=syntax(_check_server),
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
            callback=syntax(_check_iter),
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
    callback=syntax(parse_subset),
    help="Modalities to keep: CT, CR, DX or a list such as CR,DX (default: all).",
)


def load_index_for(
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


def close_reporter(reporter: Any) -> None:
    close = getattr(reporter, "close", None)
    if callable(close):
        close()


def out_option(func: F) -> F:
    """``--out DIR``: where the MIDS tree is (default: DEST)."""
    opt = click.option(
        "--out",
        type=click.Path(path_type=Path),
        default=None,
        help="Where the MIDS tree goes (default: DEST).",
    )
    return opt(func)


def jobs_option(default: int, what: str) -> Callable[[F], F]:
    return click.option(
        "-j",
        "--jobs",
        type=click.IntRange(1, 32),
        default=default,
        show_default=True,
        envvar=ENV + "JOBS",
        help=f"{what} at once.",
    )


subjects_option = click.option(
    "--subjects", multiple=True, help="Only these subjects (repeat, or comma-separate)."
)
archives_option = click.option(
    "--archives",
    "archive_names",
    multiple=True,
    help="Only these archives (repeat, or comma-separate).",
)


def split_names(values: tuple[str, ...]) -> list[str]:
    """``("a,b", "c")`` → ``["a", "b", "c"]``."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]
