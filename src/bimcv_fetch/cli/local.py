"""Commands that need no share: sample, serve, demo."""

from __future__ import annotations

import os
from pathlib import Path

import click

from bimcv_fetch.catalog import load_catalog
from bimcv_fetch.cli.app import cli
from bimcv_fetch.progress import human_bytes, json_line

# ------------------------------------------------------------------ sample, serve


@cli.command("sample")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--release", default="posi-1-2", show_default=True, help="Release to imitate.")
@click.option(
    "--archives",
    type=click.IntRange(1, 600),
    default=3,
    show_default=True,
    help="Subject archives (their letters have gaps, as on the real share).",
)
@click.option("--subjects-per-archive", type=click.IntRange(1, 1000), default=2, show_default=True)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="The same seed gives byte-identical archives.",
)
@click.option(
    "--size-scale",
    type=click.FloatRange(0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiplies image sizes (1: kilobytes; 10000: GBs).",
)
@click.option("--json", "json_mode", is_flag=True, help="JSON lines on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors.")
def sample_cmd(
    folder: Path,
    release: str,
    archives: int,
    subjects_per_archive: int,
    seed: int,
    size_scale: float,
    json_mode: bool,
    verbose: bool,
) -> int:
    """Write a miniature release laid out exactly like the real share."""
    from bimcv_fetch.server import build_sample

    load_catalog().get(release)  # a clear error for an unknown id
    built = build_sample(
        folder,
        release=release,
        archives=archives,
        subjects_per_archive=subjects_per_archive,
        seed=seed,
        size_scale=size_scale,
    )
    total = sum(built.sizes.values())
    if json_mode:
        for name in built.files:
            json_line(
                {"event": "file", "name": name, "size": built.sizes[name], "sha1": built.sha1[name]}
            )
        json_line(
            {
                "event": "summary",
                "folder": str(built.root),
                "release": release,
                "files": len(built.files),
                "bytes": total,
            }
        )
    else:
        click.echo(
            f"wrote {len(built.files)} files ({human_bytes(total)}) of a {release} "
            f"sample into {built.root}"
        )
        click.echo(f"serve it with: bimcv-fetch serve {built.root} --release {release}")
    return 0


@cli.command("serve")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default)."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="0 picks a free port.",
)
@click.option("--token", default=None, help="Share token clients use (default: the release's).")
@click.option(
    "--release", default="posi-1-2", show_default=True, help="Release whose token is the default."
)
@click.option("--password", default="", help="Share password (default: none).")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--tls-self-signed",
    is_flag=True,
    help="Make a CA and a certificate for loopback; prints the CA path.",
)
@click.option(
    "--share-link",
    type=click.Choice(["direct", "zip"]),
    default="direct",
    show_default=True,
    help="Share-link mode: the file, or Nextcloud 31's zip.",
)
@click.option("--rate-limit", default=None, help="Bytes/s per connection, e.g. 20M.")
@click.option(
    "--faults",
    "faults_file",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="A fault plan (JSON or TOML) for testing clients.",
)
@click.option("--json", "json_mode", is_flag=True, help="One JSON line with URL and token.")
@click.option("-v", "--verbose", is_flag=True, help="Log every request (token masked).")
def serve_cmd(
    folder: Path,
    host: str,
    port: int,
    token: str | None,
    release: str,
    password: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_self_signed: bool,
    share_link: str,
    rate_limit: str | None,
    faults_file: Path | None,
    json_mode: bool,
    verbose: bool,
) -> int:
    """Serve a folder like b2drop's public share (a sample release or a mirror).

    FOLDER is a flat folder of share files, or a bimcv-fetch --dest folder, whose
    archives/ and manifests/ are then served together.
    """
    import logging

    from bimcv_fetch.server import FaultPlan, ShareServer, make_tls_files
    from bimcv_fetch.transfer import parse_rate

    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    root = _mirror_view(folder)
    tok = token or load_catalog().get(release).token
    tls = None
    ca: Path | None = None
    if tls_cert is not None and tls_key is not None:
        tls = (tls_cert, tls_key)
    elif tls_self_signed:
        import tempfile

        files = make_tls_files(Path(tempfile.mkdtemp(prefix="bimcv-fetch-tls-")))
        tls, ca = files.server_pair, files.ca
    server = ShareServer(
        root,
        token=tok,
        password=password,
        host=host,
        port=port,
        tls=tls,
        share_link_mode=share_link,  # type: ignore[arg-type]
        rate_limit=float(parse_rate(rate_limit)) if rate_limit else None,
        faults=FaultPlan.from_file(faults_file) if faults_file else None,
    )
    server.start()
    if json_mode:
        json_line(
            {
                "event": "serving",
                "url": server.url,
                "token": tok,
                "folder": str(folder),
                "ca": str(ca) if ca is not None else None,
                "password": bool(password),
            }
        )
        server.serve_forever()
        return 0
    click.echo(f"serving {folder} at {server.url}")
    click.echo(f"token: {tok}" + (" (password protected)" if password else ""))
    if ca is not None:
        click.echo(f"CA certificate: {ca}")
    ca_opt = f" --ca-bundle {ca}" if ca is not None else ""
    click.echo(f"try: bimcv-fetch list --server {server.url} --token {tok}{ca_opt}")
    click.echo("Ctrl-C stops the server.")
    server.serve_forever()
    return 0


