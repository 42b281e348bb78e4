"""The header helpers of httputil, branch by branch."""

from __future__ import annotations

import email.utils
import random

import pytest

from bimcv_fetch.httputil import (
    backoff_delay,
    is_weak_etag,
    parse_content_length,
    parse_content_range,
    parse_oc_checksum,
    parse_retry_after,
    parse_unsatisfied_range,
)

# ---------------------------------------------------------------- Content-Range


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-99/100", (0, 99, 100)),
        ("bytes 100-5012451876/5012451877", (100, 5012451876, 5012451877)),
        ("bytes 5-5/6", (5, 5, 6)),
        ("bytes 10-19/*", (10, 19, None)),
        ("BYTES 1-2/3", (1, 2, 3)),  # the unit is case-insensitive
        ("  bytes  1 - 2 / 3  ", (1, 2, 3)),  # tolerant of spaces
    ],
)
def test_content_range_valid(value: str, expected: tuple[int, int, int | None]) -> None:
    assert parse_content_range(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "bytes */100",  # the 416 form: no range
        "items 0-9/10",  # another unit
        "bytes 0-99",  # no total
        "bytes 9-0/10",  # end before start
        "bytes 0-100/100",  # end at the total
        "bytes 0-200/100",  # end beyond the total
        "bytes -1-5/10",
        "bytes a-b/c",
        "bytes 0-9/10, bytes 20-29/30",
    ],
)
def test_content_range_invalid(value: str | None) -> None:
    assert parse_content_range(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes */100", 100),
        ("bytes */0", 0),
        (" Bytes * / 7 ", 7),
        ("bytes 0-1/2", None),
        ("bytes */*", None),
        ("", None),
        (None, None),
    ],
)
def test_unsatisfied_range(value: str | None, expected: int | None) -> None:
    assert parse_unsatisfied_range(value) == expected


# ---------------------------------------------------------------- Retry-After

NOW = 1_700_000_000.0


def test_retry_after_seconds() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after(" 7 ", NOW) == 7.0
    assert parse_retry_after("0", NOW) == 0.0
    assert parse_retry_after("1.5", NOW) == 1.5


def test_retry_after_negative_seconds_is_zero() -> None:
    assert parse_retry_after("-5", NOW) == 0.0


def test_retry_after_http_date_future() -> None:
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert parse_retry_after(date, NOW) == pytest.approx(30.0)


def test_retry_after_http_date_past_is_zero() -> None:
    date = email.utils.formatdate(NOW - 3600, usegmt=True)
    assert parse_retry_after(date, NOW) == 0.0


def test_retry_after_date_without_zone_is_gmt() -> None:
    # "-0000" makes email.utils return a naive datetime: it must still mean UTC.
    date = email.utils.formatdate(NOW + 10).rsplit(" ", 1)[0] + " -0000"
    assert parse_retry_after(date, NOW) == pytest.approx(10.0)


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "12 seconds", "Mon, 99 Foo 2020"])
def test_retry_after_garbage(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


# ---------------------------------------------------------------- backoff


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_grows_exponentially_to_the_cap() -> None:
    top = _Fixed(0.999999)
    ceilings = [backoff_delay(n, 1.0, 60.0, top) for n in range(1, 10)]
    assert ceilings == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60, 60], rel=1e-5)


def test_backoff_full_jitter_bounds() -> None:
    rng = random.Random(42)
    for attempt in range(1, 30):
        d = backoff_delay(attempt, 0.5, 10.0, rng)
        assert 0.0 <= d <= min(10.0, 0.5 * 2 ** (attempt - 1))


def test_backoff_jitter_uses_the_whole_range() -> None:
    assert backoff_delay(3, 1.0, 60.0, _Fixed(0.0)) == 0.0
    assert backoff_delay(3, 1.0, 60.0, _Fixed(0.5)) == 2.0


def test_backoff_huge_attempt_does_not_overflow() -> None:
    assert backoff_delay(10_000, 1.0, 60.0, _Fixed(0.5)) == 30.0


@pytest.mark.parametrize(
    ("attempt", "base", "cap"), [(0, 1.0, 60.0), (1, 0.0, 60.0), (1, 1.0, 0.0)]
)
def test_backoff_degenerate(attempt: int, base: float, cap: float) -> None:
    assert backoff_delay(attempt, base, cap, _Fixed(0.9)) == 0.0


# ---------------------------------------------------------------- OC-Checksum, lengths, ETags

SHA = "a" * 40


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"SHA1:{SHA}", SHA),
        (f"sha1:{SHA.upper()}", SHA),
        (f"MD5:{'b' * 32} SHA1:{SHA} ADLER32:0badf00d", SHA),
        (f"MD5:{'b' * 32}", None),
        ("SHA1:xyz", None),
        ("SHA1", None),
        ("", None),
        (None, None),
    ],
)
def test_oc_checksum(value: str | None, expected: str | None) -> None:
    assert parse_oc_checksum(value) == expected


def test_oc_checksum_other_algorithm() -> None:
    assert parse_oc_checksum(f"SHA1:{SHA} MD5:{'B' * 32}", "md5") == "b" * 32


@pytest.mark.parametrize(
    ("value", "expected"),
    [("100", 100), (" 0 ", 0), ("", None), (None, None), ("-1", None), ("1e3", None)],
)
def test_content_length(value: str | None, expected: int | None) -> None:
    assert parse_content_length(value) == expected


def test_weak_etag() -> None:
    assert is_weak_etag('W/"abc"')
    assert not is_weak_etag('"abc"')
