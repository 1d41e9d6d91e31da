"""Golden metrics: what a fixed seed gives, bit for bit, kept in ``tests/golden/``.

A refactoring must reproduce them exactly (STYLE.md: "refactors must reproduce the same losses
with fixed seeds"). Every registered algorithm, and HFedMoE in strict mode, runs 2 rounds on the
tiny BERT-MoE with three device tiers (``tiers.three_tiers``); the default job
(``configs/default.toml``) is the slow one. Timings and node ids are left out
(``hfedmoe.results.engine_independent``).

Bit for bit on the machine that recorded them; on another CPU, torch's SIMD kernels round
differently in the last bits (seen here: two machines of this workplace, both x86_64, differed
by 2e-9 relative in round 0's test loss), so :func:`same` compares floats to 1e-6 relative and
everything else (structure, counts, names) exactly. A real change moves metrics by far more.

A change that is meant to change the numbers regenerates them, and says so in its commit::

    .venv/bin/python -m tests.support.golden            # the tiny runs (about a minute)
    .venv/bin/python -m tests.support.golden --default  # and the default job (about 6 minutes)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hfedmoe.algorithms import ALGORITHMS
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.foundation.config import validate
from hfedmoe.results import engine_independent

from .tiers import three_tiers

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TINY_RUNS = GOLDEN / "tiny_runs.json"
DEFAULT_JOB = GOLDEN / "default_job.json"

#: case -> (algorithm, hfedmoe.mode)
CASES: dict[str, tuple[str, str]] = {
    **{name: (name, "backward-only") for name in sorted(ALGORITHMS)},
    "hfedmoe-strict": ("hfedmoe", "strict"),
}


def run_case(tiny_bert_dir: Path, case: str, run_dir: Path, check_wire: bool = False) -> list[dict]:
    """The engine-independent metrics of one golden case, run on the embedded engine (by
    reference, its default, or with every message across Flower's wire format)."""
    algorithm, mode = CASES[case]
    cfg = validate(three_tiers(tiny_bert_dir, algorithm, mode, check_wire))
    run_embedded(cfg, str(run_dir), server_app, client_app)
    return json.loads(json.dumps(engine_independent(run_dir)))  # as the file will hold them


def expected(path: Path) -> dict:
    return json.loads(path.read_text())


def same(actual: object, golden: object, rel: float = 1e-6, path: str = "") -> str | None:
    """None if ``actual`` matches ``golden`` (floats to ``rel``), else the first difference."""
    if isinstance(golden, dict) and isinstance(actual, dict):
        if set(actual) != set(golden):
            return f"{path}: keys {sorted(set(actual) ^ set(golden))} differ"
        diffs = (same(actual[k], golden[k], rel, f"{path}/{k}") for k in golden)
        return next((d for d in diffs if d), None)
    if isinstance(golden, list) and isinstance(actual, list):
        if len(actual) != len(golden):
            return f"{path}: {len(actual)} items, expected {len(golden)}"
        pairs = enumerate(zip(actual, golden, strict=True))
        diffs = (same(a, g, rel, f"{path}[{i}]") for i, (a, g) in pairs)
        return next((d for d in diffs if d), None)
    if isinstance(golden, float) and isinstance(actual, float):
        ok = abs(actual - golden) <= rel * max(abs(golden), 1e-12)
        return None if ok else f"{path}: {actual!r}, expected {golden!r}"
    return None if actual == golden else f"{path}: {actual!r}, expected {golden!r}"


def _regenerate(default: bool) -> None:
    from .configs import save_tiny_model, tiny_bert

    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_tiny_model(Path(tmp) / "tiny-bert", tiny_bert)
        metrics = {case: run_case(tiny, case, Path(tmp) / case) for case in CASES}
    TINY_RUNS.write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"wrote {TINY_RUNS}")
    if default:
        from .cli import run_cli

        with tempfile.TemporaryDirectory() as tmp:
            config = GOLDEN.parents[1] / "configs" / "default.toml"
            proc = run_cli("run", str(config), "-o", tmp + "/run", "--no-progress", timeout=3600)
            assert proc.returncode == 0, proc.stderr
            metrics = engine_independent(Path(tmp) / "run")
        DEFAULT_JOB.write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"wrote {DEFAULT_JOB}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--default", action="store_true", help="also the default job (slow)")
    _regenerate(parser.parse_args().default)
