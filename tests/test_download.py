"""`bimcv-fetch download` end to end against the local share server over real sockets."""

from __future__ import annotations

import hashlib
import signal
import subprocess
from pathlib import Path

import pytest

from bimcv_fetch.server import Fault, FaultPlan, SampleRelease, ShareServer, TlsFiles, build_sample

from .clirun import bimcv, spawn
from .helpers import wait_for_part


def _opts(server: ShareServer, dest: Path, *extra: str) -> list[str]:
    return ["--server", server.url, "--dest", str(dest), *extra]


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _assert_all_archives(sample: SampleRelease, dest: Path, names: list[str] | None = None) -> None:
    names = names or [*sample.subject_archives, *sample.metadata_archives]
    for name in names:
        path = dest / "archives" / name
        assert path.exists(), name
        assert _sha1(path) == sample.sha1[name], name
    leftovers = [p.name for p in (dest / "archives").iterdir() if p.name.endswith(".part")]
    assert not leftovers


@pytest.mark.parametrize("protocol", ["webdav", "dav", "https"])
def test_full_release_over_https_each_protocol(
    https_share_server: ShareServer,
    tls_files: TlsFiles,
    sample_release: SampleRelease,
    tmp_path: Path,
    protocol: str,
) -> None:
    dest = tmp_path / "d"
    r = bimcv(
        "download",
        *_opts(https_share_server, dest, "--ca-bundle", str(tls_files.ca)),
        "--protocol",
        protocol,
        "--json",
    )
    assert r.code == 0, r.err
    _assert_all_archives(sample_release, dest)
    s = r.summary()
    assert s["exit_code"] == 0 and s["ok"] == len(sample_release.subject_archives) + 3
    # Run again: nothing to fetch, every archive "have".
    again = bimcv(
        "download",
        *_opts(https_share_server, dest, "--ca-bundle", str(tls_files.ca)),
        "--protocol",
        protocol,
        "--json",
    )
    assert again.code == 0
    assert again.summary().get("have") == s["ok"]


def test_share_link_zip_is_refused(sample_release: SampleRelease, tmp_path: Path) -> None:
    with ShareServer(
        sample_release.root, token=sample_release.token, share_link_mode="zip"
    ) as server:
        r = bimcv("download", *_opts(server, tmp_path / "d"), "--protocol", "https")
    assert r.code == 3
    assert "--protocol webdav" in r.err
    assert not list((tmp_path / "d" / "archives").glob("*.tar.gz"))


def test_dry_run_moves_no_byte(share_server: ShareServer, tmp_path: Path) -> None:
    r = bimcv("download", *_opts(share_server, tmp_path / "d"), "--dry-run", "--json")
    assert r.code == 0, r.err
    plan = [o for o in r.json_lines() if o["event"] == "plan"]
    assert plan and all(p["action"] == "fetch" for p in plan)
    assert r.summary()["to_fetch"] == sum(p["packed"] for p in plan)
    archive_gets = [
        rec
        for rec in share_server.requests.snapshot()
        if rec.method == "GET" and rec.path.endswith(".tar.gz")
    ]
    assert archive_gets == []


def test_subset_ct_skips_archive_without_ct(
    share_server: ShareServer, sample_release: SampleRelease, tmp_path: Path
) -> None:
    dest = tmp_path / "d"
    r = bimcv("download", *_opts(share_server, dest), "--subset", "CT")
    assert r.code == 0, r.err
    assert sample_release.no_ct_archive is not None
    assert not (dest / "archives" / sample_release.no_ct_archive).exists()
    wanted = [n for n in sample_release.subject_archives if n != sample_release.no_ct_archive]
    _assert_all_archives(sample_release, dest, [*wanted, *sample_release.metadata_archives])


def test_shards_cover_the_plan_exactly_once(
    share_server: ShareServer, sample_release: SampleRelease, tmp_path: Path
) -> None:
    dest = tmp_path / "shared"
    seen: list[str] = []
    for k in (1, 2, 3):
        r = bimcv("download", *_opts(share_server, dest), "--shard", f"{k}/3", "--json")
        assert r.code == 0, r.err
        seen += [o["archive"] for o in r.json_lines() if o["event"] == "plan"]
    everything = [*sample_release.subject_archives, *sample_release.metadata_archives]
    assert sorted(seen) == sorted(everything)
    _assert_all_archives(sample_release, dest)
    bad = bimcv("download", *_opts(share_server, dest), "--shard", "4/3")
    assert bad.code == 2  # a usage error


def test_keep_going_finishes_others_and_returns_worst(
    sample_release: SampleRelease, tmp_path: Path
) -> None:
    victim = sample_release.subject_archives[0]
    faults = FaultPlan().add(victim, Fault("flip_byte", offset=100), times=4)
    with ShareServer(sample_release.root, token=sample_release.token, faults=faults) as server:
        r = bimcv("download", *_opts(server, tmp_path / "d"), "--keep-going", "--json")
    assert r.code == 5
    assert sample_release.sha1[victim] in r.err  # expected hash named
    others = [n for n in sample_release.subject_archives if n != victim]
    _assert_all_archives(
        sample_release, tmp_path / "d", [*others, *sample_release.metadata_archives]
    )
    assert not (tmp_path / "d" / "archives" / victim).exists()


