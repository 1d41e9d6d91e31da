"""Checkpoint and resume: a run killed with SIGKILL at any moment, then resumed with
``hfedmoe run --resume``, ends with exactly the weights and metrics of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hfedmoe
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.results import RunRecorder, read_metrics, without
from hfedmoe.results.run_state import (
    CHECKPOINT_FILE,
    RunState,
    code_digest,
    flatten,
    load_run_state,
    read_header,
    save_run_state,
)

from .support.cli import (
    checkpoint_round,
    interrupt_at_call,
    invoke_cli,
    kill_at_call,
    kill_when,
    run_to_the_end,
)
from .support.tiers import three_tiers

ROUNDS = 4


# --- the checkpoint file -----------------------------------------------------------------------


def _state(round_: int = 3) -> RunState:
    return RunState(
        round=round_,
        weights={"a.weight": torch.arange(6.0).reshape(2, 3), "b/c": torch.tensor([1], dtype=int)},
        algorithm={"importance": {1001: torch.ones(2, 4)}, "examples": {"1001": 12}},
        nodes={1002: {"memory": {"router/layer.0.gate": torch.zeros(3)}}},
        devices=[{"node_id": 1001, "tier": "phone", "expert_budget": 4}],
        rounds=[{"round": r, "test_accuracy": r / 4} for r in range(round_ + 1)],
        elapsed_seconds=12.5,
    )


def _log(run_dir: Path, rounds: list[dict], tail: str = "") -> None:
    """metrics.jsonl as the recorder appends it (before each round's checkpoint)."""
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds) + tail)


def test_run_state_round_trips_through_one_file(tmp_path):
    state = _state()
    save_run_state(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temporary left
    # the rounds' metrics come from metrics.jsonl; a round after the checkpoint and a line a
    # kill cut short are what a crash left behind
    _log(tmp_path, [*state.rounds, {"round": 4, "test_accuracy": 1.0}], tail='{"round": 5, "te')
    back = load_run_state(tmp_path)
    assert back.round == 3 and back.elapsed_seconds == 12.5
    assert back.devices == state.devices and back.rounds == state.rounds
    assert all(torch.equal(back.weights[k], v) for k, v in state.weights.items())
    assert back.weights["b/c"].dtype == torch.int64
    assert torch.equal(back.algorithm["importance"]["1001"], torch.ones(2, 4))
    assert back.algorithm["examples"] == {"1001": 12}
    assert torch.equal(back.nodes[1002]["memory"]["router/layer.0.gate"], torch.zeros(3))


@settings(max_examples=40, deadline=None)
@given(
    st.recursive(
        st.integers(-5, 5) | st.builds(lambda n: torch.arange(float(n)), st.integers(1, 4)),
        lambda inner: st.dictionaries(st.sampled_from("abc"), inner, min_size=1, max_size=3),
        max_leaves=8,
    ).filter(lambda t: isinstance(t, dict))
)
def test_flatten_then_unflatten_is_the_identity(tree):
    from hfedmoe.results.run_state import unflatten

    tensors, rest = flatten(tree, "x")
    back = unflatten(tensors, rest, "x")

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, dict):
            return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
        return a == b

    assert same(tree, back)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_run_state(tmp_path, _state(round_=2))
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    def crash(*args, **kwargs):
        # like safetensors >= 0.7: a ".tmpXXXXXX" beside the target, then the failure
        (Path(args[1]).parent / ".tmpAbCdEf").write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("hfedmoe.results.run_state.save_file", crash)
    with pytest.raises(HFedMoEError, match=r"cannot write '.*checkpoint\.safetensors': disk full"):
        save_run_state(tmp_path, _state(round_=3))
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    _log(tmp_path, _state(round_=2).rounds)
    assert load_run_state(tmp_path).round == 2


def test_the_checkpoint_header_does_not_grow_with_the_rounds(tmp_path):
    sizes = []
    for round_ in (1, 200):
        save_run_state(tmp_path, _state(round_))
        with open(tmp_path / CHECKPOINT_FILE, "rb") as f:
            sizes.append(int.from_bytes(f.read(8), "little"))  # safetensors' header length
    assert sizes[0] == sizes[1]
    _log(tmp_path, _state(200).rounds[:150])
    with pytest.raises(HFedMoEError, match="lacks round 150"):
        load_run_state(tmp_path)


