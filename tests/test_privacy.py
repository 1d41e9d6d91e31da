"""Client-level differential privacy (``[privacy]``): DP-FedAvg's clipping, noise and fixed
denominator by hand, one client's influence bounded whatever it sends, the noise's standard
deviation measured, epsilon from dp-accounting, and private runs end to end.
"""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import tomli_w
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import hfedmoe.federation.server_app as server_app_module
from hfedmoe.algorithms import ClientUpdate, build_algorithm
from hfedmoe.algorithms.base import DP_SECRET
from hfedmoe.algorithms.maths import accounting
from hfedmoe.algorithms.maths.privacy import (
    adaptive_clip_norm,
    clip_factor,
    clipped_deltas,
    joint_norm,
    sum_noise_multiplier,
)
from hfedmoe.algorithms.mechanics.privacy import Mechanism, PrivateSum
from hfedmoe.algorithms.mechanics.uploads import UploadSpec
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation import wire
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.strategy import AlgorithmStrategy
from hfedmoe.foundation.config import validate
from hfedmoe.foundation.errors import ConfigError, HFedMoEError
from hfedmoe.results import read_metrics, without

from .support.cli import checkpoint_round, kill_when, run_to_the_end
from .support.configs import tiny_raw

# --- the arithmetic by hand --------------------------------------------------------------------


def test_an_update_is_clipped_as_one_vector_by_hand():
    # (3, 4) and (12,): one vector of norm 13; clipped to 6.5, every part is halved
    w = {"a": torch.zeros(2), "b": torch.ones(1)}
    x = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([13.0])}
    deltas, norm = clipped_deltas(x, w, 6.5)
    assert norm == pytest.approx(13.0)
    assert deltas["a"].tolist() == pytest.approx([1.5, 2.0])
    assert deltas["b"].tolist() == pytest.approx([6.0])
    assert joint_norm(deltas.values()) == pytest.approx(6.5)
    assert clip_factor(5.0, 6.5) == 1.0  # inside the ball: unchanged


def _spec(*names: str) -> UploadSpec:
    return UploadSpec(required=frozenset(names))


def _fold(global_weights, replies, clip_norm=1.0, z=0.0, d=4, seed=0) -> dict:
    spec = _spec(*global_weights)
    fold = PrivateSum(
        global_weights, spec, Mechanism(clip_norm, z, d), torch.Generator().manual_seed(seed)
    )
    for weights in replies:
        fold.add(ClientUpdate(weights=weights, num_examples=10))
    return fold.finish()


def test_the_release_is_the_clipped_sum_over_the_fixed_denominator_by_hand():
    # d = 4 clients sampled, two replied: w + (Delta_1 + clip(Delta_2)) / 4, with no noise;
    # client 2's update (0, 4) is clipped to (0, 1); "b" nobody sent stays where it was
    w = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([5.0])}
    one = {"a": torch.tensor([1.5, 1.0])}  # Delta (0.5, 0), inside C = 1
    two = {"a": torch.tensor([1.0, 5.0])}  # Delta (0, 4) -> (0, 1)
    new = _fold(w, [one, two])
    assert new["a"].tolist() == pytest.approx([1.0 + 0.5 / 4, 1.0 + 1.0 / 4])
    assert new["b"].tolist() == [5.0]
    assert new["a"].dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(min_value=1e-3, max_value=1e12),
    sign=st.sampled_from([-1.0, 1.0]),
    d=st.integers(min_value=1, max_value=8),
)
def test_one_client_moves_the_release_by_at_most_c_over_d_whatever_it_sends(scale, sign, d):
    torch.manual_seed(0)
    w = {"a": torch.randn(6), "b": torch.randn(3, 2)}
    honest = [{k: v + 0.3 * torch.randn_like(v) for k, v in w.items()} for _ in range(2)]
    hostile = {k: v + sign * scale * torch.ones_like(v) for k, v in w.items()}
    without = _fold(w, honest, clip_norm=0.5, d=d)
    with_it = _fold(w, [*honest, hostile], clip_norm=0.5, d=d)
    moved = joint_norm(with_it[k].double() - without[k].double() for k in w)
    assert moved <= 0.5 / d * (1 + 1e-5)


