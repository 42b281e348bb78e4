"""The bench rows: bimcv-fetch against the tools a user would otherwise chain.

Each row runs its sides alternately (see :func:`harness.measure.run_pairs`),
after warm-up rounds, on fresh output folders, and compares bimcv-fetch with
each anchor pair by pair (``bimcv-fetch ÷ anchor``, wall time; CPU alongside).

A bimcv-fetch command that does not exist yet (``bimcv-fetch CMD --help``
fails, or the option is not in its help) makes its row "not available"; a
command that exists but fails makes the row "failed" with the end of its
output. Neither stops the other rows.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.measure import Measurement, Side, SideResult, paired_ratios, run_pairs, summary
from harness.sample import SampleInfo
from harness.servers import Stack

MiB = 2**20


# --------------------------------------------------------------------------- results


@dataclass
class Target:
    work: str
    anchor: str
    target: str  # as shown: "≤ 0.8"
    measured: str = "—"
    value: float | None = None
    met: bool | None = None  # None: not measured
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Comparison:
    anchor: str  # side key
    wall: dict[str, float] | None  # summary of the paired ratios bimcv-fetch ÷ anchor
    cpu: dict[str, float] | None
    pairs: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "anchor": self.anchor,
            "wall_ratio": self.wall,
            "cpu_ratio": self.cpu,
            "wall_ratio_per_pair": [round(x, 4) for x in self.pairs],
        }


@dataclass
class Row:
    key: str
    title: str
    status: str = "ok"  # ok | not available | failed
    reason: str | None = None
    sides: list[SideResult] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 1),
            "sides": [s.to_json() for s in self.sides],
            "comparisons": [c.to_json() for c in self.comparisons],
            "targets": [t.to_json() for t in self.targets],
            "notes": self.notes,
            "info": self.info,
        }


# --------------------------------------------------------------------------- context


@dataclass
class Ctx:
    repo: Path
    work: Path
    bf: list[str]  # how to run bimcv-fetch
    env: dict[str, str]
    runs: int
    warmup: int
    jobs: int
    echo: Callable[[str], None]
    main: SampleInfo
    quarter: SampleInfo | None = None
    scaling: SampleInfo | None = None
    scaling_archives: list[str] = field(default_factory=list)
    scaling_ideal: float | None = None
    scaling_rate: float = 20e6
    stacks: dict[str, Stack] = field(default_factory=dict)
    base: Path | None = None  # a finished bimcv-fetch download of the main sample
    base_error: str | None = None
    _help: dict[str, str | None] = field(default_factory=dict)

    # ---- bimcv-fetch

    def help(self, sub: str) -> str | None:
        """``bimcv-fetch SUB --help``, or None when SUB does not exist."""
        if sub not in self._help:
            try:
                r = subprocess.run(
                    [*self.bf, sub, "--help"],
                    capture_output=True,
                    text=True,
                    env=self.env,
                    timeout=60,
                )
                self._help[sub] = r.stdout if r.returncode == 0 else None
            except (OSError, subprocess.SubprocessError):
                self._help[sub] = None
        return self._help[sub]

    def has(self, sub: str, *options: str) -> str | None:
        """None when ``bimcv-fetch SUB`` exists with every option; else why not."""
        text = self.help(sub)
        if text is None:
            return f"`bimcv-fetch {sub}` does not exist in this checkout"
        missing = [o for o in options if not _has_option(text, o)]
        if missing:
            return f"`bimcv-fetch {sub}` has no {', '.join(missing)} option yet"
        return None

    def opt(self, sub: str, option: str) -> bool:
        text = self.help(sub)
        return text is not None and _has_option(text, option)

    def bf_cmd(self, sub: str, *, server: str | None, dest: Path, extra: list[str]) -> list[str]:
        argv = [*self.bf, sub]
        if self.opt(sub, "--quiet"):
            argv.append("-q")
        if server is not None and self.opt(sub, "--server"):
            argv += ["--server", server]
        argv += ["--dest", str(dest), *extra]
        return argv

    # ---- paths

    @property
    def timeout(self) -> float:
        return 120 + self.main.total_bytes / (4 * MiB)

    def run_dir(self, name: str) -> Path:
        return self.work / "run" / name

    def scripts(self) -> Path:
        d = self.work / "scripts"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stack(self, name: str) -> Stack:
        st = self.stacks.get(name)
        if st is not None:
            return st
        if name == "main":
            info, nginx, rate = self.main, True, None
        elif name == "quarter":
            assert self.quarter is not None
            info, nginx, rate = self.quarter, True, None
        elif name == "scaling":
            assert self.scaling is not None
            info, nginx, rate = self.scaling, False, self.scaling_rate
        else:
            raise KeyError(name)
        st = Stack(info.path, info.token, self.work / f"nginx-{name}", nginx=nginx, rate_limit=rate)
        st.__enter__()
        self.stacks[name] = st
        return st

    def close(self) -> None:
        for st in self.stacks.values():
            st.__exit__(None, None, None)
        self.stacks.clear()

    def pairs(self, name: str, sides: list[Side], runs: int | None = None) -> list[SideResult]:
        return run_pairs(
            sides,
            runs=self.runs if runs is None else runs,
            warmup=self.warmup,
            log_dir=self.work / "logs",
            timeout=self.timeout,
            env=self.env,
            echo=self.echo,
            name=name,
        )


def _has_option(help_text: str, option: str) -> bool:
    return any(tok.strip(",") == option for tok in help_text.replace("/", " ").split())


def _rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _fresh(path: Path) -> None:
    _rm(path)
    path.mkdir(parents=True)


def tree_stats(path: Path) -> dict[str, Any]:
    files = size = 0
    if path.exists():
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                files += 1
                size += p.stat().st_size
    return {"files": files, "bytes": size}


def which(tool: str) -> str | None:
    return None if shutil.which(tool) else f"`{tool}` is not installed"


def _need(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y aria2 pigz nginx)"
    return None


def _write_script(ctx: Ctx, name: str, body: str) -> Path:
    path = ctx.scripts() / name
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return path


def _webdav(url: str) -> str:
    return f"{url}/public.php/webdav"


def _sums_list(info: SampleInfo, names: list[str], path: Path, sep: str = " ") -> Path:
    path.write_text("".join(f"{info.sha1[a]}{sep}{a}\n" for a in names))
    return path


# --------------------------------------------------------------------------- comparisons


def compare(row: Row, results: list[SideResult]) -> None:
    row.sides = results
    bf = results[0]
    if bf.status == "not available":
        row.status, row.reason = "not available", bf.reason
        return
    if bf.status == "failed":
        row.status, row.reason = "failed", bf.reason
    for other in results[1:]:
        wall = paired_ratios(bf, other, "wall")
        cpu = paired_ratios(bf, other, "cpu")
        row.comparisons.append(Comparison(other.key, summary(wall), summary(cpu), wall))


def ratio_target(
    row: Row, work: str, anchor_key: str, anchor_label: str, limit: float, *, note: str = ""
) -> Target:
    t = Target(work, anchor_label, f"≤ {limit:g}", note=note)
    comp = next((c for c in row.comparisons if c.anchor == anchor_key), None)
    if comp is not None and comp.wall is not None:
        w = comp.wall
        t.value = w["median"]
        t.measured = f"{w['median']:.2f} ({w['min']:.2f}–{w['max']:.2f})"
        t.met = w["median"] <= limit
    else:
        anchor = next((s for s in row.sides if s.key == anchor_key), None)
        why = row.reason if row.status != "ok" else (anchor.reason if anchor else None)
        t.measured = f"{row.status if row.status != 'ok' else 'anchor missing'}"
        if why:
            t.note = (t.note + " " if t.note else "") + _short(why)
    row.targets.append(t)
    return t


def _short(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --------------------------------------------------------------------------- setup


def ensure_base(ctx: Ctx) -> Path | None:
    """A finished ``bimcv-fetch download`` of the main sample (for verify and extract)."""
    if ctx.base is not None or ctx.base_error is not None:
        return ctx.base
    from harness.measure import run_measured

    base = ctx.work / "base"
    _rm(base)
    why = ctx.has("download", "--dest")
    if why:
        ctx.base_error = why
        return None
    st = ctx.stack("main")
    argv = ctx.bf_cmd("download", server=st.url, dest=base, extra=["--jobs", str(ctx.jobs)])
    m = run_measured(
        argv, log=ctx.work / "logs" / "base-download.log", timeout=ctx.timeout, env=ctx.env
    )
    if m.rc != 0:
        ctx.base_error = f"the base download failed: {_short(m.error or '')}"
        return None
    stamps = base / ".bimcv-fetch" / "verified"
    snap = ctx.work / "base-verified-stamps"
    _rm(snap)
    if stamps.is_dir():
        shutil.copytree(stamps, snap)
    ctx.echo(f"  base download for verify/extract: {m.wall:.1f} s")
    ctx.base = base
    return base


def _restore_stamps(ctx: Ctx) -> None:
    assert ctx.base is not None
    stamps = ctx.base / ".bimcv-fetch" / "verified"
    snap = ctx.work / "base-verified-stamps"
    if snap.is_dir():
        _rm(stamps)
        shutil.copytree(snap, stamps)


def _drop_receipts(ctx: Ctx) -> None:
    assert ctx.base is not None
    _rm(ctx.base / ".bimcv-fetch" / "receipts")
    _rm(ctx.base / ctx.main.top_folder)  # a tree extracted into DEST (no --out)


# --------------------------------------------------------------------------- rows


def bench_download(ctx: Ctx) -> Row:
    info = ctx.main
    row = Row("download", f"download + SHA1 of every archive, {ctx.jobs} at a time")
    st = ctx.stack("main")
    dav = _webdav(st.url)
    names = info.archives

    d_bf = ctx.run_dir("dl-bimcv-fetch")
    bf = Side(
        "bimcv-fetch",
        f"bimcv-fetch download --jobs {ctx.jobs}",
        lambda: ctx.bf_cmd("download", server=st.url, dest=d_bf, extra=["--jobs", str(ctx.jobs)]),
        prepare=lambda: _rm(d_bf),
        inspect=lambda: tree_stats(d_bf / "archives"),
        cleanup=lambda: _rm(d_bf),
        unavailable=ctx.has("download", "--jobs"),
    )

    d_aria = ctx.run_dir("dl-aria2c")
    inp = ctx.scripts() / "aria2c-input.txt"
    inp.write_text(
        "".join(f"{dav}/{a}\n  out={a}\n  checksum=sha-1={info.sha1[a]}\n" for a in names)
    )
    aria = Side(
        "aria2c",
        f"aria2c -j{ctx.jobs} -x1 --checksum=sha-1=… (input file)",
        lambda: [
            "aria2c",
            f"--input-file={inp}",
            f"--dir={d_aria}",
            f"-j{ctx.jobs}",
            "-x1",
            "-s1",
            f"--http-user={info.token}",
            "--http-passwd=",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--console-log-level=warn",
            "--summary-interval=0",
            "--quiet=true",
        ],
        prepare=lambda: _fresh(d_aria),
        inspect=lambda: tree_stats(d_aria),
        cleanup=lambda: _rm(d_aria),
        unavailable=_need("aria2c"),
    )

    d_curl = ctx.run_dir("dl-curl")
    lst = _sums_list(info, names, ctx.scripts() / "download-list.txt")
    script = _write_script(
        ctx,
        "curl-sha1sum.sh",
        "D=$1; LIST=$2; export TOKEN=$3 BASE=$4; P=$5\n"
        'mkdir -p "$D"; cd "$D"\n'
        'xargs -P "$P" -n 2 bash -c \'curl -sSf -u "$TOKEN:" -o "$2" "$BASE/$2" '
        '&& echo "$1  $2" | sha1sum -c --quiet -\' _ < "$LIST"\n',
    )
    curl = Side(
        "curl+sha1sum",
        f"curl -o f && sha1sum -c (per archive, {ctx.jobs} at a time, xargs -P{ctx.jobs})",
        lambda: [str(script), str(d_curl), str(lst), info.token, dav, str(ctx.jobs)],
        prepare=lambda: _rm(d_curl),
        inspect=lambda: tree_stats(d_curl),
        cleanup=lambda: _rm(d_curl),
        unavailable=_need("curl", "sha1sum", "xargs"),
    )
    compare(row, ctx.pairs("download", [bf, aria, curl]))
    ratio_target(row, "download + SHA1", "aria2c", f"`aria2c -j{ctx.jobs} -x1 --checksum`", 0.8)
    row.notes.append(
        "bimcv-fetch does the PROPFIND listing and fetches sha1sums*.txt and every "
        ".tar-tvf.txt listing in each run; the anchors are handed the SHA1s. "
        "bimcv-fetch fsyncs each archive before its rename (every 256 MiB and at the end); "
        "aria2c and curl do not fsync."
    )
    return row


def bench_verify(ctx: Ctx) -> Row:
    info = ctx.main
    row = Row("verify", "verify: SHA1 of every downloaded archive (page cache warm)")
    why = ctx.has("verify", "--dest")
    base = ensure_base(ctx) if why is None else None
    if why is None and base is None:
        why = ctx.base_error
    st = ctx.stack("main")
    sums = _sums_list(info, info.archives, ctx.scripts() / "sha1sums-archives.txt", "  ")
    stamps = (base or ctx.work / "base") / ".bimcv-fetch" / "verified"
    bf = Side(
        "bimcv-fetch",
        "bimcv-fetch verify (verified stamps deleted before each run)",
        lambda: ctx.bf_cmd("verify", server=st.url, dest=base or Path("."), extra=[]),
        prepare=lambda: _rm(stamps),
        inspect=lambda: {"stamps": len(list(stamps.glob("*.json"))) if stamps.is_dir() else 0},
        unavailable=why,
    )
    sha = Side(
        "sha1sum",
        "sha1sum -c (archives listed in sha1sums.txt)",
        lambda: [
            "bash",
            "-c",
            f"cd {shlex.quote(str(base))}/archives && sha1sum -c --quiet {shlex.quote(str(sums))}",
        ],
        unavailable=_need("sha1sum"),
    )
    sides = [bf, sha] if why is None else [bf]
    compare(row, ctx.pairs("verify", sides))
    if base is not None:
        _restore_stamps(ctx)
    ratio_target(row, "verify", "sha1sum", "`sha1sum -c`", 0.55)
    bfr = row.sides[0]
    ok = [m for m in bfr.runs if m.rc == 0]
    if ok:
        cpu = min(m.cpu for m in ok)
        floor = info.total_bytes / (4 * 2**30)  # SHA1 above 4 GB/s per core is implausible
        if cpu < floor:
            row.notes.append(
                f"WARNING: bimcv-fetch verify used {cpu:.2f} s of CPU for "
                f"{info.total_bytes / MiB:.0f} MiB — it may not have rehashed the archives"
            )
    return row


def _extract_sides(
    ctx: Ctx, key: str, subset: str | None, anchors: list[tuple[str, str, str]], names: list[str]
) -> tuple[Row, list[Side]]:
    """bimcv-fetch extract (whole or --subset) and tar anchors over ``names``."""
    info = ctx.main
    title = "extract every archive" if subset is None else f"extract --subset {subset}"
    row = Row(key, title)
    opts = ["--dest"] + (["--subset"] if subset else [])
    why = ctx.has("extract", *opts)
    base = ensure_base(ctx) if why is None else None
    if why is None and base is None:
        why = ctx.base_error
    out_bf = ctx.run_dir(f"{key}-bimcv-fetch")
    use_out = ctx.opt("extract", "--out")
    tree_bf = out_bf if use_out else (base or Path(".")) / info.top_folder

    def bf_argv() -> list[str]:
        extra = ["--out", str(out_bf)] if use_out else []
        if subset:
            extra += ["--subset", subset]
        return ctx.bf_cmd(
            "extract", server=ctx.stack("main").url, dest=base or Path("."), extra=extra
        )

    def bf_prepare() -> None:
        _rm(out_bf)
        _drop_receipts(ctx)
        _restore_stamps(ctx)

    def bf_cleanup() -> None:
        _rm(out_bf)
        _drop_receipts(ctx)

    sides = [
        Side(
            "bimcv-fetch",
            f"bimcv-fetch extract{' --subset ' + subset if subset else ''}"
            " (fresh --out, receipts deleted before each run)",
            bf_argv,
            prepare=bf_prepare,
            inspect=lambda: tree_stats(tree_bf),
            cleanup=bf_cleanup,
            unavailable=why,
        )
    ]
    script = _write_script(
        ctx,
        "extract-loop.sh",
        'MODE=$1; O=$2; shift 2\nmkdir -p "$O"\n'
        'for f in "$@"; do\n'
        '  if [ "$MODE" = pigz ]; then tar -I pigz -xf "$f" -C "$O"\n'
        '  else tar -xzf "$f" -C "$O"; fi\n'
        "done\n",
    )
    for akey, mode, label in anchors:
        out = ctx.run_dir(f"{key}-{akey}")
        tools = ("tar", "pigz") if mode == "pigz" else ("tar", "gzip")
        sides.append(
            Side(
                akey,
                label,
                lambda out=out, mode=mode: [
                    str(script),
                    mode,
                    str(out),
                    *(str((base or Path(".")) / "archives" / a) for a in names),
                ],
                prepare=lambda out=out: _rm(out),
                inspect=lambda out=out: tree_stats(out),
                cleanup=lambda out=out: _rm(out),
                unavailable=_need(*tools),
            )
        )
    if why is not None:
        sides = sides[:1]
    return row, sides


def bench_extract(ctx: Ctx) -> Row:
    info = ctx.main
    row, sides = _extract_sides(
        ctx,
        "extract",
        None,
        [
            ("tar-pigz", "pigz", "tar -I pigz -xf (archives one after another)"),
            ("tar-xzf", "gz", "tar xzf (archives one after another)"),
        ],
        info.archives,
    )
    compare(row, ctx.pairs("extract", sides))
    ratio_target(row, "extract all", "tar-pigz", "`tar -I pigz -xf`", 0.9)
    ratio_target(row, "extract all", "tar-xzf", "`tar xzf`", 0.5)
    return row


def bench_extract_ct(ctx: Ctx) -> Row:
    info = ctx.main
    names = [*info.ct_archives, *info.metadata_archives]
    row, sides = _extract_sides(
        ctx,
        "extract-ct",
        "CT",
        [("tar-xzf", "gz", "tar xzf of the archives holding CT (+ metadata archives)")],
        names,
    )
    compare(row, ctx.pairs("extract-ct", sides))
    ratio_target(row, "extract CT only", "tar-xzf", "`tar xzf` of the archive", 0.4)
    ct = sum(info.ct_bytes.values())
    read = info.bytes_of(names)
    row.notes.append(
        f"The anchor unpacks {len(names)} archives ({read / MiB:.0f} MiB packed); "
        f"the CT images in them are {ct / MiB:.0f} MiB "
        f"({100 * ct / max(1, sum(info.unpacked[a] for a in names)):.0f}% of their unpacked bytes)."
    )
    return row


def _download_extract_bf(ctx: Ctx, name: str, stack: str) -> Side:
    st = ctx.stack(stack)
    d = ctx.run_dir(f"{name}-bimcv-fetch")
    out = d / "out"
    use_out = ctx.opt("download", "--out")

    def argv() -> list[str]:
        extra = ["--extract", "--jobs", str(ctx.jobs)]
        if use_out:
            extra += ["--out", str(out)]
        return ctx.bf_cmd("download", server=st.url, dest=d / "dest", extra=extra)

    return Side(
        "bimcv-fetch",
        f"bimcv-fetch download --extract --jobs {ctx.jobs}",
        argv,
        prepare=lambda: _rm(d),
        inspect=lambda: tree_stats(out if use_out else d / "dest" / ctx.main.top_folder),
        cleanup=lambda: _rm(d),
        unavailable=ctx.has("download", "--extract", "--jobs"),
    )


def bench_download_extract(ctx: Ctx) -> Row:
    info = ctx.main
    row = Row("download-extract", f"download --extract (one pass), {ctx.jobs} archives at a time")
    st = ctx.stack("main")
    bf = _download_extract_bf(ctx, "dlx", "main")
    d = ctx.run_dir("dlx-chain")
    lst = _sums_list(info, info.archives, ctx.scripts() / "download-list.txt")
    script = _write_script(
        ctx,
        "curl-openssl-pigz.sh",
        "export D=$1/archives O=$1/out; LIST=$2; export TOKEN=$3 BASE=$4; P=$5\n"
        'mkdir -p "$D" "$O"\n'
        'xargs -P "$P" -n 2 bash -c \'set -e; f="$D/$2"; '
        'curl -sSf -u "$TOKEN:" -o "$f" "$BASE/$2"; '
        'h=$(openssl dgst -sha1 -r "$f"); [ "${h:0:40}" = "$1" ]; '
        'tar -I pigz -xf "$f" -C "$O"\' _ < "$LIST"\n',
    )
    chain = Side(
        "curl+openssl+pigz",
        "curl -o f && openssl dgst -sha1 f && tar -I pigz -xf f "
        f"(per archive, {ctx.jobs} at a time)",
        lambda: [str(script), str(d), str(lst), info.token, _webdav(st.url), str(ctx.jobs)],
        prepare=lambda: _rm(d),
        inspect=lambda: tree_stats(d / "out"),
        cleanup=lambda: _rm(d),
        unavailable=_need("curl", "openssl", "tar", "pigz", "xargs"),
    )
    compare(row, ctx.pairs("download-extract", [bf, chain]))
    ratio_target(
        row,
        "download --extract",
        "curl+openssl+pigz",
        "curl + openssl sha1 + `tar -I pigz`, in sequence per archive",
        0.8,
    )
    row.notes.append(
        f"Both sides work on {ctx.jobs} archives at a time (bimcv-fetch --jobs {ctx.jobs}; "
        f"the chain through xargs -P{ctx.jobs}) and keep the archives on disk."
    )
    return row


def bench_memory(ctx: Ctx, full_row: Row | None) -> Row:
    """Peak RSS of download --extract at the full size and at a quarter of it."""
    row = Row("memory", f"peak memory of download --extract --jobs {ctx.jobs}, two sample sizes")
    assert ctx.quarter is not None
    full_runs: list[Measurement] = []
    if full_row is not None and full_row.sides and full_row.sides[0].status == "ok":
        full_runs = [m for m in full_row.sides[0].runs if m.rc == 0]
        full_res = full_row.sides[0]
    if not full_runs:
        full_res = ctx.pairs(
            "memory-full", [_download_extract_bf(ctx, "mem-full", "main")], runs=3
        )[0]
        full_runs = [m for m in full_res.runs if m.rc == 0]
    quarter = ctx.pairs(
        "memory-quarter", [_download_extract_bf(ctx, "mem-quarter", "quarter")], runs=3
    )[0]
    quarter.key = "bimcv-fetch (¼ size)"
    full_res = SideResult(
        "bimcv-fetch (full size)",
        full_res.label,
        full_res.status,
        full_res.reason,
        full_res.warmup,
        full_res.runs,
        full_res.inspect,
    )
    row.sides = [full_res, quarter]
    t = Target(
        f"peak memory, download --extract with {ctx.jobs} jobs",
        "—",
        "≤ 100 MiB, flat as archives grow",
    )
    full_runs = [m for m in full_runs if m.maxrss_kib >= 0]
    q_runs = [m for m in quarter.runs if m.rc == 0 and m.maxrss_kib >= 0]
    if full_runs and q_runs:
        full_peak = max(m.maxrss_mib for m in full_runs)
        q_peak = max(m.maxrss_mib for m in q_runs)
        growth = full_peak / q_peak
        t.value = full_peak
        t.measured = (
            f"{full_peak:.0f} MiB at {ctx.main.total_bytes / MiB:.0f} MiB, "
            f"{q_peak:.0f} MiB at {ctx.quarter.total_bytes / MiB:.0f} MiB (×{growth:.2f})"
        )
        t.met = full_peak <= 100 and growth <= 1.15
        t.note = "flat = peak grows ≤ 15% for 4× the bytes; peak = max over the runs"
        row.info = {"full_peak_mib": full_peak, "quarter_peak_mib": q_peak, "growth": growth}
    else:
        bad = full_res if not full_runs else quarter
        row.status = "not available" if bad.status == "not available" else "failed"
        row.reason = bad.reason
        t.measured = row.status
        t.note = _short(bad.reason or "")
    row.targets.append(t)
    return row


def bench_scaling(ctx: Ctx) -> Row:
    info = ctx.scaling
    assert info is not None
    names = ctx.scaling_archives
    rate = ctx.scaling_rate
    n = len(names)
    row = Row(
        "scaling",
        f"parallel scaling: {n} archives, share server capped at {rate / 1e6:g} MB/s "
        "per connection",
    )
    st = ctx.stack("scaling")
    sides = []
    for jobs in (n, 1):
        d = ctx.run_dir(f"scale-{jobs}")
        sides.append(
            Side(
                f"jobs {jobs}",
                f"bimcv-fetch download --archives … --jobs {jobs}",
                lambda d=d, jobs=jobs: ctx.bf_cmd(
                    "download",
                    server=st.url,
                    dest=d,
                    extra=["--jobs", str(jobs), "--archives", ",".join(names)],
                ),
                prepare=lambda d=d: _rm(d),
                inspect=lambda d=d: tree_stats(d / "archives"),
                cleanup=lambda d=d: _rm(d),
                unavailable=ctx.has("download", "--jobs", "--archives"),
            )
        )
    results = ctx.pairs("scaling", sides)
    row.sides = results
    fast, slow = results
    t = Target(f"{n} throttled archives, `--jobs {n}` vs `--jobs 1`", "—", "≥ 3.5× throughput")
    ratios = paired_ratios(slow, fast, "wall")  # throughput(jobs n) ÷ throughput(jobs 1)
    total = info.bytes_of(names)
    row.info = {
        "archives": {a: info.sizes[a] for a in names},
        "bytes": total,
        "ideal_ratio_sum_over_max": ctx.scaling_ideal,
        "rate_per_connection": rate,
        "seconds_at_cap_jobs_1": total / rate,
        "seconds_at_cap_jobs_n": max(info.sizes[a] for a in names) / rate,
    }
    if ratios:
        s = summary(ratios)
        assert s is not None
        row.comparisons.append(
            Comparison("jobs 1", s, summary(paired_ratios(slow, fast, "cpu")), ratios)
        )
        t.value = s["median"]
        t.measured = f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})"
        t.met = s["median"] >= 3.5
        fs = fast.stats()["wall_s"]
        if fs is not None:
            row.info["throughput_jobs_n_MBps"] = total / fs["median"] / 1e6
        ss = slow.stats()["wall_s"]
        if ss is not None:
            row.info["throughput_jobs_1_MBps"] = total / ss["median"] / 1e6
    else:
        bad = fast if fast.status != "ok" else slow
        row.status = bad.status if bad.status != "ok" else "failed"
        row.reason = bad.reason
        t.measured = row.status
        t.note = _short(bad.reason or "")
    t.note = (t.note + " " if t.note else "") + (
        f"ideal for these sizes (sum/max) {ctx.scaling_ideal:.2f}×; wall time includes start-up"
        if ctx.scaling_ideal
        else ""
    )
    row.targets.append(t)
    row.notes.append(
        f"The {n} archives are served by the project's share server (not nginx), each "
        f"response capped at {rate / 1e6:g} MB/s. Ratio = wall(jobs 1) ÷ wall(jobs {n}) "
        "pair by pair, i.e. the throughput ratio (same bytes)."
    )
    return row


def bench_server(ctx: Ctx) -> Row:
    """Informational: the same bimcv-fetch download from nginx and from the share server."""
    row = Row("server", "download from nginx vs from the project's share server (informational)")
    st = ctx.stack("main")
    sides = []
    for key, url in (("via nginx", st.url), ("via share server", st.share.url)):
        d = ctx.run_dir(f"srv-{key.split()[-1]}")
        sides.append(
            Side(
                key,
                f"bimcv-fetch download --jobs {ctx.jobs} ({key})",
                lambda d=d, url=url: ctx.bf_cmd(
                    "download", server=url, dest=d, extra=["--jobs", str(ctx.jobs)]
                ),
                prepare=lambda d=d: _rm(d),
                cleanup=lambda d=d: _rm(d),
                unavailable=ctx.has("download", "--jobs"),
            )
        )
    compare(row, ctx.pairs("server", sides))
    row.notes.append(
        "Ratio < 1 means the share server (cheroot, Python, in the harness process) is slower "
        "than nginx; that is why every other row serves the archive bytes with nginx."
    )
    return row


BENCHES = ("download", "verify", "extract", "extract-ct", "download-extract", "memory", "scaling")
OPTIONAL = ("server",)
