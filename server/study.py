"""The study `medfed server start` runs: its inputs checked and resolved before any process
starts or anything is written.

The checks run cheapest first, and the model check (which loads timm and torch, seconds on a
small machine) last, so a mistyped option is answered at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from medfed.common.config import Config
from medfed.common.config_checks import check_deployment, resolve, study_classes, validate
from medfed.common.config_loading import load_yaml, parse_assignment, set_value
from medfed.common.errors import MedfedError
from medfed.common.flower_commands import check_tls_folder
from medfed.server.certs import CA_CERT, SERVER_CERT, SERVER_KEY, read_sites
from medfed.server.proxy import nginx_executable
from medfed.server.run_files import CONFIG_FILE

# Beyond the rounds themselves: ServerApp start-up, the sites' roll call, the final evaluation.
DEADLINE_MARGIN_S = 600.0


@dataclass
class Study:
    """Everything `medfed server start` checked before starting any process."""

    config: Config
    run_dir: Path
    sites: dict[str, Path]
    certs: Path | None   # None: --insecure
    host: str            # where the proxy listens for the sites
    port: int
    min_sites: int
    wait_s: float
    resume: bool

    @property
    def deadline_s(self) -> float:
        f = self.config.federation
        # Every round trains and evaluates, each bounded by round_timeout; then one final evaluation.
        return self.wait_s + (2 * f.rounds + 1) * f.round_timeout + DEADLINE_MARGIN_S


def prepare(*, config_file: Path | None, assignments: list[str], certs: Path | None,
            sites_file: Path | None, out: Path | None, resume: Path | None, insecure: bool,
            host: str, port: int, min_sites: int | None, wait: str) -> Study:
    """Check the inputs of `medfed server start`; nothing is started or written here."""
    if resume is not None:
        if config_file is not None:
            raise MedfedError("--resume continues a run with its own config.yaml; leave out --config "
                              "(more rounds: --set federation.rounds=N)")
        if out is not None:
            raise MedfedError("--resume RUN_DIR is the run directory; leave out --out")
        run_dir = resume
        config_file = run_dir / CONFIG_FILE
        if not config_file.is_file():
            raise MedfedError(f"cannot resume {run_dir}: it has no {CONFIG_FILE} (not a `medfed server "
                              f"start` run directory)")
    elif config_file is None:
        raise MedfedError("--config is required: the study's YAML (with data.classes), e.g. "
                          "--config study.yaml")
    config = load_yaml(config_file)
    for assignment in assignments:
        set_value(config, *parse_assignment(assignment))
    validate(config)
    classes = study_classes(config)
    if resume is None:
        run_dir = out or Path(config.out or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}")
        if run_dir.exists() and not run_dir.is_dir():
            raise MedfedError(f"--out {run_dir} is an existing file; give a folder that does not "
                              f"exist yet")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise MedfedError(f"run directory {run_dir} already exists and is not empty; choose another "
                              f"--out, or continue it with --resume {run_dir}")

    check_tls_folder(certs, insecure=insecure, needed=(CA_CERT, SERVER_CERT, SERVER_KEY),
                     hint=f"give the folder `medfed certs init --out {certs or 'certs/'} --server-host "
                          f"HOST --sites ...` wrote")
    if sites_file is None:
        if certs is None:
            raise MedfedError("--sites is required: the sites.yaml that names the sites")
        sites_file = certs / "sites.yaml"
    sites = read_sites(sites_file)
    min_sites = len(sites) if min_sites is None else min_sites
    if not 1 <= min_sites <= len(sites):
        raise MedfedError(f"--min-sites {min_sites}: must be between 1 and the {len(sites)} sites "
                          f"in {sites_file}")
    check_deployment(config, sites=len(sites), min_sites=min_sites)
    if not 1 <= port <= 65535:
        raise MedfedError(f"--port {port}: must be between 1 and 65535")
    nginx_executable()
    wait_s = parse_duration(wait, option="--wait-sites")
    from medfed.common.model import check_model  # timm: seconds, so last

    config = resolve(config)  # the image size the server and every site resize to, fixed here
    check_model(config.model, num_classes=len(classes), image_size=config.data.image_size,
                seed=config.seed, dp=config.privacy.dp)
    if resume is None:
        config.out = str(run_dir.resolve())  # a resumed run keeps its config, `out` included
    return Study(config=config, run_dir=run_dir.resolve(), sites=sites,
                 certs=None if certs is None else certs.resolve(), host=host, port=port,
                 min_sites=min_sites, wait_s=wait_s,
                 resume=resume is not None)


def parse_duration(text: str, *, option: str) -> float:
    """`90`, `90s`, `10m`, `1.5h` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise MedfedError(f"{option} {text!r}: expected a duration such as 90s, 10m or 1h")
    return seconds