def test_the_noise_has_the_specified_standard_deviation_on_every_key():
    # s = 2 z C on the sum, so s / d on the release: 2 x 1.5 x 0.4 / 3 = 0.4, on the key a
    # client sent and on the one nobody sent; 2 x 10^5 draws give its std to about 0.2%
    w = {"sent": torch.zeros(100_000), "unsent": torch.zeros(100_000)}
    new = _fold(w, [{"sent": torch.zeros(100_000)}], clip_norm=0.4, z=1.5, d=3, seed=7)
    for key in w:
        x = new[key].double()
        assert float(x.mean()) == pytest.approx(0.0, abs=0.4 * 5 / math.sqrt(1e5))
        assert float(x.std()) == pytest.approx(0.4, rel=0.01)
    assert not torch.equal(new["sent"], new["unsent"])  # independent draws
    again = _fold(w, [{"sent": torch.zeros(100_000)}], clip_norm=0.4, z=1.5, d=3, seed=7)
    assert all(torch.equal(new[k], again[k]) for k in w)  # seeded: a resumed round repeats


# --- adaptive clipping (Andrew et al. 2021) ----------------------------------------------------


def test_the_clipping_norm_moves_towards_the_target_quantile_by_hand():
    # eq. P4: C' = C exp(-eta (b - gamma)); 3 of 4 unclipped where half should be: C shrinks
    assert adaptive_clip_norm(1.0, 0.75, 0.5, 0.2) == pytest.approx(math.exp(-0.05))
    assert adaptive_clip_norm(2.0, 0.25, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.05))
    assert adaptive_clip_norm(2.0, 0.5, 0.5, 0.2) == 2.0  # on target: unchanged


def test_the_count_takes_its_share_of_the_noise_by_hand():
    # eq. P5: z = 1 split with z_b = 2 leaves (1 - 1/4)^(-1/2) = 1.1547 for the updates
    assert sum_noise_multiplier(1.0, 2.0) == pytest.approx(1 / math.sqrt(0.75))
    with pytest.raises(ValueError, match="must exceed the noise multiplier"):
        sum_noise_multiplier(1.0, 1.0)
    # the mechanism's noise on the sum is 2 z_D C
    assert Mechanism(0.5, 1.0, 4, count_noise=2.0).noise_std == pytest.approx(1 / math.sqrt(0.75))


def test_the_fold_releases_the_share_of_replies_it_did_not_clip():
    # C = 1: updates of norm 0.5, 2 and 0.1 -> 2 unclipped of d = 4 sampled; with a negligible
    # count noise the release is 2 / 4
    w = {"a": torch.zeros(2)}
    fold = PrivateSum(
        w, _spec("a"), Mechanism(1.0, 0.0, 4, count_noise=1e-12), torch.Generator().manual_seed(0)
    )
    for delta in ([0.3, 0.4], [0.0, 2.0], [0.1, 0.0]):
        fold.add(ClientUpdate(weights={"a": torch.tensor(delta)}, num_examples=1))
    fold.finish()
    assert fold.counts == {"dp_clipped": 1, "dp_replies": 3}
    assert fold.unclipped_fraction == pytest.approx(0.5)


# --- noise on each client (local DP) ----------------------------------------------------------


def _local(tiny_bert_dir, **privacy):
    raw = tiny_raw(tiny_bert_dir, privacy={**PRIVATE, "noise": "client", **privacy})
    return build_algorithm(validate(raw))


