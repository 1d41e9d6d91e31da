"""The ``hfedmoe`` command.

Bad input (config, paths) is reported as one line on stderr with exit status 2, before anything
is written to disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, get_args

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

# Nothing may reach a model hub; Flower must not reinstall dependencies per run.
for _key in (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes (imported by PEFT when installed) warns at import that it cannot fetch an optional
# CPU kernel from the Hub; offline that is expected, and errors must stay one line on stderr.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from hfedmoe.foundation import config as config_mod  # noqa: E402
from hfedmoe.foundation.errors import HFedMoEError, WriteError  # noqa: E402

if TYPE_CHECKING:
    from hfedmoe.experiment.comparison import Cell

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # a crash prints a plain traceback: rendering the locals (model tensors) takes minutes
    pretty_exceptions_show_locals=False,
    help="Federated fine-tuning of Mixture-of-Experts models on Flower.",
)
console = Console(stderr=True)

ConfigArg = Annotated[
    Path, typer.Argument(help="Experiment TOML file (e.g. configs/default.toml).")
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--output-dir", "-o", help="Run directory (must be new or empty)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a setting: KEY=VALUE, e.g. federation.rounds=3. Repeatable."
    ),
]
ChangeOpt = Annotated[
    bool,
    typer.Option(
        "--change-end-point",
        help="Allow a primary end point, target or reference other than the one recorded with "
        "the grid after its runs finished (the report states the change).",
    ),
]


def _fail(message: str) -> NoReturn:
    """The one way a command fails: one line on stderr, exit status 2."""
    typer.echo(f"hfedmoe: error: {message}", err=True)
    raise typer.Exit(code=2)


#: rich estimates the time left from the steps of the last 30 s by default, so it shows none
#: when a step (a client's training, a grid's run) takes longer: ours take minutes
_PACE = {"speed_estimate_period": 3600.0}


def _interrupted(how: str) -> NoReturn:
    """Ctrl-C: one line saying how to go on, and the shell's exit status for SIGINT (130)."""
    typer.echo(f"hfedmoe: interrupted; {how}", err=True)
    raise typer.Exit(code=130)


@contextlib.contextmanager
def _errors(hint: Callable[[HFedMoEError], str] = lambda exc: "") -> Iterator[None]:
    """Any :class:`HFedMoEError` in the block fails the command (:func:`_fail`), with what
    ``hint`` adds to its message."""
    try:
        yield
    except HFedMoEError as exc:
        _fail(f"{exc}{hint(exc)}")


