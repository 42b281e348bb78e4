"""`bimcv-fetch serve` as users run it: a sample folder, then a --dest folder as a mirror."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from bimcv_fetch.server import SampleRelease

from .clirun import bimcv, spawn


def _serve(*args: str | Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = spawn("serve", *args, "--json")
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server prints it once it listens
    assert line, proc.communicate(timeout=10)
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)


def test_serve_sample_then_mirror_a_dest(sample_release: SampleRelease, tmp_path: Path) -> None:
    proc, info = _serve(sample_release.root, "--tls-self-signed", "--token", "my-token")
    try:
        assert str(info["url"]).startswith("https://127.0.0.1:")
        assert info["token"] == "my-token"
        dest = tmp_path / "d"
        r = bimcv(
            "download",
            "--server",
            info["url"],
            "--token",
            "my-token",
            "--ca-bundle",
            info["ca"],
            "--dest",
            dest,
        )
        assert r.code == 0, r.err
    finally:
        _stop(proc)
    # The downloaded --dest is itself a mirror: archives/ and manifests/ served together.
    proc, info = _serve(dest)
    try:
        r = bimcv("download", "--server", info["url"], "--dest", tmp_path / "d2", "--json")
        assert r.code == 0, r.err
        assert r.summary()["ok"] == len(sample_release.archives)
    finally:
        _stop(proc)
    for name in sample_release.archives:
        assert (tmp_path / "d2" / "archives" / name).read_bytes() == (
            sample_release.root / name
        ).read_bytes()


def test_serve_bad_folder_is_usage_error(tmp_path: Path) -> None:
    r = bimcv("serve", tmp_path / "nope")
    assert r.code == 2