def test_a_client_clips_its_update_and_adds_noise_of_std_2zc(tiny_bert_dir):
    # C = 0.5, z = 1: s = 1 on every coordinate; the update (3, 4) is clipped to (0.3, 0.4)
    algorithm = _local(tiny_bert_dir)
    w = {"a": torch.zeros(2), "b": torch.zeros(200_000)}
    x = {"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(200_000)}
    noised = algorithm.noised(ClientUpdate(weights=x, num_examples=1), w, 1, 0).weights
    assert float(noised["b"].double().std()) == pytest.approx(1.0, rel=0.01)
    quiet = _local(tiny_bert_dir, noise_multiplier=1e-9)
    clipped = quiet.noised(ClientUpdate(weights=x, num_examples=1), w, 1, 0).weights
    assert clipped["a"].tolist() == pytest.approx([0.3, 0.4])
    # each reply draws its own noise from a secret of its own: the same client and round again
    # draws other noise, which nobody who knows the config's seed can subtract
    again = algorithm.noised(ClientUpdate(weights=x, num_examples=1), w, 1, 0).weights
    assert not torch.equal(noised["b"], again["b"])
    # with reproducible_noise, for (seed, round, client): each client its own, the same again
    seeded = _local(tiny_bert_dir, reproducible_noise=True)
    first = seeded.noised(ClientUpdate(weights=x, num_examples=1), w, 1, 0).weights
    other = seeded.noised(ClientUpdate(weights=x, num_examples=1), w, 1, 1).weights
    again = seeded.noised(ClientUpdate(weights=x, num_examples=1), w, 1, 0).weights
    assert not torch.equal(first["b"], other["b"]) and torch.equal(first["b"], again["b"])


def test_a_noised_reply_carries_no_statistic_of_where_the_data_routed(tiny_bert_dir):
    algorithm = _local(tiny_bert_dir)
    w = {"a": torch.zeros(2)}
    update = ClientUpdate(
        weights={"a": torch.ones(2)},
        num_examples=5,
        metrics={"train_loss": 0.7, "steps": 3.0, "experts_routed": 9.0, "train_seconds": 1.5},
        stats={"expert_updates": torch.tensor([[3, 0], [1, 2]])},
    )
    noised = algorithm.noised(update, w, 1, 0)
    assert noised.metrics == {"train_loss": 0.7, "steps": 3.0}  # what the server requires
    assert noised.stats["expert_updates"].tolist() == [[0, 0], [0, 0]]
    assert noised.num_examples == 5


def test_local_epsilon_is_the_gaussian_mechanism_composed_over_every_round():
    # the server sees whom it sampled: no amplification, each client as if in every round
    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.GaussianDpEvent(3.0), 10)
    assert accounting.epsilon(3.0, 10, 8, None, 1e-5) == pytest.approx(direct.get_epsilon(1e-5))


def test_local_dp_covers_only_a_method_whose_uploads_are_dense(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir, algorithm="hfedmoe", privacy={**PRIVATE, "noise": "client"})
    with pytest.raises(ConfigError, match=r"privacy\.noise: 'client' does not cover .*'hfedmoe'"):
        build_algorithm(validate(raw))
    raw = tiny_raw(tiny_bert_dir, privacy={**PRIVATE, "noise": "client", "clipping": "adaptive"})
    with pytest.raises(ConfigError, match=r"privacy\.clipping: expected 'fixed'"):
        validate(raw)


def test_the_server_accepts_every_honest_noisy_reply_and_adds_no_noise_of_its_own(
    tiny_bert_dir, tmp_path
):
    metrics, weights = _private_run(tiny_bert_dir, tmp_path / "run", noise="client")
    for record in metrics[1:]:
        assert record["clients_ok"] == record["dp_replies"] == 2  # none rejected as too long
        assert record["dp_clipped"] == 0  # the server's bound C + s (sqrt(n) + 8) never binds
        assert record["dp_epsilon"] == accounting.epsilon(1.0, record["round"], 3, None, 1e-5)
    assert all(torch.isfinite(t).all() for t in weights.values())


# --- the accountant ---------------------------------------------------------------------------


