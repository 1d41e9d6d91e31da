"""The real ``hfedmoe`` command: in a child process, as a user runs it (:func:`run_cli`), or in
this process through typer's test runner (:func:`invoke_cli`), which answers in milliseconds
instead of a Python start-up and is what most bad-input checks use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.results.run_state import load_run_state


def _cli_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hfedmoe", *args],
        capture_output=True,
        text=True,
        env=_cli_env(),
        cwd=cwd,
        timeout=timeout,
    )


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """``hfedmoe ARGS`` in this process; the result reads like :func:`run_cli`'s."""
    from hfedmoe.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(
        ["hfedmoe", *args], result.exit_code, result.stdout, result.stderr
    )


def kill_when(args: list[str], moment: Callable[[], bool], delay: float = 0.0) -> None:
    """Start ``hfedmoe ARGS``, SIGKILL it once ``moment()`` holds (polled every 10 ms) plus
    ``delay``: a crash at a chosen point of a real run."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hfedmoe", *args],
        env=_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not moment():
            assert proc.poll() is None, "the run ended before the moment to kill it"
            assert time.monotonic() < deadline, "the moment to kill never came"
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def checkpoint_round(run_dir: Path) -> int:
    """The round of ``run_dir``'s checkpoint; -1 while there is none that loads."""
    try:
        return load_run_state(run_dir).round
    except HFedMoEError:
        return -1
