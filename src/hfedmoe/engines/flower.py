"""Launching the apps on Flower's own engines with ``flwr run``: the Ray simulation (the
``local`` connection, a SuperLink that ``flwr`` starts and keeps running) or a deployment (a
SuperLink named in ``$FLWR_HOME/config.toml``, with SuperNodes on the devices).

The experiment config is parsed and validated once, here, and travels in the run config as
JSON (``hfedmoe-config``), so every process of every engine trains exactly the same job. The
run config is a file in the run directory; ``flwr run --run-config`` reads it. See
docs/DEPLOYMENT.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w

from hfedmoe.federation import wire
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import HFedMoEError

RUN_CONFIG_FILE = "flower-run-config.toml"
#: the connection `flwr` defines by default: a managed local SuperLink running the simulation
LOCAL = "local"


def app_dir() -> Path:
    """The Flower App directory (this repository's root, whose pyproject.toml names the apps)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise HFedMoEError("--app-dir: cannot find hfedmoe's pyproject.toml; pass --app-dir")
    return root


def write_run_config(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """``RUN_DIR/flower-run-config.toml``: the values of ``[tool.flwr.app.config]`` for a run."""
    path = run_dir / RUN_CONFIG_FILE
    values = {wire.RUN_CONFIG: cfg.to_json(), wire.RUN_DIR: str(run_dir.resolve())}
    path.write_text(tomli_w.dumps(values))
    return path


def flwr_command(
    app: Path,
    connection: str,
    run_config: Path,
    supernodes: int | None = None,
    cpus_per_client: int | None = None,
) -> list[str]:
    """The ``flwr run`` command line. ``supernodes`` / ``cpus_per_client``: the simulation's
    federation config (for ``local``: the run's clients, 1 CPU each)."""
    cmd = [_flwr(), "run", str(app), connection, "--run-config", str(run_config), "--stream"]
    options = []
    if supernodes is not None:
        options.append(f"num-supernodes={supernodes}")
    if cpus_per_client is not None:
        options.append(f"client-resources-num-cpus={cpus_per_client}")
    if options:
        cmd += ["--federation-config", " ".join(options)]
    return cmd


def flwr_environment() -> dict[str, str]:
    """The environment ``flwr`` needs: this Python's scripts first on PATH (flwr starts
    flower-superlink, flwr-serverapp, flwr-clientapp, flwr-simulation by name), no
    per-run dependency installation, no hub, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for key in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "HF_HUB_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def run_flower(cmd: list[str], run_dir: Path) -> dict:
    """Run ``cmd`` (from a neutral directory: a managed SuperLink keeps the working directory
    it was started in) and return the run's summary. ``flwr run --stream`` exits 0 even when
    the ServerApp fails, so success is the summary the ServerApp writes at its end."""
    proc = subprocess.run(cmd, env=flwr_environment(), cwd=tempfile.gettempdir(), check=False)
    summary = run_dir / "summary.json"
    if proc.returncode != 0 or not summary.is_file():
        raise HFedMoEError(
            f"the Flower run did not finish (flwr exit status {proc.returncode}, no "
            f"{summary}); its ServerApp log: `flwr log RUN_ID {cmd[3]} --show`"
        )
    return json.loads(summary.read_text())


def _flwr() -> str:
    local = Path(sys.executable).parent / "flwr"
    found = str(local) if local.is_file() else shutil.which("flwr")
    if found is None:
        raise HFedMoEError("flwr: the Flower CLI is not installed (pip install flwr)")
    return found