def test_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(HFedMoEError, match=r"has no checkpoint\.safetensors"):
        load_run_state(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(HFedMoEError, match="is not a readable checkpoint"):
        load_run_state(tmp_path)
    save_file({"x": torch.zeros(1)}, tmp_path / CHECKPOINT_FILE, metadata={"format_version": "1"})
    with pytest.raises(HFedMoEError, match="lacks 'round'"):
        load_run_state(tmp_path)


def test_a_checkpoint_names_the_code_that_wrote_it(tmp_path):
    save_run_state(tmp_path, _state(round_=1))
    assert read_header(tmp_path)["code"] == code_digest()
    assert code_digest().startswith(f"{hfedmoe.__version__}+")


def _record(round_: int) -> dict:
    """A metrics record as the ServerApp logs it: round 0 has no clients."""
    clients = [{"node_id": 7 + i, "status": "ok", "train_loss": round_ / 2} for i in range(2)]
    return {"round": round_, "test_accuracy": round_ / 10, "clients": clients if round_ else []}


def test_a_resume_rewrites_each_metrics_file_as_its_rounds_wrote_it(tmp_path):
    """A resume replaces metrics.jsonl, metrics.csv and clients.csv whole, each by what the
    checkpoint's rounds had written, byte for byte: a round after the checkpoint, and a line a
    kill cut short, are gone."""
    cfg, names = ExperimentConfig(), ("metrics.jsonl", "metrics.csv", "clients.csv")
    whole = RunRecorder(tmp_path / "whole", cfg)
    for r in range(3):
        whole.log_round(_record(r))
    crashed = RunRecorder(tmp_path / "crashed", cfg)
    for r in range(4):
        crashed.log_round(_record(r))
    with (crashed.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "te')
    state = RunState(round=2, weights={}, rounds=[_record(r) for r in range(3)])
    RunRecorder(crashed.run_dir, cfg, resume=state)
    for name in names:
        assert (crashed.run_dir / name).read_bytes() == (whole.run_dir / name).read_bytes()
    RunRecorder(crashed.run_dir, cfg, resume=RunState(round=0, weights={}, rounds=[_record(0)]))
    assert not (crashed.run_dir / "clients.csv").exists()  # round 0 has no client rows


# --- real SIGKILLs of a real run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def config_file(tiny_bert_dir, tmp_path_factory) -> Path:
    """FLEX-MoE on three device tiers: server-side fitness, personal routers kept by the nodes,
    budget failures; every kind of state a resume must restore."""
    raw = three_tiers(tiny_bert_dir, "flexmoe")
    raw["federation"]["rounds"] = ROUNDS
    path = tmp_path_factory.mktemp("resume-cfg") / "flex.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def uninterrupted(config_file, tmp_path_factory) -> Path:
    return run_to_the_end(tmp_path_factory.mktemp("resume") / "whole", str(config_file))


def _records(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _assert_same_end(run_dir: Path, uninterrupted: Path) -> None:
    assert without(read_metrics(run_dir)) == without(read_metrics(uninterrupted))
    ours = load_file(run_dir / "model" / "model.safetensors")
    theirs = load_file(uninterrupted / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit
    skip = {"wall_seconds", "run_dir"}
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((uninterrupted / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in skip} == {
        k: v for k, v in expected.items() if k not in skip
    }
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporaries
    assert not (run_dir / CHECKPOINT_FILE).exists()  # finished: nothing resumes it


@pytest.mark.slow  # the kill at each step of a resume (below) covers a second kill (CI time)
def test_killed_twice_mid_run_then_resumed_ends_exactly_as_uninterrupted(
    config_file, uninterrupted, tmp_path
):
    run_dir = tmp_path / "killed"
    # 1: the moment round 1's metrics are written (its checkpoint may or may not be on disk yet)
    kill_when(["run", str(config_file), "-o", str(run_dir)], lambda: _records(run_dir) >= 2)
    assert checkpoint_round(run_dir) in (0, 1)
    # 2: the resumed run, 50 ms after it checkpointed round 2 (inside round 3)
    kill_when(["run", "--resume", str(run_dir)], lambda: checkpoint_round(run_dir) >= 2, 0.05)
    assert 2 <= checkpoint_round(run_dir) < ROUNDS
    _assert_same_end(run_to_the_end(run_dir), uninterrupted)


def test_killed_at_each_step_of_its_resume_then_resumed_ends_exactly_as_uninterrupted(
    config_file, uninterrupted, tmp_path
):
    """A resume replaces config.toml, metrics.jsonl, metrics.csv and clients.csv one after the
    other, each whole and atomically: killed before any of these steps, the run can still be
    resumed from the same checkpoint, and it ends exactly as an uninterrupted run."""
    run_dir = tmp_path / "killed"
    kill_when(["run", str(config_file), "-o", str(run_dir)], lambda: checkpoint_round(run_dir) >= 1)
    checkpointed = checkpoint_round(run_dir)
    assert 1 <= checkpointed < ROUNDS
    for step in (1, 2, 3, 4):  # the resume's four replacements
        resume = ["run", "--resume", str(run_dir)]
        kill_at_call(resume, "hfedmoe.results.recorder:write_atomic", step)
        assert checkpoint_round(run_dir) == checkpointed  # it and its rounds' metrics still load
    _assert_same_end(run_to_the_end(run_dir), uninterrupted)


def test_ctrl_c_says_how_to_go_on_and_the_run_then_ends_as_uninterrupted(
    config_file, uninterrupted, tmp_path
):
    """Ctrl-C in a round: one line naming the command that continues, the shell's status for
    SIGINT (130), and that command ends the run exactly as an uninterrupted run."""
    run_dir = tmp_path / "stopped"
    # as round 2's checkpoint is about to be written: rounds 0 and 1 are checkpointed
    status, stderr = interrupt_at_call(
        ["run", str(config_file), "-o", str(run_dir)],
        "hfedmoe.federation.server_app:save_run_state",
        3,
    )
    assert status == 130, stderr
    assert checkpoint_round(run_dir) == 1
    assert stderr.strip().splitlines()[-1] == (
        f"hfedmoe: interrupted; 'hfedmoe run --resume {run_dir}' continues this run"
    )
    _assert_same_end(run_to_the_end(run_dir), uninterrupted)


def test_killed_before_its_first_checkpoint_then_resumed_starts_over(
    config_file, uninterrupted, tmp_path
):
    """Killed before round 0's checkpoint was complete (seen: 17 s into the default job, while
    it was being written): --resume starts the run over in its directory, cleans what the
    interrupted write left, and ends exactly as an uninterrupted run."""
    run_dir = tmp_path / "early"
    kill_when(
        ["run", str(config_file), "-o", str(run_dir)], lambda: (run_dir / "config.toml").exists()
    )
    assert not (run_dir / CHECKPOINT_FILE).exists()
    (run_dir / f".{CHECKPOINT_FILE}-interrupted").mkdir()  # a write the kill cut off
    (run_dir / "metrics.jsonl").write_text('{"round": 0, "test_acc')  # and a record
    _assert_same_end(run_to_the_end(run_dir), uninterrupted)


def test_killed_while_saving_the_final_model_then_resumed(config_file, uninterrupted, tmp_path):
    run_dir = tmp_path / "final"
    kill_when(
        ["run", str(config_file), "-o", str(run_dir)], lambda: checkpoint_round(run_dir) == ROUNDS
    )
    assert not (run_dir / "summary.json").exists()
    _assert_same_end(run_to_the_end(run_dir), uninterrupted)


def test_resume_refuses_what_it_cannot_continue(config_file, uninterrupted, tmp_path):
    proc = invoke_cli("run", "--resume", str(uninterrupted))
    assert proc.returncode == 2 and "has already finished" in proc.stderr
    proc = invoke_cli("run", "--resume", str(tmp_path))
    assert proc.returncode == 2 and "has no config.toml" in proc.stderr
    proc = invoke_cli("run", str(config_file), "--resume", str(uninterrupted))
    assert proc.returncode == 2 and "takes only the run directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_flux_resumed_mid_run_ends_exactly_as_uninterrupted(tiny_bert_dir, tmp_path):
    """FLUX's server keeps every client's utility table between rounds, and each node its stale
    profile (node memory): a resume restores both."""
    raw = three_tiers(tiny_bert_dir, "flux")
    raw["federation"]["rounds"] = 3
    config = tmp_path / "flux.toml"
    config.write_text(tomli_w.dumps(raw))
    whole = run_to_the_end(tmp_path / "whole", str(config))
    run_dir = tmp_path / "killed"
    kill_when(["run", str(config), "-o", str(run_dir)], lambda: checkpoint_round(run_dir) >= 1)
    assert 1 <= checkpoint_round(run_dir) < 3
    _assert_same_end(run_to_the_end(run_dir), whole)


def test_a_descent_checked_run_resumed_mid_run_ends_exactly_as_uninterrupted(
    tiny_bert_dir, tmp_path
):
    """The descent check's reference is recomputed from the restored weights each round: a
    resumed run rejects the same replies and ends where the uninterrupted one does."""
    raw = three_tiers(tiny_bert_dir, "fedavg")
    raw["federation"].update(rounds=3, descent_check=True)
    raw["data"]["validation_fraction"] = 0.2
    raw["faults"] = {"attackers": [1], "attack": "sign-flip"}
    config = tmp_path / "descent.toml"
    config.write_text(tomli_w.dumps(raw))
    whole = run_to_the_end(tmp_path / "whole", str(config))
    assert any(
        c["descent_cosine"] is not None for c in read_metrics(tmp_path / "whole")[1]["clients"]
    )
    run_dir = tmp_path / "killed"
    kill_when(["run", str(config), "-o", str(run_dir)], lambda: checkpoint_round(run_dir) >= 1)
    assert 1 <= checkpoint_round(run_dir) < 3
    _assert_same_end(run_to_the_end(run_dir), whole)