def test_epsilon_is_dp_accountings_rdp_over_fixed_size_samples():
    # the library's own computation for the same parameters: 10 rounds of 4 of 8 clients
    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(8, 4, dp_accounting.GaussianDpEvent(1.2))
    direct.compose(dp_accounting.SelfComposedDpEvent(event, 10))
    assert accounting.epsilon(1.2, 10, 8, 4, 1e-5) == direct.get_epsilon(1e-5)
    # sampling everyone is the plain Gaussian mechanism, composed
    everyone = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    everyone.compose(dp_accounting.GaussianDpEvent(1.2), 10)
    assert accounting.epsilon(1.2, 10, 8, 8, 1e-5) == pytest.approx(everyone.get_epsilon(1e-5))
    # sampling half the clients spends less; more rounds spend more; nothing before round 1
    assert accounting.epsilon(1.2, 10, 8, 4, 1e-5) < accounting.epsilon(1.2, 10, 8, 8, 1e-5)
    assert accounting.epsilon(1.2, 5, 8, 4, 1e-5) < accounting.epsilon(1.2, 10, 8, 4, 1e-5)
    assert accounting.epsilon(1.2, 0, 8, 4, 1e-5) == 0.0


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_the_calibrated_noise_spends_the_target_epsilon(target):
    z = accounting.noise_for_epsilon(target, 10, 8, 4, 1e-5)
    assert accounting.epsilon(z, 10, 8, 4, 1e-5) <= target * (1 + 1e-6)
    assert accounting.epsilon(z * 0.98, 10, 8, 4, 1e-5) > target  # the least noise that does


def test_the_default_delta_is_below_one_over_the_number_of_clients():
    assert accounting.default_delta(8) == 1e-5
    assert accounting.default_delta(100_000) == pytest.approx(100_000**-1.1)


# --- the config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("privacy", "fragment"),
    [
        ({"enabled": True, "noise_multiplier": 1.0}, r"privacy\.clip_norm: needed"),
        ({"enabled": True, "clip_norm": 1.0}, r"privacy: set exactly one of"),
        (
            {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 3.0},
            r"privacy: set exactly one of",
        ),
    ],
)
def test_an_incomplete_privacy_section_is_one_clear_error(tiny_bert_dir, privacy, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(tiny_raw(tiny_bert_dir, privacy=privacy))


PRIVATE = {"enabled": True, "clip_norm": 0.5, "noise_multiplier": 1.0}


def test_a_robust_aggregator_is_refused_under_privacy(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir, privacy=PRIVATE, federation={"robust": "median"})
    with pytest.raises(ConfigError, match=r"federation\.robust: .* expected 'none'"):
        validate(raw)


@pytest.mark.parametrize(
    ("algorithm", "hfedmoe", "why"),
    [
        ("flexmoe", {}, "assigns experts from the usage clients report"),
        ("fedmoe", {}, "recommends sub-MoEs"),
        ("flux", {}, "roles from the utilities"),
        ("hfedmoe", {"mode": "strict"}, "strict"),
    ],
)
def test_a_method_whose_server_plans_from_reports_is_refused(
    tiny_bert_dir, algorithm, hfedmoe, why
):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm=algorithm, privacy=PRIVATE, hfedmoe=hfedmoe))
    with pytest.raises(
        ConfigError, match=rf"privacy\.enabled: algorithm '{algorithm}' is not covered: .*{why}"
    ):
        build_algorithm(cfg)


# --- private runs -----------------------------------------------------------------------------


def _private_run(tiny_bert_dir, run_dir, algorithm="fedavg", **privacy):
    raw = tiny_raw(
        tiny_bert_dir,
        algorithm=algorithm,
        federation={"num_clients": 3, "clients_per_round": 2, "rounds": 2},
        privacy={**PRIVATE, **privacy},
    )
    run_embedded(validate(raw), str(run_dir), server_app, client_app)
    return read_metrics(run_dir), load_file(run_dir / "model" / "model.safetensors")


