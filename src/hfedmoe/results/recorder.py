"""A run directory and everything written into it.

::

    RUN_DIR/
      config.toml      the resolved, validated config of the run
      metrics.jsonl    one JSON object per round (round 0 = the initial model)
      metrics.csv      the same, one row per round (scalars only; :func:`round_columns`)
      clients.csv      one row per (round, sampled client)
      model/           the final global model (safetensors + what is needed to reload it)
      accuracy.png     test accuracy and loss vs round
      summary.json     final figures, and the code and machine that produced them
      checkpoint.safetensors  while the run is unfinished: where it resumes from

Once summary.json is written the run is finished and its checkpoint goes: nothing resumes a
finished run, ``model/`` and the metrics hold its results, and the checkpoint repeats the
model's weights (905 MB for a specialised SmolLM2-MoE run; a user's model may be a hundred times
larger). A crash between the two leaves the checkpoint, which is harmless, except that a
private run's holds its noise's secret (delete it before sharing the folder).

Files are written atomically (temporary file + rename) or appended line by line
(``hfedmoe.foundation.files``): the metrics files grow by one round's lines per round, and a
line a crash cut short is dropped when the run resumes. A resume replaces each metrics file
whole, atomically, by the checkpoint's rounds (never removing one first), so a run killed
during its resume resumes again. A write that fails (a full disk, a permission) stops the run
with one line naming the file; what is on disk is then what a kill at that moment leaves.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import shutil
from pathlib import Path

import tomli_w
import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.files import append_text, write_atomic, writing
from hfedmoe.model import save_checkpoint
from hfedmoe.results.plots import plot_accuracy
from hfedmoe.results.run_state import CHECKPOINT_FILE, METRICS_FILE, RunState, code_digest

ROUNDS_CSV = "metrics.csv"
CLIENTS_CSV = "clients.csv"

ROUND_COLUMNS = [
    "round",
    "test_accuracy",
    "test_loss",
    "personal_accuracy_mean",
    "personal_accuracy_worst",
    "personal_loss_mean",
    "train_loss",
    "clients_ok",
    "clients_failed",
    "examples",
    "bytes_down",
    "bytes_up",
    "round_seconds",
    "elapsed_seconds",
]
#: metrics.csv's columns for the validation split, after the test split's, in runs with one
VALIDATION_COLUMNS = ["validation_accuracy", "validation_loss"]


def round_columns(cfg: ExperimentConfig) -> list[str]:
    """metrics.csv's columns: :data:`ROUND_COLUMNS`, with :data:`VALIDATION_COLUMNS` after the
    test metrics where the run holds out a validation split (a run without one keeps the
    columns runs always had)."""
    if cfg.data.validation_fraction == 0:
        return ROUND_COLUMNS
    at = ROUND_COLUMNS.index("test_loss") + 1
    return [*ROUND_COLUMNS[:at], *VALIDATION_COLUMNS, *ROUND_COLUMNS[at:]]


def prepare_run_dir(path: Path) -> Path:
    """Create a new run directory; refuse one that already holds files (nothing is overwritten)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise HFedMoEError(
            f"--output-dir: '{path}' already exists and is not empty; not overwriting"
        )
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _append_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """Append ``rows``; a new file starts with its header (``columns``, else the first row's
    keys), an existing one keeps its own."""
    if path.is_file() and path.stat().st_size:
        with path.open(newline="") as f:
            columns = next(csv.reader(f))
        text = to_csv(rows, columns).split("\n", 1)[1]
    else:
        text = to_csv(rows, columns or list(rows[0]))
    append_text(path, text)


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class RunRecorder:
    """Writes a run's results as the rounds complete."""

    def __init__(
        self,
        run_dir: Path,
        cfg: ExperimentConfig,
        resume: RunState | None = None,
        restart: bool = False,
    ):
        """A new run; or, with ``resume``, the run in ``run_dir`` continued from its checkpoint:
        the metrics files are rewritten from the checkpoint's records (dropping any round the
        crash interrupted); or, with ``restart``, a run killed before its first checkpoint,
        started over in its directory (what it wrote is removed). Either way, temporary files a
        killed process left are removed."""
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.rounds = list(resume.rounds) if resume is not None else []
        self.round_columns = round_columns(cfg)
        with writing(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / "config.toml", tomli_w.dumps(cfg.model_dump(exclude_none=True)))
        if resume is not None or restart:
            _remove_leftovers(self.run_dir)
            self._rewrite_metrics()

    def _rewrite_metrics(self) -> None:
        """Replace each metrics file by what ``self.rounds`` gives, one atomic replacement a
        file (a file with no rows goes): a kill between two leaves each file old or new, and
        the old metrics.jsonl still holds every round the checkpoint has passed."""
        clients = [c for r in self.rounds for c in r["clients"]]
        tables = {
            METRICS_FILE: "".join(json.dumps(r) + "\n" for r in self.rounds),
            ROUNDS_CSV: to_csv(self.rounds, self.round_columns) if self.rounds else "",
            CLIENTS_CSV: to_csv(clients, list(clients[0])) if clients else "",
        }
        for name, text in tables.items():
            path = self.run_dir / name
            if text:
                write_atomic(path, text)
            else:
                with writing(path):
                    path.unlink(missing_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def log_round(self, record: dict) -> None:
        self.rounds.append(record)
        append_text(self.metrics_path, json.dumps(record) + "\n")
        self._append_tables(record)

    def _append_tables(self, record: dict) -> None:
        _append_csv(self.run_dir / ROUNDS_CSV, [record], self.round_columns)
        if record["clients"]:
            _append_csv(self.run_dir / CLIENTS_CSV, record["clients"])

    def finish(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
        model_dir, plot = self.run_dir / "model", self.run_dir / "accuracy.png"
        if not model_dir.exists():  # else: written before a crash, complete
            with writing(model_dir, SafetensorError):
                save_checkpoint(model, tokenizer, self.cfg.model, model_dir, self.cfg.data.task)
        with writing(plot):
            plot_accuracy(self.rounds, plot, f"{self.cfg.name} ({self.cfg.algorithm})")
        last = self.rounds[-1]
        summary = {
            "name": self.cfg.name,
            "algorithm": self.cfg.algorithm,
            "seed": self.cfg.seed,
            "rounds": last["round"],
            "final_test_accuracy": last["test_accuracy"],
            "final_test_loss": last["test_loss"],
            "accuracy_is": ACCURACY_IS[self.cfg.data.task],
            **(
                {"final_test_perplexity": last["test_perplexity"]}
                if "test_perplexity" in last
                else {}
            ),
            "best_test_accuracy": max(  # a federated round nobody evaluated has none
                (r["test_accuracy"] for r in self.rounds if r["test_accuracy"] is not None),
                default=None,
            ),
            **_validation_summary(self.rounds),
            **_privacy_summary(self.rounds),
            "total_bytes_down": sum(r["bytes_down"] for r in self.rounds),
            "total_bytes_up": sum(r["bytes_up"] for r in self.rounds),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "failure_rate": _failure_rate(self.rounds),
            "wall_seconds": last["elapsed_seconds"],
            "run_dir": str(self.run_dir),
            "code": code_digest(),
            "machine": machine(self.cfg.train.device, self.cfg.threads),
        }
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        with writing(self.run_dir / CHECKPOINT_FILE):  # finished: see the module's docstring
            (self.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        return summary


def _privacy_summary(rounds: list[dict]) -> dict:
    """Under ``[privacy]``: the epsilon spent at its delta by the last round that released a
    model, and the noise multiplier (nothing without privacy)."""
    spent = [r for r in rounds if r.get("dp_epsilon") is not None]
    if not spent:
        return {}
    return {k: spent[-1][k] for k in ("dp_epsilon", "dp_delta", "dp_noise_multiplier")}


def _remove_leftovers(run_dir: Path) -> None:
    """Remove the temporary files and folders a killed write left (write_atomic's and
    mkdtemp's names: ``.<name>-<random>``)."""
    for leftover in run_dir.glob(".*-*"):
        with writing(leftover):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()


def machine(device: str = "cpu", threads: int | None = None) -> dict[str, str]:
    """What a run's numbers depend on besides its config and code. A seed reproduces bit for
    bit on one machine, not across machines: torch picks its float kernels by the CPU
    (``cpu_capability``), and a different last bit in an early round can move a seed's final
    accuracy by points (docs/RESULTS.md, (d)). ``threads``: the config's, a client's torch
    threads; None, torch's default (the server sets threads x workers for itself)."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(threads or torch.get_num_threads()),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: what test accuracy measures for each data.task (summary.json's ``accuracy_is``)
ACCURACY_IS = {
    "classification": "the share of examples whose class is predicted",
    "language-modeling": "next-token accuracy: the share of tokens predicted",
    "instruction": "next-token accuracy on the answers' tokens (see perplexity)",
    "multiple-choice": "answer accuracy: the share of questions whose right answer is the "
    "most likely choice",
}


def _validation_summary(rounds: list[dict]) -> dict:
    """summary.json's validation figures, for a run with a validation split (none without):
    the final accuracy and loss, the best accuracy and the first round that reached it (the
    round a tuning on the validation split would pick, whose test metrics are in its record)."""
    if "validation_accuracy" not in rounds[-1]:
        return {}
    accuracy = [r["validation_accuracy"] for r in rounds]
    best = max(range(len(rounds)), key=accuracy.__getitem__)  # the first of equals
    return {
        "final_validation_accuracy": accuracy[-1],
        "final_validation_loss": rounds[-1]["validation_loss"],
        "best_validation_accuracy": accuracy[best],
        "best_validation_round": rounds[best]["round"],
    }


def _failure_rate(rounds: list[dict]) -> float:
    """Failed client trainings / sampled client trainings, over the run."""
    sampled = sum(r["clients_ok"] + r["clients_failed"] for r in rounds)
    return sum(r["clients_failed"] for r in rounds) / sampled if sampled else 0.0


#: fields of metrics.jsonl that measure the machine, not the training (they differ between runs)
TIMING_KEYS = frozenset(
    {
        "memory_measured_bytes",
        "round_seconds",
        "elapsed_seconds",
        "seconds",
        "usage_seconds",
        "overlapped_seconds",
        "eval_seconds",
        "validation_seconds",
        "federated_seconds",
        "personal_eval_seconds",
        "aggregate_seconds",
        "descent_seconds",
    }
)


def without(records: list[dict], drop: frozenset[str] = TIMING_KEYS) -> list[dict]:
    """Metrics records without the keys ``drop``, in each round and in its clients and devices:
    by default the timings, which differ between any two runs."""

    def strip(d: dict) -> dict:
        return {
            k: ([strip(x) for x in v] if k in ("clients", "devices") else v)
            for k, v in d.items()
            if k not in drop
        }

    return [strip(r) for r in records]


def engine_independent(run_dir: Path) -> list[dict]:
    """metrics.jsonl without timings and node ids (each engine numbers its nodes its own way):
    what two runs of one config and seed must agree on, on any engine."""
    return without(read_metrics(run_dir), TIMING_KEYS | {"node_id"})


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
