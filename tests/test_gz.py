from __future__ import annotations

import gzip
import io
import os
import random

import pytest

from bimcv_fetch import gz
from bimcv_fetch.errors import CorruptArchiveError

BACKENDS = gz.available_backends()

RAW = os.urandom(300_000) + b"\0" * 2_000_000 + b"abc" * 100_000
MULTI = gzip.compress(RAW[:1_000_000]) + gzip.compress(RAW[1_000_000:])


def _read_all(stream: io.RawIOBase | object, size: int = 65536) -> bytes:
    out = []
    while True:
        chunk = stream.read(size)  # type: ignore[attr-defined]
        if not chunk:
            return b"".join(out)
        out.append(chunk)


def test_backends_listed() -> None:
    assert BACKENDS[-1] == "zlib"
    assert gz.default_backend() == BACKENDS[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_multi_member(backend: str) -> None:
    with gz.open_gzip_stream(io.BytesIO(MULTI), backend=backend) as s:
        assert _read_all(s) == RAW


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_truncated(backend: str) -> None:
    data = gzip.compress(RAW)[:-100]
    with (
        pytest.raises(CorruptArchiveError, match="truncated"),
        gz.open_gzip_stream(io.BytesIO(data), name="x.tgz", backend=backend) as s,
    ):
        _read_all(s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_flipped_byte(backend: str) -> None:
    data = bytearray(gzip.compress(RAW))
    data[len(data) // 3] ^= 0x10
    with (
        pytest.raises(CorruptArchiveError),
        gz.open_gzip_stream(io.BytesIO(bytes(data)), backend=backend) as s,
    ):
        _read_all(s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_bad_crc(backend: str) -> None:
    data = bytearray(gzip.compress(RAW))
    data[-8] ^= 1  # CRC32 in the trailer
    with (
        pytest.raises(CorruptArchiveError),
        gz.open_gzip_stream(io.BytesIO(bytes(data)), backend=backend) as s,
    ):
        _read_all(s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_not_gzip(backend: str) -> None:
    with (
        pytest.raises(CorruptArchiveError),
        gz.open_gzip_stream(io.BytesIO(b"plain tar? no" * 100), backend=backend) as s,
    ):
        _read_all(s)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError):
        gz.open_gzip_stream(io.BytesIO(MULTI), backend="nope")
    with pytest.raises(ValueError):
        gz.GzipDecoder(backend="nope")


def _push(dec: gz.GzipDecoder, data: bytes, rng: random.Random) -> tuple[bytes, int]:
    out: list[bytes] = []
    biggest = 0
    i = 0
    while i < len(data):
        n = rng.choice([1, 2, 7, 100, 4096, 65536, 300_000])
        for piece in dec.decompress(memoryview(data)[i : i + n]):
            biggest = max(biggest, len(piece))
            out.append(piece)
        i += n
    return b"".join(out), biggest


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_random_chunks_multi_member_and_padding(backend: str) -> None:
    rng = random.Random(1)
    data = MULTI + b"\0" * 1000
    dec = gz.GzipDecoder(backend=backend, out_chunk=100_000)
    got, biggest = _push(dec, data, rng)
    dec.finish()
    assert got == RAW
    assert dec.members == 2
    assert biggest <= 100_000  # bounded output: memory stays flat


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_bomb_output_is_bounded(backend: str) -> None:
    data = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    dec = gz.GzipDecoder(backend=backend)
    total = 0
    for piece in dec.decompress(data):
        assert len(piece) <= gz.OUT_CHUNK
        total += len(piece)
    dec.finish()
    assert total == 64 << 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_truncated(backend: str) -> None:
    data = gzip.compress(RAW)
    for cut in (1, 5, 30, len(data) // 2, len(data) - 1):
        dec = gz.GzipDecoder(backend=backend, name="a.tgz")
        for _ in dec.decompress(data[:cut]):
            pass
        with pytest.raises(CorruptArchiveError, match="truncated"):
            dec.finish()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_garbage(backend: str) -> None:
    data = bytearray(gzip.compress(RAW))
    data[-5] ^= 0xFF  # length in the trailer
    dec = gz.GzipDecoder(backend=backend)
    with pytest.raises(CorruptArchiveError):
        for _ in dec.decompress(bytes(data)):
            pass
    dec = gz.GzipDecoder(backend=backend)
    with pytest.raises(CorruptArchiveError, match="garbage"):
        for _ in dec.decompress(gzip.compress(b"x") + b"trailing junk"):
            pass
    dec = gz.GzipDecoder(backend=backend)
    with pytest.raises(CorruptArchiveError):
        for _ in dec.decompress(b"not gzip at all"):
            pass
    dec = gz.GzipDecoder(backend=backend)
    with pytest.raises(CorruptArchiveError, match="empty"):
        dec.finish()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_reset(backend: str) -> None:
    dec = gz.GzipDecoder(backend=backend)
    for _ in dec.decompress(MULTI[:1000]):
        pass
    dec.reset()
    got = b"".join(dec.decompress(MULTI))
    dec.finish()
    assert got == RAW
