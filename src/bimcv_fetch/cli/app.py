"""The click group and the entry point that maps errors to exit codes."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import click

from bimcv_fetch import __version__
from bimcv_fetch.catalog import load_catalog
from bimcv_fetch.cli.common import ENV
from bimcv_fetch.errors import BimcvError, ExitCode

# ------------------------------------------------------------------ the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bimcv-fetch")
def cli() -> None:
    """Download, verify and unpack the BIMCV-COVID19 chest imaging dataset."""


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


def _clean(text: str, argv: list[str]) -> str:
    for secret in _secrets(argv):
        text = text.replace(secret, "***")
    return text


def _say_error(text: str, argv: list[str], verbose: bool) -> None:
    def clean(t: str) -> str:
        return _clean(t, argv)

    if verbose:
        click.echo(clean(traceback.format_exc()).rstrip(), err=True)
    click.echo(clean(text), err=True)


def _terminate_as_interrupt() -> None:
    """SIGTERM (SLURM's scancel, kill) stops as cleanly as Ctrl-C, in every command."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread (an embedding program)
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _wants_traceback(args)
    _terminate_as_interrupt()
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
        if "--json" in args:  # stdout still ends with a summary line
            from bimcv_fetch.progress import json_line

            json_line(
                {
                    "event": "summary",
                    "exit_code": int(exc.exit_code),
                    "error": _clean(str(exc), args),
                }
            )
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