def _preflight(cfg: config_mod.ExperimentConfig) -> None:
    """Check what can be checked before a run directory is created."""
    from hfedmoe.federation.preflight import check_experiment

    check_experiment(cfg)


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Argument(help="Experiment TOML file (e.g. configs/default.toml); not with --resume."),
    ] = None,
    set_: SetOpt = None,
    output_dir: RunDirOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this directory from its last complete round (after a "
            "crash or a kill); it ends exactly as an uninterrupted run would.",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run one federated fine-tuning experiment on the embedded (in-process) Flower engine."""
    with _errors():
        if resume is not None:
            cfg, run_dir = _resumable(resume, config, set_, output_dir)
        else:
            if config is None:
                raise HFedMoEError("missing CONFIG: give an experiment TOML file, or --resume")
            cfg = config_mod.load(config, set_ or [])
            _preflight(cfg)
            from hfedmoe.results import prepare_run_dir

            run_dir = output_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}"
            prepare_run_dir(run_dir)
    _configure_logging()
    if not progress:  # transformers' own bars too (a GGUF model's conversion on first load)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with _errors():
        _build_if_needed(cfg, progress)
    verb = "resume" if resume is not None else "run"
    console.print(
        f"[bold]hfedmoe[/] {verb} [cyan]{cfg.name}[/] ({cfg.algorithm}, seed {cfg.seed}) "
        f"-> {run_dir}"
    )
    with _errors(lambda exc: _resume_hint(exc, run_dir)):
        try:
            summary = _run_with_progress(cfg, run_dir, progress, resume=resume is not None)
        except HFedMoEError as exc:
            if resume is None and not isinstance(exc, WriteError):
                _discard_unstarted(run_dir)
            raise
        except KeyboardInterrupt:  # every record is written whole: the run resumes from it
            _interrupted(f"'hfedmoe run --resume {run_dir}' continues this run")
    _print_summary(summary, run_dir)


def _discard_unstarted(run_dir: Path) -> None:
    """A new run that failed before it recorded anything (a partition that cannot be drawn, a
    model that does not load) leaves no folder behind: the same command, once fixed, may use the
    same --output-dir. Only the config.toml this run wrote is removed, never anything else."""
    if {p.name for p in run_dir.iterdir()} <= {"config.toml"}:
        (run_dir / "config.toml").unlink(missing_ok=True)
        run_dir.rmdir()


def _resume_hint(exc: HFedMoEError, run_dir: Path) -> str:
    """After a failed write (a full disk), how the run goes on once the cause is gone: a run
    directory with its config.toml resumes (one without it holds nothing: run it again)."""
    if not isinstance(exc, WriteError) or not (run_dir / "config.toml").is_file():
        return ""
    return f"; once that is fixed, `hfedmoe run --resume {run_dir}` continues the run"


def _resumable(
    run_dir: Path, config: Path | None, set_: list[str] | None, output_dir: Path | None
) -> tuple[config_mod.ExperimentConfig, Path]:
    """The config of the run to resume (its own config.toml: changing it would change the run)."""
    from hfedmoe.results.run_state import code_digest, has_checkpoint, read_header

    if config is not None or set_ or output_dir is not None:
        raise HFedMoEError(
            "--resume: takes only the run directory (the run keeps its own config.toml; no "
            "CONFIG, --set or --output-dir)"
        )
    if (run_dir / "summary.json").is_file():
        raise HFedMoEError(f"--resume: the run in '{run_dir}' has already finished")
    if not (run_dir / "config.toml").is_file():
        raise HFedMoEError(f"--resume: '{run_dir}' has no config.toml (not a run directory)")
    cfg = config_mod.load(run_dir / "config.toml")
    if not has_checkpoint(run_dir):  # killed before round 0's checkpoint was complete
        console.print(f"no checkpoint in '{run_dir}' yet: the run starts over there")
        return cfg, run_dir
    header = read_header(run_dir)  # fails early, naming the problem, if it is unusable
    if (written_by := header.get("code", "an older hfedmoe")) != code_digest():
        console.print(
            f"[yellow]warning:[/] the checkpoint was written by {written_by}, this is "
            f"{code_digest()}: the run goes on, but need not end as an uninterrupted run would"
        )
    return cfg, run_dir


def _run_with_progress(
    cfg: config_mod.ExperimentConfig, run_dir: Path, show: bool, resume: bool = False
) -> dict:
    from flwr.app import MessageType

    from hfedmoe.engines.embedded import run_embedded
    from hfedmoe.federation.client_app import app as client_app
    from hfedmoe.federation.server_app import app as server_app

    per_round = cfg.federation.clients_per_round
    total = cfg.federation.rounds * per_round
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("client trainings"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not show, transient=False, **_PACE) as bar:
        task = bar.add_task("preparing", total=total)

        def on_reply(msg, reply, seconds) -> None:
            if msg.metadata.message_type != MessageType.TRAIN:
                return  # the budget query before round 1
            done = bar.tasks[0].completed + 1
            rnd, k = msg.metadata.group_id, (done - 1) % per_round + 1
            bar.update(
                task,
                advance=1,
                description=f"round {rnd}/{cfg.federation.rounds} client {k}/{per_round}",
            )

        run_embedded(cfg, str(run_dir), server_app, client_app, on_reply=on_reply, resume=resume)
    return json.loads((run_dir / "summary.json").read_text())


@app.command()
def prepare(
    config: ConfigArg,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build the specialised model that the config's model.construction asks for, once: it is
    cached under $HFEDMOE_CACHE by its recipe, and every run with that recipe starts from it."""
    with _errors():
        cfg = config_mod.load(config, set_ or [])
        _preflight(cfg)
        if cfg.model.construction == "upcycle":
            raise HFedMoEError(
                "model.construction: 'upcycle' builds nothing ahead; expected a specialising "
                "construction, e.g. --set model.construction=cluster"
            )
        _configure_logging()
        directory = _build_if_needed(cfg, progress)
    build = json.loads((directory / "build.json").read_text())
    table = Table(title=f"{cfg.model.construction} model of {cfg.model.name_or_path}")
    for column in ("MoE layer", "router accuracy", "error after drop", "after distillation", "s"):
        table.add_column(column, justify="right")
    for i, layer in enumerate(build["layers"]):
        table.add_row(
            str(i),
            f"{layer['router_accuracy']:.3f}",
            f"{layer['error_after_drop']:.4f}",
            f"{layer['error_after_distillation']:.4f}",
            f"{layer['seconds']:.0f}",
        )
    Console().print(table)
    print(f"Model: {directory}  (built in {build['build_seconds']:.0f} s)")


def _check_grid(
    config: Path, runs: list[Cell], base: list[str], progress: bool
) -> tuple[list[bool], config_mod.ReportConfig]:
    """Every cell's config, the first cell's preflight, and the model they all start from;
    whether each cell can resume from its checkpoint, and the experiment's [report] section
    (the same in every cell: the cells differ in algorithm and seed only)."""
    from hfedmoe.experiment import comparison

    comparison.validate_grid(config, runs, base)
    first = config_mod.load(config, runs[0].overrides(base))
    _preflight(first)
    _build_if_needed(first, progress)  # once, before the cells that all start from it
    return [comparison.resumable(config, run, base) for run in runs], first.report


def _build_if_needed(cfg: config_mod.ExperimentConfig, show: bool = True) -> Path | None:
    """Build (or find in the cache) the model a specialising construction starts from."""
    if cfg.model.construction == "upcycle":
        return None
    from hfedmoe.construction import ensure_prepared, prepared_dir
    from hfedmoe.construction.prepare import is_prepared

    if is_prepared(prepared_dir(cfg)):
        return prepared_dir(cfg)
    console.print(f"building the {cfg.model.construction} model (once; cached by its recipe)")
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not show, **_PACE) as bar:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        return ensure_prepared(cfg, on_progress)


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    for noisy in ("flwr", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(title=f"Run summary: {summary['name']} ({summary['algorithm']})")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def shown(value: float | None) -> str:  # None: no client evaluated (federated evaluation)
        return "n/a" if value is None else f"{value:.4f}"

    table.add_row("rounds", str(summary["rounds"]))
    table.add_row("final test accuracy", shown(summary["final_test_accuracy"]))
    table.add_row("best test accuracy", shown(summary["best_test_accuracy"]))
    table.add_row("final test loss", shown(summary["final_test_loss"]))
    if "final_test_perplexity" in summary:
        table.add_row("final test perplexity", shown(summary["final_test_perplexity"]))
    table.add_row(
        "bytes down / up",
        f"{summary['total_bytes_down'] / 1e6:,.0f} MB / {summary['total_bytes_up'] / 1e6:,.0f} MB",
    )
    table.add_row("wall time", f"{summary['wall_seconds']:.0f} s")
    if "dp_epsilon" in summary:  # [privacy]: what the run spent
        spent = f"{summary['dp_epsilon']:.3g} at delta {summary['dp_delta']:.1e}"
        table.add_row("privacy: epsilon spent", spent)
    Console().print(table)
    if "accuracy_is" in summary:
        print(f"Test accuracy here is {summary['accuracy_is']}.")
    print(
        f"Results: {run_dir}/  (summary.json, metrics.jsonl, metrics.csv, clients.csv, "
        "accuracy.png, model/)"
    )


def _csv(text: str, what: str, cast=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = [cast(x) for x in items]
    except ValueError:
        raise HFedMoEError(f"--{what}: expected a comma-separated list, got '{text}'") from None
    if not values:
        raise HFedMoEError(f"--{what}: empty")
    return values


@app.command()
def compare(
    config: ConfigArg,
    methods: Annotated[
        str, typer.Option(help="Comma-separated algorithms, e.g. fedavg,hfedmoe,random.")
    ],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds, e.g. 0,1,2.")] = "0",
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Grid directory: <method>/seed<k>/ runs.")
    ] = Path("runs/compare"),
    profile: Annotated[
        str, typer.Option(help="full, or quick (3 rounds on a data subset: a smoke test).")
    ] = "full",
    set_: SetOpt = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh", help="Start interrupted runs over (set aside) instead of resuming them."
        ),
    ] = False,
    tuned: Annotated[
        Path | None,
        typer.Option(
            help="A finished `hfedmoe tune` directory: each method runs with its tuned values "
            "(never on the tuning seeds)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    change_end_point: ChangeOpt = False,
) -> None:
    """Run every method x seed of one experiment on identical partitions, budgets and initial
    weights; finished runs are not repeated, interrupted ones continue from their checkpoint.
    The experiment's \\[report] section (primary end point, target, reference) is recorded with
    the grid before the first run, and cannot change once a run has finished."""
    from hfedmoe.experiment import comparison, protocol
    from hfedmoe.experiment.tuning import Tuned

    with _errors():
        if profile not in comparison.PROFILES:
            known = ", ".join(comparison.PROFILES)
            raise HFedMoEError(f"--profile: unknown '{profile}' (expected one of: {known})")
        base = [*comparison.PROFILES[profile], *(set_ or [])]
        runs = comparison.plan(output_dir, _csv(methods, "methods"), _csv(seeds, "seeds", int))
        if tuned is not None:
            runs = Tuned.read(tuned).cells(runs, base)
        # in a child process: the checks build the model and its cost models, and this process
        # waits on the grid for hours (it held 2 GB through an (e) grid when it ran them itself)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            resumable, wanted = child.submit(_check_grid, config, runs, base, progress).result()
        protocol.fix(output_dir, wanted, change_end_point)
    with contextlib.ExitStack() as held:
        with _errors():
            held.enter_context(comparison.locked(output_dir, runs))
        resume = {run: ok and not fresh for run, ok in zip(runs, resumable, strict=True)}
        failed = _run_grid(config, runs, base, resume, progress, output_dir)
    table = Table(
        title=f"Grid: {output_dir}",
        caption="failure rate: the share of the run's client trainings that failed (a device "
        "asked for more than its memory or deadline allows refuses); 'hfedmoe report' says why",
    )
    for column in ("method", "seed", "final acc", "best acc", "failure rate", "wall s"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for run in runs:
        if run.done:
            s = run.summary()
            table.add_row(
                run.method,
                str(run.seed),
                f"{s['final_test_accuracy']:.4f}",
                f"{s['best_test_accuracy']:.4f}",
                f"{s.get('failure_rate', 0.0):.2f}",
                f"{s['wall_seconds']:.0f}",
            )
    Console().print(table)
    if failed:
        _fail(f"{len(failed)} of {len(runs)} runs failed (rerun the same command to retry)")


@app.command()
def tune(
    config: ConfigArg,
    methods: Annotated[
        str, typer.Option(help="Comma-separated algorithms, e.g. fedavg,hfedmoe,random.")
    ],
    grid: Annotated[
        list[str],
        typer.Option(
            help="KEY=[VALUES] to try, e.g. lr=[1e-5,3e-5,1e-4] (lr: each method's own "
            "rate); repeatable."
        ),
    ],
    seeds: Annotated[
        str, typer.Option(help="Tuning seeds, e.g. 100,101: never to be reported.")
    ] = "100",
    end_point: Annotated[
        str | None,
        typer.Option(
            help="final or last-rounds: the validation accuracy each point is judged by "
            "(default: the config's \\[report] primary end point)."
        ),
    ] = None,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Tuning directory (tuned.json, runs).")
    ] = Path("runs/tune"),
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Tune every method over the same grid on validation data (data.validation_fraction) and
    tuning seeds; `compare --tuned DIR` then runs each method with its chosen values."""
    from hfedmoe.experiment import comparison, tuning

    with _errors():
        base = list(set_ or [])
        cfg = config_mod.load(config, base)
        end_point = end_point or cfg.report.primary
        if end_point not in tuning.END_POINTS:
            known = ", ".join(tuning.END_POINTS)
            raise HFedMoEError(
                f"--end-point: '{end_point}' cannot be judged on validation data (expected one "
                f"of: {known})"
            )
        if cfg.data.validation_fraction == 0:
            raise HFedMoEError(
                "tune: data.validation_fraction is 0; tuning needs a validation split (e.g. "
                "--set data.validation_fraction=0.1)"
            )
        keys = tuning.parse_grid(grid)
        tuning_seeds = _csv(seeds, "seeds", int)
        runs = tuning.plan(output_dir, _csv(methods, "methods"), keys, tuning_seeds)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            resumable, _ = child.submit(_check_grid, config, runs, base, progress).result()
    with contextlib.ExitStack() as held:
        with _errors():
            held.enter_context(comparison.locked(output_dir, runs))
        resume = dict(zip(runs, resumable, strict=True))
        failed = _run_grid(config, runs, base, resume, progress, output_dir)
    if failed:
        _fail(f"{len(failed)} of {len(runs)} runs failed (rerun the same command to retry)")
    with _errors():
        choices, trials = tuning.choose(runs, end_point)
        path = tuning.write_choice(output_dir, choices, trials, tuning_seeds, end_point, keys)
    table = Table(title=f"Tuned on validation ({end_point}): {path}")
    for column in ("method", "values", "validation", "at the grid's edge"):
        table.add_column(column)
    for choice in choices.values():
        edge = ", ".join(choice.edge)
        table.add_row(choice.method, ", ".join(choice.sets), f"{choice.score:.4f}", edge)
    Console().print(table)
    if any(choice.edge for choice in choices.values()):
        Console().print(
            "A value at the edge of its grid may not be the best: the best may lie beyond it "
            "(a wider grid tells; tuning.md lists them)."
        )


def _run_grid(
    config: Path,
    runs: list[Cell],
    base: list[str],
    resume: dict[Cell, bool],
    progress: bool,
    output_dir: Path,
) -> list[Cell]:
    """Run the grid's unfinished cells in order (``resume``: from their checkpoints); the
    cells that failed."""
    from hfedmoe.experiment import comparison

    todo = [r for r in runs if not r.done]
    console.print(
        f"[bold]hfedmoe[/] compare: {len(runs)} runs, {len(runs) - len(todo)} already "
        f"finished, {sum(resume[r] for r in todo)} to resume -> {output_dir}"
    )
    failed = []
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("runs"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not progress, **_PACE) as bar:
        task = bar.add_task("grid", total=len(todo))
        for run in todo:
            name = " ".join([run.method, *run.sets])
            bar.update(task, description=f"{name} seed {run.seed}")
            try:
                proc = comparison.execute(config, run, base, resume[run])
            except KeyboardInterrupt:  # the run's own process got the Ctrl-C too
                _interrupted("the same command continues: finished runs are kept, this one resumes")
            except WriteError as exc:  # the grid's own folders: fails the cell like its run
                proc = subprocess.CompletedProcess([], 2, "", f"hfedmoe: error: {exc}")
            if proc.returncode != 0:
                failed.append(run)
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                how = " (resumed; --fresh starts it over)" if resume[run] else ""
                console.print(f"[red]failed[/] {name} seed {run.seed}{how}: {last}")
            else:  # a line per run, which a redirected log keeps (the bar is for terminals)
                console.print(_finished(name, run))
            bar.update(task, advance=1)
    return failed


def _finished(name: str, run: Cell) -> str:
    """One line for a finished cell: its final accuracy and wall time."""
    try:
        done = run.summary()
        return (
            f"done {name} seed {run.seed}: final test accuracy "
            f"{done['final_test_accuracy']:.3f}, {done['wall_seconds']:.0f} s"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return f"done {name} seed {run.seed}"


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories, or grid directories to search.")
    ],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where report.html and report.md go.")
    ] = Path("report"),
    target: Annotated[
        float | None,
        typer.Option(help="Target test accuracy (default: the grid's recorded \\[report] target)."),
    ] = None,
    primary: Annotated[
        str | None,
        typer.Option(
            help="The end point verdicts follow: final, last-rounds or per-client (default: "
            "the grid's recorded \\[report] primary)."
        ),
    ] = None,
    title: Annotated[str, typer.Option(help="Report title.")] = "",
    change_end_point: ChangeOpt = False,
) -> None:
    """Write an HTML and a Markdown report (table and plots) comparing finished runs. Verdicts
    follow the primary end point recorded with each grid; another is refused unless asked."""
    from hfedmoe.experiment.report import find_runs, write_report

    with _errors():
        if target is not None and not 0 < target <= 1:
            raise HFedMoEError(f"--target: expected a fraction in (0, 1], got {target}")
        if primary is not None and primary not in get_args(config_mod.PrimaryEndPoint):
            known = ", ".join(get_args(config_mod.PrimaryEndPoint))
            raise HFedMoEError(f"--primary: unknown '{primary}' (expected one of: {known})")
        runs = find_runs(run_dirs)
        path = write_report(
            runs,
            output_dir,
            {"primary": primary, "target": target},
            title,
            change=change_end_point,
        )
    print(f"Report of {len(runs)} runs: {path} and {output_dir / 'report.md'}")


@app.command()
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A run's model/ directory (or the run directory).")
    ],
    output_dir: Annotated[Path, typer.Argument(help="A new directory for the exported model.")],
) -> None:
    """Write a trained model as a standard Hugging Face model that from_pretrained loads
    without hfedmoe: an upcycled decoder as Qwen2-MoE, a native MoE as itself, LoRA merged."""
    from hfedmoe.model.export import export_model

    with _errors():
        if not checkpoint.exists():
            raise HFedMoEError(f"CHECKPOINT: '{checkpoint}' does not exist")
        out = export_model(checkpoint, output_dir)
    config = json.loads((out / "config.json").read_text())
    print(f"Exported {config.get('architectures', ['?'])[0]} to {out}")


@app.command()
def analyze(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A run directory (its model/ and config.toml) or a model directory saved by "
            "hfedmoe; none: the model the --config builds (e.g. the upcycled shipped model)."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Experiment TOML whose data and partition to analyse on."),
    ] = None,
    set_: SetOpt = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Where the report goes (default: PATH/analysis)."),
    ] = None,
    by: Annotated[
        str, typer.Option(help="Group tokens by: auto (domains if any, else labels), group, label.")
    ] = "auto",
    max_examples: Annotated[
        int, typer.Option(min=1, help="Test examples (and per client) to route.")
    ] = 400,
    selection_only: Annotated[
        bool,
        typer.Option(
            "--selection-only",
            help="A finished run: only the loss cost of removing each client's selected experts.",
        ),
    ] = False,
) -> None:
    """How specialised a model's experts are: routing entropy, load balance, expert-group
    mutual information, the clients' expert usage and the cost of removing an expert; for a
    finished run, also whether each client's selection hit the experts its data needs."""
    import torch

    from hfedmoe.analysis.selection import pooled_ratio, selection_cost, write_selection
    from hfedmoe.analysis.specialisation import analyze as run_analysis
    from hfedmoe.analysis.specialisation import summary, write_report
    from hfedmoe.data.datasets import load_dataset
    from hfedmoe.experiment.report import Run
    from hfedmoe.foundation.seeding import ANALYSIS, rng_for
    from hfedmoe.model import ExpertModel

    with _errors():
        if by not in ("auto", "group", "label"):
            raise HFedMoEError(f"--by: unknown '{by}' (expected auto, group or label)")
        finished = path is not None and (path / "summary.json").is_file()
        if selection_only and not finished:
            raise HFedMoEError("--selection-only: PATH must be a finished run (with summary.json)")
        rounds = Run.load(path).rounds if finished else None
        cfg, model, tokenizer, out = _analysis_inputs(path, config, set_ or [], output_dir)
        if cfg.threads:  # as the run did (two runs side by side: one thread each)
            torch.set_num_threads(cfg.threads)
        _configure_logging()
        if selection_only:
            train = load_dataset(cfg.data, cfg.seed).train
            shape = ExpertModel(model).shape
            rng = rng_for(cfg.seed, ANALYSIS)
            rows = selection_cost(cfg, model, tokenizer, train, rounds, shape, rng)
            head, paths = (
                {"pooled_selection_ratio": pooled_ratio(rows)},
                [write_selection(rows, out)],
            )
        else:
            report = run_analysis(
                cfg, model, tokenizer, by=by, max_examples=max_examples, rounds=rounds
            )
            head = summary(report)
            paths = write_report(report, out, f"{cfg.name} ({path or 'initial model'})")
    table = Table(title=f"Specialisation: {path or cfg.name}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in head.items():
        table.add_row(key.replace("_", " "), f"{value:.4f}")
    Console().print(table)
    print(f"Report: {', '.join(str(p) for p in paths)}")


def _analysis_inputs(
    path: Path | None, config: Path | None, overrides: list[str], out: Path | None
):
    """The config, model, tokenizer and output directory of ``hfedmoe analyze``."""
    if path is not None and not path.is_dir():
        raise HFedMoEError(f"PATH: '{path}' is not a directory")
    run_dir = path is not None and (path / "model").is_dir()
    if config is None:
        if not run_dir:
            raise HFedMoEError("--config: needed unless PATH is a run directory (with config.toml)")
        config = path / "config.toml"
    cfg = config_mod.load(config, overrides)
    _preflight(cfg)
    if path is None:
        from hfedmoe.federation.workload import server_workload

        _build_if_needed(cfg)
        workload = server_workload(cfg)
        model, tokenizer = workload.model, workload.tokenizer
    else:
        from hfedmoe.model import load_checkpoint

        model, tokenizer = load_checkpoint(path / "model" if run_dir else path)
    default = Path("analysis") / cfg.name if path is None else path / "analysis"
    return cfg, model, tokenizer, out or default


@app.command()
def flower(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: RunDirOpt = None,
    connection: Annotated[
        str,
        typer.Option(
            help="A SuperLink connection of $FLWR_HOME/config.toml; 'local' = the Ray simulation."
        ),
    ] = "local",
    cpus_per_client: Annotated[
        int, typer.Option(min=1, help="Simulation: CPUs Ray gives each client.")
    ] = 1,
    app_dir: Annotated[
        Path | None, typer.Option(help="The Flower App directory (default: this repository).")
    ] = None,
    print_only: Annotated[
        bool, typer.Option("--print-only", help="Write the run config, print the command, stop.")
    ] = False,
) -> None:
    """Run an experiment on a Flower engine with `flwr run`: the Ray simulation (one simulated
    SuperNode per client) or, with --connection, a SuperLink and its SuperNodes."""
    from hfedmoe.engines.flower import LOCAL, flwr_command, run_flower, write_run_config
    from hfedmoe.engines.flower import app_dir as default_app_dir
    from hfedmoe.results import prepare_run_dir

    with _errors():
        cfg = config_mod.load(config, set_ or [])
        _preflight(cfg)
        run_dir = output_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}"
        prepare_run_dir(run_dir)
        simulated = connection == LOCAL
        cmd = flwr_command(
            app_dir or default_app_dir(),
            connection,
            write_run_config(cfg, run_dir),
            supernodes=cfg.federation.num_clients if simulated else None,
            cpus_per_client=cpus_per_client if simulated else None,
        )
    console.print(" ".join(cmd[:2] + [repr(c) if " " in c else c for c in cmd[2:]]))
    if print_only:
        return
    with _errors():  # exit status 2, as every command's errors
        _build_if_needed(cfg)  # here, with a progress bar, not inside the ServerApp
        summary = run_flower(cmd, run_dir)
    _print_summary(summary, run_dir)


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate a config (with overrides) and print it resolved, as TOML."""
    import tomli_w

    with _errors():
        cfg = config_mod.load(config, set_ or [])
        _preflight(cfg)
    sys.stdout.write(tomli_w.dumps(cfg.model_dump(exclude_none=True)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
