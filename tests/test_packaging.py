"""medfed as users install it: the built wheel in a fresh virtual environment, no editable paths.

The wheel is built from a copy of exactly the files pyproject.toml names (its package folders,
README, license files), as the Dockerfile copies them, so a stale build/ or an untracked file in
the checkout cannot reach it. The fresh environment gets medfed from the wheel only; the already
installed dependencies are made visible by a plain path line in a .pth file, which adds the test
environment's site-packages to sys.path without running the .pth files there (the editable
install's finder among them).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from medfed.common.config_checks import validate
from medfed.common.config_loading import load_yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
CONFIGS = sorted(path.name for path in (ROOT / "simulations" / "configs").glob("*.yaml"))


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "MEDFED_OFFLINE": "1"}


def _run(args: list, *, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([str(arg) for arg in args], capture_output=True, text=True, cwd=cwd,
                          env=_env(), timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel, install it into a fresh venv; the venv's paths and the build's output."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    setuptools = PYPROJECT["tool"]["setuptools"]
    named = {"pyproject.toml", PYPROJECT["project"]["readme"],
             *PYPROJECT["project"]["license-files"], *setuptools["package-dir"].values()}
    for name in named:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "-w", base / "dist", "."], cwd=source)
    wheel, = (base / "dist").glob("medfed-*.whl")

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          wheel], cwd=base)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=base).stdout.strip())
    (site / "medfed-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Outside the repository, so no checkout folder can be picked up from the working directory.
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return {"wheel": wheel, "build_output": build.stdout + build.stderr, "venv": venv,
            "python": python, "site": site, "cwd": elsewhere}


def test_wheel_builds_without_warnings_and_carries_license_and_configs(installed):
    output = installed["build_output"]
    assert "warn" not in output.lower(), output
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = set(wheel.namelist())
        dist_info = f"medfed-{VERSION}.dist-info"
        meta = wheel.read(f"{dist_info}/METADATA").decode()
        license_text = wheel.read(f"{dist_info}/licenses/LICENSE").decode()
    assert {"medfed/__init__.py", "medfed/__main__.py", "medfed/cli/main.py"} <= names
    assert {f"medfed/simulations/configs/{name}" for name in CONFIGS} <= names
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text


def test_medfed_is_imported_from_the_wheel_not_the_checkout(installed):
    done = _run([installed["python"], "-c",
                 "import json, medfed, medfed.cli.main as m; "
                 "print(json.dumps([medfed.__file__, m.__file__, medfed.__version__]))"],
                cwd=installed["cwd"])
    package, cli, version = json.loads(done.stdout)
    site = installed["site"]
    assert Path(package) == site / "medfed" / "__init__.py"
    assert Path(cli) == site / "medfed" / "cli" / "main.py"
    assert version == VERSION


def test_version_from_the_script_and_python_m(installed):
    script = _run([installed["venv"] / "bin" / "medfed", "--version"], cwd=installed["cwd"])
    module = _run([installed["python"], "-m", "medfed", "--version"], cwd=installed["cwd"])
    assert script.stdout == module.stdout
    lines = script.stdout.splitlines()
    assert lines[0] == f"medfed {VERSION}"
    # The libraries medfed runs with: the versions installed, from their metadata.
    for name, line in zip(("flwr", "torch", "timm", "opacus"), lines[1:5]):
        assert line == f"{name} {metadata.version(name)}"
    assert lines[-1] == f"python {platform.python_version()}"


def test_simulate_help_from_the_installed_script(installed):
    done = _run([installed["venv"] / "bin" / "medfed", "simulate", "--help"],
                cwd=installed["cwd"])
    assert "Usage: medfed simulate" in done.stdout
    assert "--config" in done.stdout and "--set" in done.stdout


def test_packaged_configs_load_and_validate(installed):
    """Every YAML config ships in the wheel and gives the same validated config as the checkout's."""
    code = (
        "import json\n"
        "from importlib.resources import as_file, files\n"
        "from medfed.common.config_checks import validate\n"
        "from medfed.common.config_loading import load_yaml\n"
        "found = {}\n"
        "for entry in files('medfed.simulations.configs').iterdir():\n"
        "    if entry.name.endswith('.yaml'):\n"
        "        with as_file(entry) as path:\n"
        "            found[entry.name] = json.loads(validate(load_yaml(path)).to_json())\n"
        "print(json.dumps(found))\n"
    )
    done = _run([installed["python"], "-c", code], cwd=installed["cwd"])
    packaged = json.loads(done.stdout)
    assert sorted(packaged) == CONFIGS and CONFIGS
    for name in CONFIGS:
        expected = json.loads(validate(load_yaml(ROOT / "simulations" / "configs" / name)).to_json())
        assert packaged[name] == expected, name
