"""The files through which medfed drives Flower's own tools: the app `flwr run` bundles (a
pyproject.toml only: medfed is installed, so the bundle carries no code, and a site's app guard
refuses any that does) and the connection config that points `flwr` at the study's SuperLink."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import tomli_w

from medfed.server.certs import CA_CERT
from medfed.server.run_files import CONFIG_FILE
from medfed.server.study import Study

CONNECTION = "medfed"


def write_connection(study: Study, flwr_home: Path, *, port: int) -> None:
    """The Flower config that points `flwr` at this SuperLink's loopback port (a private
    FLWR_HOME per run, so the user's own ~/.flwr is neither read nor changed)."""
    connection: dict = {"address": f"127.0.0.1:{port}"}
    if study.certs is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(study.certs / CA_CERT)
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def write_app(study: Study) -> Path:
    """The Flower app `flwr run` bundles: components and run config only."""
    app_dir = study.run_dir / "flower-app"
    app_dir.mkdir(exist_ok=True)
    project = {
        "project": {"name": "medfed-study", "version": version("medfed"),
                    "description": "medfed federated study (ServerApp and ClientApp from the "
                                   "installed medfed package)"},
        "tool": {"flwr": {"app": {
            "publisher": "medfed",
            "components": {"serverapp": "medfed.server.app:app",
                           "clientapp": "medfed.client.app:app"},
            "config": {
                "config-path": str(study.run_dir / CONFIG_FILE),
                "run-dir": str(study.run_dir),
                "resume": study.resume,
                "min-sites": study.min_sites,
                "wait-sites-s": float(study.wait_s),
                "expected-sites": ",".join(study.sites),
                "registered": study.certs is not None,
            },
        }}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app_dir
