"""A run directory and everything written into it: the run recorder (metrics, tables, the final
model, the summary), the per-round checkpoint a killed run resumes from, and the accuracy plot.

The ServerApp writes a run through these on every engine, so they sit below the federation
layer; the comparison grid and the report (``hfedmoe.experiment``) read what they wrote.
"""

from hfedmoe.results.recorder import (
    TIMING_KEYS,
    RunRecorder,
    engine_independent,
    prepare_run_dir,
    read_metrics,
    without,
)
from hfedmoe.results.run_state import (
    RunState,
    code_digest,
    load_run_state,
    read_header,
    save_run_state,
)

__all__ = [
    "TIMING_KEYS",
    "RunRecorder",
    "RunState",
    "code_digest",
    "engine_independent",
    "load_run_state",
    "prepare_run_dir",
    "read_header",
    "read_metrics",
    "save_run_state",
    "without",
]
