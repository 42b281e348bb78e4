"""The sequential tar reader, branch by branch, against tarfile's own reading."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable

import pytest

from bimcv_fetch.errors import CorruptArchiveError
from bimcv_fetch.tarstream import BLOCK, MAX_EXTENDED, TarStream

from .archives import TOP, Entry, dir_entry, sample_entries, tar_bytes

Row = tuple[str, bytes, int, float, str, bytes | None]


def read_all(source: object, **kw: object) -> list[Row]:
    out: list[Row] = []
    ts = TarStream(source, **kw)  # type: ignore[arg-type]
    for ti in ts:
        data = b"".join(bytes(p) for p in ts.data()) if ti.isreg() else None
        out.append((ti.name, ti.type, ti.size, ti.mtime, ti.linkname, data))
    return out


def tarfile_rows(data: bytes) -> list[Row]:
    out: list[Row] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for ti in tar:
            f = tar.extractfile(ti) if ti.isreg() else None
            out.append((ti.name, ti.type, ti.size, ti.mtime, ti.linkname, f.read() if f else None))
    return out


def chunked(data: bytes, size: int) -> Callable[[], bytes]:
    """A chunk source handing out ``data`` in pieces of ``size`` bytes."""
    pos = 0

    def pull() -> bytes:
        nonlocal pos
        piece = data[pos : pos + size]
        pos += len(piece)
        return piece

    return pull


def header(ti: tarfile.TarInfo, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    return ti.tobuf(fmt, "utf-8", "surrogateescape")


def raw_header(name: str, kind: bytes, size: int = 0, **fields: bytes) -> bytearray:
    """A GNU header for ``name`` whose raw bytes can then be patched (see ``checksum``)."""
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = size
    ti.mtime = 1600000000
    buf = bytearray(header(ti))
    for where, value in fields.items():
        start = int(where.removeprefix("at"))
        buf[start : start + len(value)] = value
    return checksum(buf)


def checksum(buf: bytearray) -> bytearray:
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return buf


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


END = bytes(2 * BLOCK)

LONG = f"{TOP}/sub-S1/ses-E1/mod-rx/" + "sub-S1_ses-E1_acq-29_run-5_" + "x" * 150 + "_ct.nii.gz"
ENTRIES = [
    *sample_entries(subjects=2),
    Entry(LONG, b"volume" * 100),
    Entry(f"{TOP}/l", kind="symlink", link="t" * 150),
    Entry(f"{TOP}/h", kind="hardlink", link=f"{TOP}/participants.tsv"),
    Entry(f"{TOP}/fifo", kind="fifo"),
    Entry(f"{TOP}/null", kind="char"),
    Entry(f"{TOP}/sda", kind="block"),
    Entry(f"{TOP}/zero.png", b""),
    Entry(f"{TOP}/one.png", b"1"),
    Entry(f"{TOP}/511.png", b"5" * 511),
    Entry(f"{TOP}/512.png", b"6" * 512),
    Entry(f"{TOP}/513.png", b"7" * 513),
    Entry(f"{TOP}/ünï-cödé.json", b"{}"),
]


# ------------------------------------------------------------------ formats and chunking


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
@pytest.mark.parametrize("size", [1, 7, 511, 512, 513, 4096, 1 << 20])
def test_same_members_as_tarfile(fmt: int, size: int) -> None:
    data = tar_bytes(ENTRIES, fmt=fmt)
    assert read_all(chunked(data, size)) == tarfile_rows(data)


def test_ustar_prefix_names() -> None:
    deep = f"{TOP}/" + "/".join(["sub-S03044_ses-E06138_mod-rx"] * 4) + "/image_ct.nii.gz"
    entries = [*sample_entries(subjects=1), Entry(deep, b"ct")]
    data = tar_bytes(entries, fmt=tarfile.USTAR_FORMAT)
    assert data.count(b"image_ct.nii.gz") == 1 and len(deep) > 100
    rows = read_all(io.BytesIO(data))
    assert rows == tarfile_rows(data)
    assert deep in [r[0] for r in rows]  # rebuilt from prefix + name


@pytest.mark.parametrize("kind", ["callable", "read_chunk", "readinto"])
def test_sources(kind: str) -> None:
    data = tar_bytes(ENTRIES)

    class ChunkReader:
        def __init__(self) -> None:
            self.read_chunk = chunked(data, 1000)

    source: object = {
        "callable": chunked(data, 1000),
        "read_chunk": ChunkReader(),
        "readinto": io.BytesIO(data),
    }[kind]
    assert read_all(source, buffer_size=777) == tarfile_rows(data)


def test_not_a_source() -> None:
    with pytest.raises(TypeError):
        TarStream(42)  # type: ignore[arg-type]


def test_pieces_are_views_of_the_chunks_and_offsets_match_tarfile() -> None:
    data = tar_bytes(ENTRIES)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        offsets = [(ti.offset, ti.offset_data) for ti in tar]
    ts = TarStream(chunked(data, 4096))
    mine = []
    for ti in ts:
        mine.append((ti.offset, ti.offset_data))
        for piece in ts.data():
            assert isinstance(piece, memoryview) and 0 < len(piece) <= 4096
    assert mine == offsets
    assert ts.ended and ts.next() is None


def test_partial_read_then_next_skips_the_rest() -> None:
    big = Entry(f"{TOP}/big.png", bytes(range(256)) * 40)
    data = tar_bytes([dir_entry(TOP), big, Entry(f"{TOP}/after.json", b"{}")])
    ts = TarStream(chunked(data, 1000))
    assert ts.next() is not None
    ti = ts.next()
    assert ti is not None and ti.name == big.name
    first = next(iter(ts.data()))
    assert bytes(first) == big.data[: len(first)]
    after = ts.next()
    assert after is not None and after.name == f"{TOP}/after.json"
    assert b"".join(ts.data()) == b"{}"
    assert ts.next() is None


def test_zero_size_members_and_directories_have_no_data() -> None:
    data = tar_bytes([dir_entry(TOP), Entry(f"{TOP}/a", b""), Entry(f"{TOP}/b", b"")])
    ts = TarStream(io.BytesIO(data))
    kinds = []
    for ti in ts:
        assert list(ts.data()) == []
        kinds.append((ti.name, ti.type))
    assert kinds == [(TOP, tarfile.DIRTYPE), (f"{TOP}/a", tarfile.REGTYPE), (f"{TOP}/b", b"0")]


def test_root_and_trailing_slashes() -> None:
    data = tar_bytes([Entry("./", kind="dir"), dir_entry(f"./{TOP}"), Entry(f"./{TOP}/x", b"1")])
    assert [r[0] for r in read_all(io.BytesIO(data))] == [".", f"./{TOP}", f"./{TOP}/x"]


# ------------------------------------------------------------------ GNU and pax extensions


def test_gnu_long_name_and_long_link() -> None:
    data = tar_bytes([Entry(LONG, b"v"), Entry(f"{TOP}/l", kind="symlink", link=LONG)])
    assert data[156:157] == tarfile.GNUTYPE_LONGNAME
    rows = read_all(chunked(data, 100))
    assert [(r[0], r[4]) for r in rows] == [(LONG, ""), (f"{TOP}/l", LONG)]


def test_gnu_long_name_of_a_directory_loses_its_slash() -> None:
    name = f"{TOP}/" + "d" * 120 + "/"
    data = tar_bytes([Entry(name, kind="dir")])
    assert [r[0] for r in read_all(io.BytesIO(data))] == [name.rstrip("/")]


def pax(records: dict[str, str | bytes], kind: bytes = tarfile.XHDTYPE) -> bytes:
    body = b""
    for key, value in records.items():
        raw = value if isinstance(value, bytes) else value.encode()
        rec = b" " + key.encode() + b"=" + raw + b"\n"
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    return bytes(raw_header("././@PaxHeader", kind, len(body))) + pad(body)


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return bytes(raw_header(name, kind, len(data))) + pad(data)


def raw_pax(body: bytes) -> bytes:
    return bytes(raw_header("p", tarfile.XHDTYPE, len(body))) + pad(body) + member("x", b"") + END


def test_pax_per_file_fields() -> None:
    data = (
        pax(
            {
                "path": f"{TOP}/renamed.png",
                "mtime": "1600000123.5",
                "atime": "whenever",
                "uid": "7",
                "gid": "bad",
                "uname": "u",
                "gname": "g",
                "comment": "ignored",
            }
        )
        + member(f"{TOP}/short.png", b"abc")
        + pax({"linkpath": "t" * 200})
        + bytes(raw_header(f"{TOP}/l", tarfile.SYMTYPE))
        + member(f"{TOP}/plain.png", b"z")
        + pax({"mtime": "yesterday"})
        + member(f"{TOP}/undated.png", b"")
        + END
    )
    ts = TarStream(chunked(data, 300))
    a = ts.next()
    assert a is not None and a.name == f"{TOP}/renamed.png" and a.mtime == 1600000123.5
    assert (a.uid, a.gid, a.uname, a.gname) == (7, 0, "u", "g")
    assert a.pax_headers["comment"] == "ignored"
    assert b"".join(ts.data()) == b"abc"
    b = ts.next()
    assert b is not None and b.issym() and b.linkname == "t" * 200
    c = ts.next()
    assert c is not None and c.name == f"{TOP}/plain.png" and c.mtime == 1600000000
    d = ts.next()
    assert d is not None and d.mtime == 0  # a bad number is 0, as in tarfile
    assert ts.next() is None


def test_pax_size_sets_the_data_length() -> None:
    body = b"x" * 700
    data = pax({"size": "700"}) + bytes(raw_header(f"{TOP}/big.png", b"0", 0)) + pad(body)
    data += member(f"{TOP}/next.json", b"{}") + END
    rows = read_all(io.BytesIO(data))
    assert [(r[0], r[2], r[5]) for r in rows] == [
        (f"{TOP}/big.png", 700, body),
        (f"{TOP}/next.json", 2, b"{}"),
    ]


def test_pax_global_header_applies_to_later_members() -> None:
    data = (
        member(f"{TOP}/before", b"1")
        + pax({"mtime": "1234", "uname": "global"}, kind=tarfile.XGLTYPE)
        + member(f"{TOP}/a", b"2")
        + pax({"uname": "own"})
        + member(f"{TOP}/b", b"3")
        + END
    )
    ts = TarStream(io.BytesIO(data))
    got = [(ti.name, ti.mtime, ti.uname) for ti in ts]
    assert got == [
        (f"{TOP}/before", 1600000000, ""),
        (f"{TOP}/a", 1234, "global"),
        (f"{TOP}/b", 1234, "own"),
    ]


def test_pax_undecodable_path_is_kept_as_surrogates() -> None:
    data = pax({"path": b"covid19_posi/caf\xe9.png"}) + member("x", b"") + END
    ti = TarStream(io.BytesIO(data)).next()
    assert ti is not None and ti.name == "covid19_posi/caf\udce9.png"


def test_the_outermost_extension_wins_as_in_tarfile() -> None:
    name = f"{TOP}/" + "n" * 120
    longname = bytes(raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, len(name) + 1))
    data = (
        longname
        + pad(name.encode() + b"\0")
        + pax({"path": f"{TOP}/from-pax"})
        + member(f"{TOP}/short", b"")
        + END
    )
    assert read_all(io.BytesIO(data))[0][0] == tarfile_rows(data)[0][0] == name


# ------------------------------------------------------------------ sparse and other types


def test_old_gnu_sparse_member_is_reported_sparse_and_skipped() -> None:
    sparse = raw_header(
        f"{TOP}/holes.png",
        tarfile.GNUTYPE_SPARSE,
        1024,
        at482=b"\x01",  # an extension block follows
        at483=b"%011o\0" % 99999,  # the real size
    )
    ext = bytearray(BLOCK)  # its last flag byte (504) is 0: no more blocks
    data = bytes(sparse) + bytes(ext) + b"d" * 1024 + member(f"{TOP}/after", b"ok") + END
    ts = TarStream(chunked(data, 333))
    ti = ts.next()
    assert ti is not None and ti.issparse() and ti.size == 99999
    after = ts.next()
    assert after is not None and after.name == f"{TOP}/after" and not after.issparse()
    assert b"".join(ts.data()) == b"ok"


@pytest.mark.parametrize(
    ("origsize", "match"),
    [
        (b"\x80" + (1 << 40).to_bytes(11, "big"), ""),  # base-256
        (b"not octal!\0", "invalid header at byte 0"),
    ],
    ids=["base-256", "invalid"],
)
def test_old_gnu_sparse_real_size(origsize: bytes, match: str) -> None:
    data = bytes(raw_header(f"{TOP}/h", tarfile.GNUTYPE_SPARSE, 0, at483=origsize)) + END
    if match:
        _fails(data, match)
    else:
        ti = TarStream(io.BytesIO(data)).next()
        assert ti is not None and ti.size == 1 << 40


def test_old_gnu_sparse_truncated_extension_block() -> None:
    data = bytes(raw_header(f"{TOP}/h", tarfile.GNUTYPE_SPARSE, 0, at482=b"\x01")) + b"\0" * 100
    _fails(data, "inside the sparse header at byte 0")


def test_pax_gnu_sparse_member_is_reported_sparse() -> None:
    data = (
        pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "5000"})
        + member(f"{TOP}/GNUSparseFile.0/holes.png", b"m" * 600)
        + member(f"{TOP}/after", b"ok")
        + END
    )
    ts = TarStream(io.BytesIO(data))
    ti = ts.next()
    assert ti is not None and ti.issparse() and ti.size == 5000
    after = ts.next()
    assert after is not None and after.name == f"{TOP}/after"


def test_unknown_types_keep_their_data_and_come_out_as_they_are() -> None:
    data = member(f"{TOP}/vol", b"v" * 700, kind=b"V") + member(f"{TOP}/after", b"1") + END
    rows = [(ti.name, ti.type) for ti in TarStream(io.BytesIO(data))]
    assert rows == [(f"{TOP}/vol", b"V"), (f"{TOP}/after", tarfile.REGTYPE)]


# ------------------------------------------------------------------ the end of the archive


GOOD = tar_bytes([dir_entry(TOP), Entry(f"{TOP}/a.json", b"{}")])
BODY = GOOD[: 3 * BLOCK]  # the two members, without the end-of-archive blocks
assert GOOD[3 * BLOCK :].count(0) == len(GOOD) - 3 * BLOCK


@pytest.mark.parametrize(
    "tail",
    [END, bytes(BLOCK), b"", bytes(BLOCK) + b"garbage after the end" * 100],
    ids=["two-zero-blocks", "one-zero-block", "no-end-blocks", "zero-block-then-garbage"],
)
def test_end_of_archive_variants(tail: bytes) -> None:
    ts = TarStream(chunked(BODY + tail, 100))
    assert [ti.name for ti in ts] == [TOP, f"{TOP}/a.json"]
    assert ts.ended and ts.next() is None


def test_drain_reads_to_the_end() -> None:
    ts = TarStream(chunked(GOOD, 1000))
    list(ts)
    at = ts.offset
    assert at == 3 * BLOCK + BLOCK  # the first zero block ends the archive
    assert ts.drain() == len(GOOD) - at and ts.offset == len(GOOD)
    assert ts.drain() == 0 and ts.next() is None


def _fails(data: bytes, match: str, *, read_data: bool = True) -> None:
    ts = TarStream(chunked(data, 100), name="x.tar.gz")
    with pytest.raises(CorruptArchiveError, match=match) as err:
        for _ in ts:
            if read_data:
                for _piece in ts.data():
                    pass
    assert str(err.value).startswith("x.tar.gz: broken tar stream")


def test_empty_stream() -> None:
    _fails(b"", "empty stream")


@pytest.mark.parametrize("cut", [1, 100, 511])
def test_truncated_header(cut: int) -> None:
    _fails(BODY + member(f"{TOP}/b", b"x")[:cut], "inside the header")


@pytest.mark.parametrize("read_data", [True, False], ids=["read", "skipped"])
def test_truncated_data(read_data: bool) -> None:
    data = member(f"{TOP}/big.png", b"d" * 5000)[: BLOCK + 3000]
    _fails(data, "ends inside 'covid19_posi/big.png'", read_data=read_data)


def test_truncated_padding() -> None:
    data = member(f"{TOP}/a.png", b"d" * 10)[: BLOCK + 100]
    _fails(data, "ends inside", read_data=False)


def test_bad_checksum() -> None:
    data = bytearray(GOOD)
    data[BLOCK + 5] ^= 1  # the second member's name
    _fails(bytes(data), "bad checksum at byte 512")


def test_bad_number() -> None:
    hdr = raw_header(f"{TOP}/a", tarfile.REGTYPE, 0, at124=b"9999999999\0")  # not octal
    _fails(bytes(hdr) + END, "at byte 0")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (member("././@LongLink", LONG.encode(), tarfile.GNUTYPE_LONGNAME), "ends after"),
        (member("././@LongLink", LONG.encode(), tarfile.GNUTYPE_LONGNAME) + END, "nothing follows"),
        (member("././@LongLink", LONG.encode(), tarfile.GNUTYPE_LONGNAME)[:600], "extended header"),
        (pax({"path": "p"})[: BLOCK + 5], "extended header"),
        (bytes(raw_header("././@LongLink", b"L", MAX_EXTENDED + 1)) + END, "extended header of"),
        (pax({"size": "-1"}) + member("x", b"") + END, "invalid pax size"),
        (pax({"size": "many"}) + member("x", b"") + END, "invalid pax size"),
        (raw_pax(b"99 path=abc\n"), "invalid pax header"),
        (raw_pax(b"12 path=abcX"), "invalid pax header"),
        (raw_pax(b"0 path=abcde\n"), "invalid pax header"),
    ],
    ids=[
        "longname-then-eof",
        "longname-then-end",
        "longname-truncated",
        "pax-truncated",
        "oversized",
        "negative-size",
        "bad-size",
        "record-too-long",
        "record-without-newline",
        "record-of-length-0",
    ],
)
def test_broken_extended_headers(data: bytes, match: str) -> None:
    _fails(data, match)