def test_not_enough_space_exit_7(share_server: ShareServer, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if ok.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        r = bimcv("download", *_opts(share_server, mnt / "d"))
        assert r.code == 7
        assert "GiB free" in r.err and "Traceback" not in r.err
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.fixture
def big_sample(tmp_path_factory: pytest.TempPathFactory) -> SampleRelease:
    return build_sample(tmp_path_factory.mktemp("big") / "share", archives=2, seed=7, size_scale=40)


def test_kill_9_then_rerun_resumes_and_refetches_nothing_twice(
    big_sample: SampleRelease, tmp_path: Path
) -> None:
    dest = tmp_path / "d"
    with ShareServer(big_sample.root, token=big_sample.token, rate_limit=1_500_000) as server:
        proc = spawn("download", *_opts(server, dest), "--jobs", "1", "-q")
        part = wait_for_part(dest, 300_000, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        sizes = {
            p.name[: -len(".part")]: p.stat().st_size for p in (dest / "archives").glob("*.part")
        }
        assert part.name[: -len(".part")] in sizes
        server.requests.clear()
        r = bimcv("download", *_opts(server, dest), "--jobs", "1")
        assert r.code == 0, r.err
        for name, size in sizes.items():
            gets = server.requests.for_file(name)
            assert gets, name
            assert gets[0].range == f"bytes={size}-", gets[0]
    _assert_all_archives(big_sample, dest)


def test_ctrl_c_keeps_part_and_exits_130(big_sample: SampleRelease, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    with ShareServer(big_sample.root, token=big_sample.token, rate_limit=1_000_000) as server:
        proc = spawn("download", *_opts(server, dest), "--jobs", "2")
        biggest = max(big_sample.subject_archives, key=lambda n: big_sample.sizes[n])
        wait_for_part(dest, 100_000, proc, name=biggest)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "rerun" in err
        assert list((dest / "archives").glob("*.part")), sorted(
            p.name for p in (dest / "archives").iterdir()
        )
        r = bimcv("download", *_opts(server, dest))
        assert r.code == 0, r.err
    _assert_all_archives(big_sample, dest)


def test_second_run_on_same_dest_exits_8(big_sample: SampleRelease, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    with ShareServer(big_sample.root, token=big_sample.token, rate_limit=1_000_000) as server:
        first = spawn("download", *_opts(server, dest), "--jobs", "4", "-q")
        try:
            wait_for_part(dest, 50_000, first)
            second = bimcv("download", *_opts(server, dest), "--jobs", "4")
            assert second.code == 8, second.err
            assert f"pid {first.pid}" in second.err
        finally:
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=30)
        assert first.returncode == 130
        final = bimcv("download", *_opts(server, dest))
        assert final.code == 0, final.err
    _assert_all_archives(big_sample, dest)


def test_stale_lock_of_dead_process_is_taken_over(
    share_server: ShareServer, sample_release: SampleRelease, tmp_path: Path
) -> None:
    import json
    import socket

    dest = tmp_path / "d"
    name = sample_release.subject_archives[0]
    lock = dest / ".bimcv-fetch" / "locks" / f"{name}.lock"
    lock.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    r = bimcv("download", *_opts(share_server, dest))
    assert r.code == 0, r.err
    _assert_all_archives(sample_release, dest)


def test_extract_of_archives_not_downloaded_is_exit_3(
    share_server: ShareServer, sample_release: SampleRelease, tmp_path: Path
) -> None:
    dest = tmp_path / "d"
    assert bimcv("download", *_opts(share_server, dest), "--subset", "CT").code == 0
    ct = bimcv("extract", "--dest", dest, "--subset", "CT")
    assert ct.code == 0, ct.err
    everything = bimcv("extract", "--dest", dest, "--json")
    assert everything.code == 3
    assert everything.summary()["not_downloaded"] == [sample_release.no_ct_archive]


def test_archive_without_published_sha1_is_kept_not_refetched(
    sample_release: SampleRelease, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "share"
    shutil.copytree(sample_release.root, root)
    orphan = sample_release.subject_archives[-1]
    for name in sample_release.checksum_files:
        path = root / name
        lines = [ln for ln in path.read_text().splitlines(True) if orphan not in ln]
        path.write_text("".join(lines))
    dest = tmp_path / "d"
    with ShareServer(root, token=sample_release.token) as server:
        first = bimcv("download", *_opts(server, dest))
        assert first.code == 0, first.err
        assert "no published SHA1" in first.err
        assert (dest / "archives" / orphan).read_bytes() == (root / orphan).read_bytes()
        server.requests.clear()
        again = bimcv("download", *_opts(server, dest))
        assert again.code == 0, again.err
        assert server.requests.for_file(orphan) == []
    assert (dest / "archives" / orphan).exists()
