"""Run the real command line in a subprocess (a fresh interpreter, real exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def summary(self) -> dict[str, Any]:
        lines = [o for o in self.json_lines() if o.get("event") == "summary"]
        assert lines, self.out
        return lines[-1]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("BIMCV_FETCH_")}
    # The tests must not depend on the machine's CA bundle variable.
    e.pop("REQUESTS_CA_BUNDLE", None)
    e.pop("CURL_CA_BUNDLE", None)
    e["REQUESTS_CA_BUNDLE"] = "/nonexistent/ca-bundle.pem"  # would break any request using it
    return e


def bimcv(*args: str | Path, timeout: float = 120, cwd: Path | None = None) -> Run:
    r = subprocess.run(
        [sys.executable, "-m", "bimcv_fetch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=cwd,
    )
    return Run(r.returncode, r.stdout, r.stderr)


def spawn(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bimcv_fetch", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
