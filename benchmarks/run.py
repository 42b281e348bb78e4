#!/usr/bin/env python3
"""Benchmark bimcv-fetch against the tools a user would otherwise chain.

    python benchmarks/run.py [--size 1GiB] [--archives 2] [--runs 5]
                             [--only ROWS] [--quick] [--keep]

Builds (once, cached under benchmarks/cache/) a sample release of about --size,
serves it on loopback (nginx for the archive bytes, the project's share server
for the listing and manifests), runs every row's sides alternately after a
warm-up, and writes results/latest.json and results/latest.md (--quick writes
results/quick.*). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _reexec_in_venv() -> None:
    """Run with the project's venv when started with a Python that lacks bimcv_fetch."""
    try:
        import bimcv_fetch  # noqa: F401
    except ImportError:
        venv = REPO / ".venv" / "bin" / "python"
        if venv.exists() and Path(sys.executable).resolve() != venv.resolve():
            os.execv(str(venv), [str(venv), str(Path(__file__).resolve()), *sys.argv[1:]])
        sys.exit(
            "bimcv_fetch is not importable: run with the project's venv (pip install -e '.[test]')"
        )


_reexec_in_venv()
sys.path.insert(0, str(HERE))

from harness import benches, machine, report  # noqa: E402
from harness.benches import Ctx, Row  # noqa: E402
from harness.sample import balanced_seed, builder_id, ensure_sample  # noqa: E402

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1GiB, 256MiB, 500MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text: str) -> float:
    return float(parse_size(text.upper().rstrip("/S") if text[-2:].lower() == "/s" else text))


def bimcv_fetch_command() -> list[str]:
    exe = Path(sys.executable).parent / "bimcv-fetch"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "bimcv_fetch"]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIMCV_FETCH_")}
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


# The anchors and the web server, by the Debian package that brings each.
TOOLS = {
    "nginx": "nginx",
    "aria2c": "aria2",
    "pigz": "pigz",
    "curl": "curl",
    "openssl": "openssl",
    "/usr/bin/time": "time",
}