@pytest.mark.parametrize("algorithm", ["fedavg", "hfedmoe"])
def test_a_private_run_records_the_epsilon_it_spent_each_round(
    tiny_bert_dir, tmp_path, algorithm, monkeypatch
):
    secrets_kept = []  # the secret in each checkpoint the server writes
    save = server_app_module.save_run_state

    def save_and_note(run_dir, state):
        secrets_kept.append(state.algorithm.get(DP_SECRET))
        return save(run_dir, state)

    monkeypatch.setattr(server_app_module, "save_run_state", save_and_note)
    metrics, weights = _private_run(tiny_bert_dir, tmp_path / "run", algorithm)
    # drawn as the run starts: round 0's checkpoint already holds it, and every later one the same
    assert len(secrets_kept) == 3 and len(set(secrets_kept)) == 1 and len(secrets_kept[0]) == 64
    for record in metrics[1:]:
        spent = accounting.epsilon(1.0, record["round"], 3, 2, 1e-5)
        assert record["dp_epsilon"] == spent and record["dp_delta"] == 1e-5
        assert record["dp_noise_multiplier"] == 1.0
        assert record["dp_replies"] == record["clients_ok"] == 2
    assert metrics[2]["dp_epsilon"] > metrics[1]["dp_epsilon"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dp_epsilon"] == metrics[2]["dp_epsilon"] and summary["dp_delta"] == 1e-5
    assert all(torch.isfinite(t).all() for t in weights.values())
    # the noise comes from the run's own secret: the same config again draws other noise
    _, weights_again = _private_run(tiny_bert_dir, tmp_path / "again", algorithm)
    assert not all(torch.equal(weights[k], weights_again[k]) for k in weights)
    # the secret lives in the checkpoint while the run goes (for a resume), which a finished
    # run deletes: no file of it holds the secret
    for path in (tmp_path / "run").rglob("*"):
        assert not path.is_file() or DP_SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow  # CI time: the by-hand tests of eq. P4 and the fold above cover it
def test_adaptive_clipping_moves_the_norm_each_round_from_the_released_count(
    tiny_bert_dir, tmp_path
):
    metrics, _ = _private_run(
        tiny_bert_dir, tmp_path / "run", clipping="adaptive", clip_learning_rate=0.5
    )
    one, two = metrics[1], metrics[2]
    assert one["dp_clip_norm"] == PRIVATE["clip_norm"]  # the first round clips at clip_norm
    assert two["dp_clip_norm"] == pytest.approx(
        adaptive_clip_norm(one["dp_clip_norm"], one["dp_unclipped_fraction"], 0.5, 0.5)
    )
    # the count's noise is its own share of z: epsilon is the accountant's for z as before
    assert two["dp_epsilon"] == accounting.epsilon(1.0, 2, 3, 2, 1e-5)


def test_the_secret_survives_a_checkpoint_and_draws_the_same_noise_and_sample(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, privacy=PRIVATE))
    algorithm = build_algorithm(cfg)
    assert algorithm.checkpoint_state() == algorithm.state_dict()  # no secret before a draw
    sample = algorithm.sampling_rng(3).permutation(100)
    again = build_algorithm(cfg)
    assert not (again.sampling_rng(3).permutation(100) == sample).all()  # a secret of its own
    again.restore_state(algorithm.checkpoint_state())
    assert (again.sampling_rng(3).permutation(100) == sample).all()
    assert again._private_seed(14, 3) == algorithm._private_seed(14, 3)
    # with reproducible_noise, the config's seed: what an experiment that must repeat uses
    seeded = validate(tiny_raw(tiny_bert_dir, privacy={**PRIVATE, "reproducible_noise": True}))
    assert (
        build_algorithm(seeded).sampling_rng(3).permutation(100)
        == build_algorithm(seeded).sampling_rng(3).permutation(100)
    ).all()
    assert build_algorithm(seeded).checkpoint_state() == build_algorithm(seeded).state_dict()


def test_a_private_round_that_accepts_no_reply_still_releases_its_noise(tiny_bert_dir, tmp_path):
    # every client takes no part: the model must still move, or an unmoved model would tell
    # that no reply was accepted
    raw = tiny_raw(
        tiny_bert_dir,
        federation={"num_clients": 3, "clients_per_round": 2, "rounds": 1},
        privacy=PRIVATE,
        faults={"attackers": [0, 1, 2], "attack": "dropout"},
    )
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    metrics = read_metrics(tmp_path / "run")
    assert metrics[1]["clients_ok"] == 0 and metrics[1]["train_loss"] is None
    assert metrics[1]["dp_epsilon"] == accounting.epsilon(1.0, 1, 3, 2, 1e-5)
    assert metrics[1]["test_loss"] != metrics[0]["test_loss"]  # the noise moved the model


