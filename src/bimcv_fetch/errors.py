"""One exception tree for the whole tool; each class carries its exit code.

The core raises these; only the CLI turns them into a one-line message and an
exit status. Messages never contain the share token.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    CONFIG = 3
    NETWORK = 4
    CHECKSUM = 5
    UNSAFE = 6
    DISK = 7
    LOCKED = 8
    INTERRUPTED = 130


class BimcvError(Exception):
    """Base of every error a user can cause or meet; ``str()`` is one line."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(BimcvError):
    """Bad option values, unknown release, wrong token, 401/404 on the share."""

    exit_code = ExitCode.CONFIG


class ManifestError(ConfigError):
    """A listing or checksum file that cannot be parsed; names file and line."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


class NetworkError(BimcvError):
    """The server could not be reached or kept failing after every retry."""

    exit_code = ExitCode.NETWORK


class ChecksumError(BimcvError):
    """A file whose size or SHA1 differs from the published one."""

    exit_code = ExitCode.CHECKSUM

    def __init__(self, name: str, expected: str, actual: str, *, what: str = "SHA1") -> None:
        super().__init__(f"{name}: {what} mismatch: expected {expected}, got {actual}")
        self.name = name
        self.expected = expected
        self.actual = actual


class UnsafeArchiveError(BimcvError):
    """An archive (or its listing) with a member that could escape the destination."""

    exit_code = ExitCode.UNSAFE


class CorruptArchiveError(UnsafeArchiveError):
    """An archive whose gzip or tar stream is broken or differs from its listing."""


class DiskError(BimcvError):
    """Not enough space, or an I/O error on the destination."""

    exit_code = ExitCode.DISK


class LockedError(BimcvError):
    """Another bimcv-fetch process holds the lock on this destination or file."""

    exit_code = ExitCode.LOCKED


class Interrupted(BimcvError):
    """The user pressed Ctrl-C (or the process got SIGTERM)."""

    exit_code = ExitCode.INTERRUPTED


def worst(codes: list[int]) -> int:
    """The exit code to report when several archives failed differently."""
    nonzero = [c for c in codes if c]
    if not nonzero:
        return 0
    if ExitCode.INTERRUPTED in nonzero:
        return int(ExitCode.INTERRUPTED)
    return max(nonzero)