def install_tools(echo: Callable[[str], None]) -> None:
    """On a fresh machine, install what the benchmark needs (root and apt-get only)."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        echo(f"missing {', '.join(missing)}; install them (apt-get install -y ...)")
        return
    echo(f"installing {', '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env, timeout=900)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmark bimcv-fetch against aria2c, curl, sha1sum, tar and pigz.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("1GiB"),
        help="total bytes of the sample's archives (1GiB, 256MiB, 500MB …)",
    )
    p.add_argument("--archives", type=int, default=2, help="subject archives in the sample")
    p.add_argument("--runs", type=int, default=5, help="paired rounds per row, after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per row (not counted)")
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="archives at a time for download rows (bimcv-fetch and anchors alike)",
    )
    p.add_argument(
        "--subjects-per-archive",
        type=int,
        default=16,
        help="subjects per sample archive (16 at 1 GiB gives 4-12 MB radiographs)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated rows: " + ",".join(benches.BENCHES + benches.OPTIONAL),
    )
    p.add_argument("--skip", default="", help="comma-separated rows to leave out")
    p.add_argument(
        "--scaling-rate",
        type=parse_rate,
        default=20e6,
        help="per-connection cap of the share server in the scaling row (bytes/s)",
    )
    p.add_argument("--scaling-archives", type=int, default=4, help="archives in the scaling row")
    p.add_argument(
        "--scaling-size",
        type=parse_size,
        default=None,
        help="bytes of the scaling row's archives (default: --size / 4)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="check the harness: 32 MiB, 1 pair, results/quick.* (about a minute)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="before each row, wait up to this many seconds for the machine to be < 15%% busy "
        "with other processes (the reading is recorded either way; 0: do not wait)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder at the end")
    p.add_argument(
        "--out",
        default=None,
        help="results name under benchmarks/results/ (default: latest, quick with --quick)",
    )
    p.add_argument(
        "--bimcv-fetch",
        dest="bimcv_fetch",
        default=None,
        help="command that runs bimcv-fetch (default: the venv's bimcv-fetch script)",
    )
    p.add_argument("--cache", type=Path, default=HERE / "cache", help="sample cache (git-ignored)")
    p.add_argument("--work", type=Path, default=HERE / "work", help="work folder (git-ignored)")
    args = p.parse_args(argv)

    if args.quick:
        if "--size" not in (argv or sys.argv):
            args.size = parse_size("32MiB")
        args.runs = 1
    out_name = args.out or ("quick" if args.quick else "latest")
    wanted = list(benches.BENCHES)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    skip = {w.strip() for w in args.skip.split(",") if w.strip()}
    wanted = [w for w in wanted if w not in skip]
    unknown = [w for w in wanted if w not in benches.BENCHES + benches.OPTIONAL]
    if unknown:
        p.error(f"unknown rows: {', '.join(unknown)}")

    t_start = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def echo(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    install_tools(echo)
    missing = [t for t in ("nginx", "bash", "xargs") if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install -y nginx aria2 pigz")

    # ---- disk
    args.work.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    need = 5 * args.size + 2 * args.size  # base + one run's archives and tree + samples
    if free < need:
        sys.exit(
            f"not enough space in {args.work}: {free / 2**30:.1f} GiB free, "
            f"about {need / 2**30:.1f} GiB needed"
        )

    # ---- samples
    t_build = time.monotonic()
    spa = max(2, args.subjects_per_archive)
    main_info = ensure_sample(args.cache, args.size, archives=args.archives, spa=spa, echo=echo)
    quarter = scaling = None
    scaling_names: list[str] = []
    ideal = None
    if "memory" in wanted:
        quarter = ensure_sample(
            args.cache, args.size // 4, archives=args.archives, spa=spa, echo=echo
        )
    if "scaling" in wanted:
        n = args.scaling_archives
        seed, picks, ideal = _cached_balanced_seed(args.cache, n, spa)
        probe = ensure_sample(args.cache, 1 << 20, archives=n + 2, spa=spa, seed=seed, echo=echo)
        frac = probe.bytes_of(picks) / probe.total_bytes
        target = args.scaling_size or max(args.size // 4, 8 << 20)
        scaling = ensure_sample(
            args.cache, int(target / frac), archives=n + 2, spa=spa, seed=seed, echo=echo
        )
        scaling_names = picks
    build_s = time.monotonic() - t_build
    echo(f"samples ready in {build_s:.1f} s: main {main_info.total_bytes / 2**20:.0f} MiB")

    session = args.work / "session"
    if session.exists():
        shutil.rmtree(session)
    session.mkdir(parents=True)
    bf = shlex.split(args.bimcv_fetch) if args.bimcv_fetch else bimcv_fetch_command()
    ctx = Ctx(
        repo=REPO,
        work=session,
        bf=bf,
        env=child_env(),
        runs=args.runs,
        warmup=args.warmup,
        jobs=args.jobs,
        echo=echo,
        main=main_info,
        quarter=quarter,
        scaling=scaling,
        scaling_archives=scaling_names,
        scaling_ideal=ideal,
        scaling_rate=args.scaling_rate,
    )
    desc = machine.describe(REPO, args.work, bf)
    rows: list[Row] = []
    by_key: dict[str, Row] = {}
    try:
        for key in wanted:
            echo(f"row {key}")
            if args.wait_idle > 0:
                busy = machine.wait_idle(0.15, args.wait_idle, echo)
            else:
                busy = machine.busy_fraction()
            if busy is not None:
                echo(f"  other processes keep the CPUs {busy:.0%} busy")
            t0 = time.monotonic()
            try:
                row = _run_row(ctx, key, by_key)
            except Exception as exc:  # a harness bug in one row must not lose the others
                row = Row(
                    key, key, status="failed", reason=f"harness error: {type(exc).__name__}: {exc}"
                )
                import traceback

                traceback.print_exc()
            row.seconds = time.monotonic() - t0
            row.info["busy_before"] = None if busy is None else round(busy, 3)
            row.info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            rows.append(row)
            by_key[key] = row
            for t in row.targets:
                echo(
                    f"  → {t.work} vs {t.anchor}: {t.measured} (target {t.target}) "
                    f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[t.met] }"
                )
            if row.status != "ok":
                echo(f"  → {row.status}: {(row.reason or '').strip().splitlines()[-1:]}")
    finally:
        ctx.close()
        if not args.keep:
            shutil.rmtree(session, ignore_errors=True)

    samples = {"main": main_info.describe()}
    if quarter is not None:
        samples["quarter"] = quarter.describe()
    if scaling is not None:
        samples["scaling"] = {
            **scaling.describe(),
            "chosen_archives": scaling_names,
            "ideal_ratio": ideal,
        }
    doc = {
        "command": "python benchmarks/run.py "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "started": started,
        "duration_s": round(time.monotonic() - t_start, 1),
        "build_s": round(build_s, 1),
        "config": {
            "size": args.size,
            "archives": args.archives,
            "runs": args.runs,
            "warmup": args.warmup,
            "jobs": args.jobs,
            "subjects_per_archive": spa,
            "rows": wanted,
            "quick": args.quick,
            "scaling_rate": args.scaling_rate,
            "protocol": "plain HTTP on loopback (no TLS)",
        },
        "machine": {**desc, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "samples": samples,
    }
    js, md = report.write(HERE / "results" / out_name, doc, rows)
    echo(
        f"wrote {js.relative_to(REPO)} and {md.relative_to(REPO)} "
        f"({(time.monotonic() - t_start) / 60:.1f} min)"
    )
    print()
    print(md.read_text().split("## Rows")[0])
    return 0


def _run_row(ctx: Ctx, key: str, done: dict[str, Row]) -> Row:
    if key == "download":
        return benches.bench_download(ctx)
    if key == "verify":
        return benches.bench_verify(ctx)
    if key == "extract":
        return benches.bench_extract(ctx)
    if key == "extract-ct":
        return benches.bench_extract_ct(ctx)
    if key == "download-extract":
        return benches.bench_download_extract(ctx)
    if key == "memory":
        return benches.bench_memory(ctx, done.get("download-extract"))
    if key == "scaling":
        return benches.bench_scaling(ctx)
    if key == "server":
        return benches.bench_server(ctx)
    raise KeyError(key)


def _cached_balanced_seed(cache: Path, n: int, spa: int) -> tuple[int, list[str], float]:
    import json

    path = cache / f"balanced-seed-a{n + 2}-spa{spa}-pick{n}-{builder_id()}.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        return int(raw["seed"]), list(raw["archives"]), float(raw["ideal"])
    seed, picks, ideal = balanced_seed(archives=n + 2, spa=spa, want=n, scratch=cache)
    path.write_text(json.dumps({"seed": seed, "archives": picks, "ideal": ideal}) + "\n")
    return seed, picks, ideal


if __name__ == "__main__":
    sys.exit(main())