def test_the_next_clipping_norm_survives_a_checkpoint(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, privacy={**PRIVATE, "clipping": "adaptive"}))
    algorithm = build_algorithm(cfg)
    algorithm._clip_norm = 0.123
    state = algorithm.checkpoint_state()
    again = build_algorithm(cfg)
    again.restore_state(state)
    assert again._clip_norm == 0.123
    fixed = build_algorithm(validate(tiny_raw(tiny_bert_dir, privacy=PRIVATE)))
    assert fixed.checkpoint_state() == fixed.state_dict()  # nothing new where it is fixed


def test_a_count_noise_that_leaves_the_updates_none_is_refused(tiny_bert_dir):
    privacy = {**PRIVATE, "clipping": "adaptive", "count_noise": 0.5}  # z = 1
    algorithm = build_algorithm(validate(tiny_raw(tiny_bert_dir, privacy=privacy)))
    with pytest.raises(ConfigError, match=r"privacy\.count_noise: 0\.5 leaves no noise"):
        algorithm.count_noise(4)


def test_a_run_stops_before_the_round_that_would_overspend_its_budget(tiny_bert_dir):
    # the noise is calibrated for 8 clients, 2 a round (z = 1.675 for epsilon 2 in 2 rounds); a
    # deployment admits only 2 nodes, so each is sampled every round and round 1 alone would
    # spend 2.64
    raw = tiny_raw(
        tiny_bert_dir,
        federation={"num_clients": 8, "clients_per_round": 2, "rounds": 2},
        privacy={**PRIVATE, "noise_multiplier": None, "target_epsilon": 2.0},
    )
    cfg = validate(raw)
    algorithm = build_algorithm(cfg)
    strategy = AlgorithmStrategy(algorithm, cfg)
    strategy.set_devices(
        {100 + c: wire.DeviceReport(c, "", 0, 24, 24, 8, 10) for c in range(2)}, None
    )
    with pytest.raises(HFedMoEError, match=r"privacy\.target_epsilon: round 1 would spend"):
        list(strategy.configure_train(1, wire.TensorRecord({}), ConfigRecord(), None))


@pytest.mark.slow  # the calibration itself is tested above, without a run (CI time)
def test_a_target_epsilon_sets_the_noise_for_the_planned_rounds(tiny_bert_dir, tmp_path):
    metrics, _ = _private_run(
        tiny_bert_dir, tmp_path / "run", noise_multiplier=None, target_epsilon=20.0
    )
    z = accounting.noise_for_epsilon(20.0, 2, 3, 2, 1e-5)
    assert metrics[-1]["dp_noise_multiplier"] == z
    assert metrics[-1]["dp_epsilon"] == pytest.approx(20.0, rel=1e-3)


def test_a_private_run_killed_mid_run_resumes_to_the_same_end(tiny_bert_dir, tmp_path):
    # reproducible noise, so that a whole run can be compared; the secret's own survival of a
    # checkpoint is tested above
    raw = tiny_raw(
        tiny_bert_dir,
        federation={"num_clients": 3, "clients_per_round": 2, "rounds": 3},
        privacy={**PRIVATE, "reproducible_noise": True},
    )
    config = tmp_path / "private.toml"
    config.write_text(tomli_w.dumps(raw))
    whole = run_to_the_end(tmp_path / "whole", str(config))
    run_dir = tmp_path / "killed"
    kill_when(["run", str(config), "-o", str(run_dir)], lambda: checkpoint_round(run_dir) >= 1)
    assert 1 <= checkpoint_round(run_dir) < 3
    resumed = run_to_the_end(run_dir)
    assert without(read_metrics(resumed)) == without(read_metrics(whole))
    ours = load_file(resumed / "model" / "model.safetensors")
    theirs = load_file(whole / "model" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the same noise, bit for bit
