"""The commands of a federation across hospitals: `medfed data check`, `medfed certs init`,
`medfed server start`, `medfed status` and `medfed client`.

Flower, the server and the client are imported inside each command, so bad input is answered
before they load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medfed.cli.errors import INTERRUPTED, fail
from medfed.common.errors import MedfedError

data_app = typer.Typer(no_args_is_help=True, help="Look at a site's own data; nothing leaves this machine.")


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(..., help="Folder with one subfolder per class, or a CSV manifest."),
    out: Path = typer.Option(Path("data-check.json"), help="Where to write the JSON summary."),
    classes: Optional[str] = typer.Option(None, help="The federation's classes, comma-separated; "
                                                     "other labels are reported."),
    frame: Optional[int] = typer.Option(None, help="Frame of multi-frame DICOM (default: the middle one)."),
) -> None:
    """Check a site's images before joining: counts, unreadable files, duplicates, DICOM summary,
    patient leakage. Exits 1 when the data cannot be used as it is."""
    from medfed.client.data_check import check, render
    from medfed.common.files import write_json

    try:
        summary = check(path, classes=classes.split(",") if classes else None, frame=frame)
        write_json(out, summary)
    except MedfedError as exc:
        fail(exc, code=2)
    typer.echo(render(summary))
    typer.echo(f"summary written to {out}")
    if not summary["usable"]:
        raise typer.Exit(1)


certs_app = typer.Typer(no_args_is_help=True, help="Key material of a deployed federation.")


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(..., help="Folder for the CA, server certificate, site keys and sites.yaml."),
    server_host: str = typer.Option(..., help="Host name (or IP) the sites use to reach the server."),
    sites: str = typer.Option(..., help="Site names, comma-separated, e.g. hospital-a,hospital-b."),
    force: bool = typer.Option(False, "--force", help="Replace existing keys (locks out every site "
                                                      "holding the old ones)."),
) -> None:
    """Create a private CA, the SuperLink's TLS certificate and one authentication key pair per
    site. Give each hospital its own folder OUT/<site>/; keep OUT/ca.key offline."""
    from medfed.server.certs import init_certs

    try:
        made = init_certs(out, server_host=server_host, sites=sites.split(","), force=force)
    except MedfedError as exc:
        fail(exc, code=2)
    typer.echo(f"CA {made['ca']}; server certificate {made['server_cert']} for {server_host}, "
               f"localhost and 127.0.0.1")
    for site, folder in made["sites"].items():
        typer.echo(f"site {site}: send {folder}/ to that hospital (its key stays there)")
    typer.echo(f"sites allowed to join: {made['sites_file']}")


server_app = typer.Typer(no_args_is_help=True, help="The federation's server (a Flower SuperLink).")


@server_app.command("start")
def server_start(
    config: Optional[Path] = typer.Option(None, help="The study's YAML config (must set data.classes)."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: section.key=value."),
    certs: Optional[Path] = typer.Option(None, help="Folder written by `medfed certs init`."),
    sites: Optional[Path] = typer.Option(None, help="sites.yaml: the sites allowed to join "
                                                    "(default: CERTS/sites.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (must not exist yet)."),
    wait_sites: str = typer.Option("10m", help="How long to wait for the sites before round 1 "
                                               "(e.g. 90s, 10m, 1h)."),
    min_sites: Optional[int] = typer.Option(None, help="Start with this many sites when not all "
                                                       "joined in time (default: all)."),
    resume: Optional[Path] = typer.Option(None, help="Continue this run directory from its checkpoint."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no site authentication (tests only)."),
    host: str = typer.Option("0.0.0.0", help="Address the sites connect to (nginx, passing Flower's "
                                             "Fleet API only; the SuperLink itself stays on loopback)."),
    port: int = typer.Option(9092, help="Port the sites connect to (--superlink HOST:PORT)."),
) -> None:
    """Run a study across hospitals: start the SuperLink, admit the sites in sites.yaml, run the
    medfed ServerApp, write the report, stop. Exit 0 done, 1 run failed, 2 bad input, 130 Ctrl-C."""
    from medfed.common.interrupts import interrupt_on_sigterm
    from medfed.server.study import prepare
    from medfed.server.superlink import RunFailed, serve

    interrupt_on_sigterm()
    try:
        study = prepare(config_file=config, assignments=set_, certs=certs, sites_file=sites, out=out,
                        resume=resume, insecure=insecure, host=host, port=port,
                        min_sites=min_sites, wait=wait_sites)
        report = serve(study, progress=typer.echo)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        raise typer.Exit(130) from None
    except RunFailed as exc:
        fail(exc, code=1)
    except MedfedError as exc:
        fail(exc, code=2)
    print_study_summary(study.run_dir, report)


def status(target: Path = typer.Argument(..., help="At the coordinator: the run directory of a "
                                                    "running `medfed server start`. At a site: its "
                                                    "audit log (supernode-<site>.audit.jsonl).")) -> None:
    """At the coordinator, what the study's SuperLink knows now: its runs and which sites are
    online. At a site, every message it ran for the server and what it sent back."""
    from medfed.client.audit import render
    from medfed.server.superlink import status as superlink_status

    try:
        typer.echo("\n".join(render(target) if target.is_file() else superlink_status(target)))
    except MedfedError as exc:
        fail(exc, code=2)


def client(
    site: str = typer.Option(..., help="This site's name, as in the server's sites.yaml."),
    data: Path = typer.Option(..., help="This site's images: a folder with one subfolder per class, "
                                        "a CSV manifest, or an npz with train/val/test splits."),
    superlink: str = typer.Option(..., help="The server's HOST:PORT, e.g. fl.example.org:9092."),
    certs: Optional[Path] = typer.Option(None, help="This site's folder from `medfed certs init` "
                                                    "(ca.crt, node-auth.key)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no authentication (tests only)."),
    log_file: Optional[Path] = typer.Option(None, help="The SuperNode's log (default: "
                                                       "supernode-<site>.log)."),
    connect_timeout: float = typer.Option(120.0, help="Seconds to wait for the SuperLink to accept "
                                                      "this site."),
    state_dir: Optional[Path] = typer.Option(
        None, help="Where the site keeps what it computes once: its decoded images, frozen "
                   "features and privacy spend (default: medfed-state-<site>/ beside the log). "
                   "Never sent anywhere."),
) -> None:
    """Join a federation: check this site's data, then run its Flower SuperNode until Ctrl-C.
    Images never leave this machine; only model updates and metrics do."""
    from medfed.client.supernode import ConnectFailed, check_data, prepare, run
    from medfed.common.interrupts import interrupt_on_sigterm

    interrupt_on_sigterm()
    try:
        prepared = prepare(site=site, data=data, superlink=superlink, certs=certs, insecure=insecure,
                           log=log_file, connect_timeout=connect_timeout, state_dir=state_dir)
        typer.echo(f"{site}: {check_data(prepared.data)} in {prepared.data}")
        if insecure:
            typer.echo("WARNING: --insecure: no TLS and no authentication; model updates travel in "
                       "plaintext. For tests only.")
        run(prepared, progress=typer.echo)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; {site} left the federation", err=True)
        raise typer.Exit(130) from None
    except ConnectFailed as exc:
        fail(exc, code=1)
    except MedfedError as exc:
        fail(exc, code=2)


def print_study_summary(run_dir: Path, report: dict) -> None:
    from medfed.common.document import markdown_block
    from medfed.server.report import metrics_table

    final = report["final"]
    typer.echo(f"\nfinal model from round {final['model_round']}; test metrics per site:")
    typer.echo(markdown_block(metrics_table(final["sites"])))
    typer.echo(f"\nrun directory: {run_dir}  (report.md, report.json, metrics.csv, global_model.pt)")
