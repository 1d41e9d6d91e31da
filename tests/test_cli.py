"""Bad input: one line on stderr naming the problem, exit status 2, no traceback, and nothing
already on disk touched.

Most cases run the command in this process (``invoke_cli``); the first bad value, a missing
file, results already on disk and the shipped models run it as a user does, in a new process
(``run_cli``), so that what a shell sees (stderr, the exit status) stays proven."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from .support.cli import invoke_cli, run_cli
from .support.configs import tiny_raw

REPO = Path(__file__).resolve().parents[1]


def _assert_one_line_error(proc, fragment: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hfedmoe: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["federation.rounds=0"], "federation.rounds: Input should be greater than 0"),
        (["federation.num_clients=0"], "federation.num_clients"),
        (["federation.roundz=2"], "federation.roundz: unknown key"),
        (["train.lr=fast"], "train.lr: Input should be a valid number"),
        (["model.name_or_path=/no/such/model"], "model.name_or_path: directory '/no/such/model'"),
        (["algorithm=fedmagic"], "algorithm: unknown 'fedmagic'"),
    ],
)
def test_bad_config_values(overrides, fragment, tmp_path):
    args = [a for o in overrides for a in ("--set", o)]
    cli = run_cli if overrides == ["federation.rounds=0"] else invoke_cli  # one in a new process
    proc = cli("run", str(REPO / "configs" / "default.toml"), *args, "-o", str(tmp_path / "r"))
    _assert_one_line_error(proc, fragment)
    assert not (tmp_path / "r").exists()


def test_missing_config_file(tmp_path):
    _assert_one_line_error(run_cli("run", str(tmp_path / "nope.toml")), "does not exist")


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[train]\nlocal_stepz = 3\n")
    _assert_one_line_error(invoke_cli("run", str(path)), "train.local_stepz: unknown key")


def test_a_binary_config_file(tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    proc = invoke_cli("run", str(path), "-o", str(tmp_path / "r"))
    _assert_one_line_error(proc, f"config file '{path}' is not UTF-8 text (byte 0)")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "name",
    ["x/../../outside", "a/b", "a\\b", "..", ".hidden", "nul\x00", "tab\there", "", "x" * 101],
)
def test_a_name_that_would_leave_or_hide_the_run_folder(name, tmp_path, monkeypatch):
    """``name`` names the run's folder (runs/<time>-<name>): it may not leave runs/ or hide."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "x.toml"
    path.write_text(tomli_w.dumps({"name": name}))
    proc = invoke_cli("run", str(path))
    _assert_one_line_error(proc, "name: expected 1-100 letters, digits, '.', '_' or '-', not ")
    assert list(tmp_path.iterdir()) == [path]


def test_existing_results_are_never_overwritten(tiny_bert_dir, tmp_path):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tomli_w.dumps(tiny_raw(tiny_bert_dir)))
    proc = run_cli("run", str(cfg), "-o", str(run_dir))
    _assert_one_line_error(proc, "already exists and is not empty")
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_a_run_that_fails_before_its_first_record_leaves_no_folder(tiny_bert_dir, tmp_path):
    """A partition that cannot be drawn is found after the run folder exists: the folder (only
    its config.toml) goes again, so the same command, once fixed, can use the same -o."""
    raw = tiny_raw(tiny_bert_dir, data={"dirichlet_alpha": 0.001, "min_partition_size": 20})
    raw["federation"].update(num_clients=5, clients_per_round=2)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tomli_w.dumps(raw))
    for _ in range(2):  # the second time, the same folder is free again
        proc = invoke_cli("run", str(cfg), "-o", str(tmp_path / "r"), "--no-progress")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith("hfedmoe: error: data.dirichlet_alpha: 10 Dirichlet draws at ")
        assert not (tmp_path / "r").exists()


def test_shipped_models_pass_the_preflight_check():
    proc = run_cli(
        "validate",
        str(REPO / "configs" / "default.toml"),
        "--set",
        "model.name_or_path=SmolLM2-135M-Instruct",
        "--set",
        "data.task=language-modeling",
    )
    assert proc.returncode == 0, proc.stderr


def test_validate_prints_the_resolved_config():
    proc = invoke_cli("validate", str(REPO / "configs" / "default.toml"), "--set", "seed=5")
    assert proc.returncode == 0, proc.stderr
    assert "seed = 5" in proc.stdout and "[federation]" in proc.stdout


# --- bad data files, model directories and devices: caught before the run directory exists ---


def _rt_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "reviews.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("dataset", "content", "fragment"),
    [
        ("bbc_news", None, "must hold one folder per class"),  # an empty directory
        ("rotten_tomatoes", "", "lacks the column(s) category, movie_name, text"),
        ("rotten_tomatoes", "category,review,movie\nfresh,fine,x\n", "lacks the column(s)"),
        ("rotten_tomatoes", "category,text,movie_name\n", "has no fresh or rotten reviews"),
        (
            "rotten_tomatoes",
            "category,text,movie_name\nfresh,good,a\nmeh,so so,b\n",
            "line 3: unknown category 'meh' (expected fresh, rotten or plot)",
        ),
    ],
)
def test_bad_data_files(dataset, content, fragment, tiny_bert_dir, tmp_path):
    if content is None:
        (data := tmp_path / "empty").mkdir()
        path = str(data)
    else:
        path = _rt_file(tmp_path, content)
    cfg = tmp_path / "tiny.toml"
    raw = tiny_raw(tiny_bert_dir)
    raw["data"] = {"dataset": dataset, "path": path}
    cfg.write_text(tomli_w.dumps(raw))
    proc = invoke_cli("run", str(cfg), "-o", str(tmp_path / "r"))
    _assert_one_line_error(proc, fragment)
    assert not (tmp_path / "r").exists()


def _broken_model(tiny_bert_dir: Path, tmp_path: Path, broken: str) -> Path:
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, directory)
    if broken == "no config":
        (directory / "config.json").unlink()
    elif broken == "no weights":
        (directory / "model.safetensors").unlink()
    elif broken == "no tokenizer":
        for f in directory.glob("*"):
            if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
                f.unlink()
    elif broken == "gpt2":
        (directory / "config.json").write_text('{"model_type": "gpt2"}')
    elif broken == "garbled config":
        (directory / "config.json").write_text("{not json")
    return directory


@pytest.mark.parametrize(
    ("broken", "fragment"),
    [
        ("no config", "has no config.json"),
        ("no weights", "has no weights (expected one of: model.safetensors"),
        ("no tokenizer", "has no tokenizer"),
        ("gpt2", "model type 'gpt2' is not supported"),
        ("garbled config", "config.json' is not a usable config"),
    ],
)
def test_bad_model_directories(broken, fragment, tiny_bert_dir, tmp_path):
    directory = _broken_model(tiny_bert_dir, tmp_path, broken)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tomli_w.dumps(tiny_raw(directory)))
    proc = invoke_cli("run", str(cfg), "-o", str(tmp_path / "r"))
    _assert_one_line_error(proc, fragment)
    assert not (tmp_path / "r").exists()


def test_a_device_too_small_for_one_expert(tiny_bert_dir, tmp_path):
    raw = tiny_raw(tiny_bert_dir)
    raw["devices"] = {"tiers": [{"name": "toaster", "memory": 1000}]}
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tomli_w.dumps(raw))
    proc = invoke_cli("run", str(cfg), "-o", str(tmp_path / "r"))
    _assert_one_line_error(proc, "devices.tiers[0] ('toaster')")
    assert not (tmp_path / "r").exists()
