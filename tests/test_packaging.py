"""The built wheel carries the catalog and the console entry points work."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .clirun import bimcv

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_catalog(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("bimcv_fetch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bimcv_fetch/_data/releases.toml" in names
    assert "bimcv_fetch/py.typed" in names
    # Import from the wheel alone (zipimport): the packaged catalog is found.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import bimcv_fetch.catalog as c;"
        "assert c.__file__.startswith(sys.argv[1]), c.__file__;"
        "print(sorted(c.load_catalog().releases))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(wheel)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "posi-1-2" in out.stdout


def test_version_and_module_entry() -> None:
    r = bimcv("--version")
    assert r.code == 0 and "bimcv-fetch" in r.out
    assert bimcv("releases", "--json").summary()["releases"] == 4


def test_usage_error_exit_2() -> None:
    r = bimcv("download", "--jobs", "0")
    assert r.code == 2
    r = bimcv("no-such-command")
    assert r.code == 2