@cli.command("demo")
@click.option(
    "--keep",
    type=click.Path(path_type=Path),
    default=None,
    help="Build in this folder and keep it (default: a temporary folder).",
)
@click.option("--archives", type=click.IntRange(1, 26), default=3, show_default=True)
@click.option("--subset", default=None, help="Extract only these modalities, e.g. CT.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors.")
def demo_cmd(keep: Path | None, archives: int, subset: str | None, verbose: bool) -> int:
    """Offline tour: build a sample release, serve it with TLS, download, extract, verify."""
    import shutil
    import tempfile

    from bimcv_fetch.server import ShareServer, build_sample, make_tls_files

    base = keep if keep is not None else Path(tempfile.mkdtemp(prefix="bimcv-fetch-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        click.echo(f"1. building a miniature posi-1-2 release in {base / 'share'}", err=True)
        sample = build_sample(base / "share", archives=archives, seed=0)
        tls = make_tls_files(base / "tls")
        server = ShareServer(sample.root, token=sample.token, tls=tls.server_pair)
        with server:
            click.echo(f"2. serving it like b2drop at {server.url} (TLS, test CA)", err=True)
            opts = [
                "--server",
                server.url,
                "--ca-bundle",
                str(tls.ca),
                "--dest",
                str(base / "dest"),
            ]
            if subset:
                opts += ["--subset", subset]
            steps = [
                ("3. bimcv-fetch list", ["list", *opts]),
                ("4. bimcv-fetch download --extract", ["download", *opts, "--extract"]),
            ]
            verify_opts = [o for o in opts if o not in ("--subset", subset)]
            steps.append(
                (
                    "5. bimcv-fetch verify --deep --tree --hash",
                    ["verify", *verify_opts, "--deep", "--tree", "--hash"],
                )
            )
            for title, args in steps:
                click.echo(f"\n{title}", err=True)
                rc = cli.main(args=args, prog_name="bimcv-fetch", standalone_mode=False)
                if rc:
                    click.echo(f"demo: step failed with exit code {rc}", err=True)
                    return int(rc)
        tree = base / "dest" / sample.release.top_folder
        click.echo(f"\n6. the MIDS tree in {tree}:", err=True)
        files = sorted(p for p in tree.rglob("*") if p.is_file())
        for line in _tree_lines(tree, limit=45):
            click.echo("   " + line)
        total = sum(p.stat().st_size for p in files)
        click.echo(
            f"\ndemo done: {len(files)} files, {human_bytes(total)}, downloaded over "
            f"HTTPS, SHA1-checked, extracted and audited.",
            err=True,
        )
        if keep is None:
            click.echo("(the demo folder is removed; --keep DIR keeps it)", err=True)
        return 0
    finally:
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)


def _tree_lines(root: Path, limit: int) -> list[str]:
    """An indented picture of a folder, at most ``limit`` lines."""
    lines: list[str] = [f"{root.name}/"]
    hidden = 0

    def walk(d: Path, depth: int) -> None:
        nonlocal hidden
        for p in sorted(d.iterdir(), key=lambda x: (x.is_file(), x.name)):
            if len(lines) >= limit:
                hidden += sum(1 for q in p.rglob("*") if q.is_file()) if p.is_dir() else 1
                continue
            pad = "    " * depth
            if p.is_dir():
                lines.append(f"{pad}{p.name}/")
                walk(p, depth + 1)
            else:
                lines.append(f"{pad}{p.name}  ({human_bytes(p.stat().st_size)})")

    walk(root, 1)
    if hidden:
        lines.append(f"… and {hidden} more files")
    return lines


def _mirror_view(folder: Path) -> Path:
    """A flat view of a --dest folder (hard links to archives/ and manifests/)."""
    archives, manifests = folder / "archives", folder / "manifests"
    if not (archives.is_dir() and manifests.is_dir()):
        return folder
    import shutil

    view = folder / ".bimcv-fetch" / "mirror"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for src_dir in (manifests, archives):
        for p in src_dir.iterdir():
            if not p.is_file() or p.name.startswith(".") or p.name == "share.json":
                continue
            if p.name.endswith((".part", ".part.state")):
                continue
            try:
                os.link(p, view / p.name)
            except OSError:
                shutil.copy2(p, view / p.name)
    return view
