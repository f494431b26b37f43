"""The `medfed` command line: the app, its commands, and the console script's entry point.

The commands live by concern: simulations (`cli.simulation_commands`) and a federation across
hospitals (`cli.deployment_commands`).
"""

from __future__ import annotations

import sys

import typer

from medfed.cli.deployment_commands import certs_app, client, data_app, server_app, status
from medfed.cli.simulation_commands import bench, report, simulate

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated fine-tuning of pretrained CNNs for medical imaging.")


def print_version(value: bool) -> None:
    if value:
        from medfed.common.versions import versions

        typer.echo("\n".join(f"{name} {found}" for name, found in versions().items()))
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=print_version,
                                 help="Show the versions of medfed, Flower, torch, timm and "
                                      "Opacus, and exit."),
) -> None:
    """medfed: one diagnostic classifier trained across hospitals; no image leaves its site."""


app.command()(simulate)
app.command()(bench)
app.add_typer(data_app, name="data")
app.add_typer(certs_app, name="certs")
app.add_typer(server_app, name="server")
app.command()(status)
app.command()(client)
app.command()(report)


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
