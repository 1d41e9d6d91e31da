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


def run_to_the_end(
    run_dir: Path, *args: str, cli: Callable[..., subprocess.CompletedProcess] = run_cli
) -> Path:
    """``hfedmoe run ARGS -o RUN_DIR`` (``--resume RUN_DIR`` without ARGS), which must end
    well; RUN_DIR."""
    where = ["-o", str(run_dir)] if args else ["--resume", str(run_dir)]
    proc = cli("run", *args, *where, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _await(proc: subprocess.Popen, moment: Callable[[], bool]) -> None:
    """Poll ``moment()`` every 10 ms while ``proc`` runs, for at most 300 s."""
    deadline = time.monotonic() + 300
    while not moment():
        assert proc.poll() is None, "the run ended before the moment came"
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.01)


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
        _await(proc, moment)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


#: ``hfedmoe ARGS`` in a child that sends itself a signal as it calls MODULE:FUNCTION for the
#: Nth time, before that call runs
_SIGNALLED_AT_CALL = """
import importlib, os, signal, sys
from hfedmoe.cli import main
# Ctrl-C as at a terminal: a test run started in the background (an asynchronous list of a
# shell without job control, as `make test &` is) inherits SIGINT ignored, and Python then
# never raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
(module, name), nth, signum = sys.argv[1].split(":"), int(sys.argv[2]), int(sys.argv[3])
owner = importlib.import_module(module)
real, calls = getattr(owner, name), 0
def counted(*args, **kwargs):
    global calls
    calls += 1
    if calls == nth:
        os.kill(os.getpid(), signum)
    return real(*args, **kwargs)
setattr(owner, name, counted)
sys.argv = ["hfedmoe", *sys.argv[4:]]
main()
"""


def _signal_at_call(
    args: list[str], target: str, nth: int, signum: int
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _SIGNALLED_AT_CALL, target, str(nth), str(signum), *args],
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=300,
    )


def kill_at_call(args: list[str], target: str, nth: int) -> None:
    """Run ``hfedmoe ARGS`` and SIGKILL it as it calls ``target`` (``module:function``, the name
    the caller looks up) for the ``nth`` time, before that call runs: a crash at an exact step
    of a real run, where :func:`kill_when` would have to catch a moment milliseconds long."""
    proc = _signal_at_call(args, target, nth, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def interrupt_at_call(args: list[str], target: str, nth: int) -> tuple[int, str]:
    """Run ``hfedmoe ARGS`` and press Ctrl-C (SIGINT) as it calls ``target`` for the ``nth``
    time: at an exact step, however slow the machine (a moment polled from outside can be
    missed by a run that finishes first); its exit status and what it wrote on stderr."""
    proc = _signal_at_call(args, target, nth, signal.SIGINT)
    return proc.returncode, proc.stderr


def checkpoint_round(run_dir: Path) -> int:
    """The round of ``run_dir``'s checkpoint; -1 while there is none that loads."""
    try:
        return load_run_state(run_dir).round
    except HFedMoEError:
        return -1
