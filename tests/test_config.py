"""Config: defaults, TOML files, --set overrides, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfedmoe.foundation.config import ExperimentConfig, apply_override, load, validate
from hfedmoe.foundation.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    cfg = validate({})
    assert cfg.algorithm == "fedavg"
    assert cfg.model.name_or_path == "all-MiniLM-L6-v2"


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.toml")):
        load(path)


def test_default_toml_is_the_documented_job():
    cfg = load(REPO / "configs" / "default.toml")
    assert (cfg.federation.num_clients, cfg.federation.rounds) == (8, 10)
    assert cfg.data.partitioner == "dirichlet"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"federation": {"rounds": 0}}, "federation.rounds: Input should be greater than 0"),
        ({"federation": {"num_clients": -1}}, "federation.num_clients"),
        ({"federation": {"num_clients": 2, "clients_per_round": 3}}, "clients_per_round (3)"),
        ({"federation": {"roundz": 3}}, "federation.roundz: unknown key"),
        ({"modell": {}}, "modell: unknown key"),
        ({"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
        ({"model": {"top_k": 3, "num_experts": 2}}, "model.top_k (3) must be <="),
        ({"model": {"moe_layers": [1, 1]}}, "must not repeat"),
        ({"model": {"moe_layers": "some"}}, "model.moe_layers"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
        ({"report": {"primary": "best"}}, "report.primary: Input should be 'final', "),
        ({"report": {"target": 1.5}}, "report.target: Input should be less than or equal to 1"),
        ({"report": {"targets": 0.9}}, "report.targets: unknown key"),
    ],
)
def test_bad_values_name_the_key(raw, fragment):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_a_name_is_a_folder_name_that_stays_where_it_is_put():
    assert validate({"name": "bbc-topics_v2.1"}).name == "bbc-topics_v2.1"
    with pytest.raises(ConfigError, match=r"^name: expected 1-100 letters.*\(got 'a/b'\)$"):
        validate({"name": "a/b"})


def test_overrides_parse_toml_literals():
    raw: dict = {}
    apply_override(raw, "federation.rounds=3")
    apply_override(raw, "model.moe_layers=[4, 5]")
    apply_override(raw, "name=quick")  # a bare word is a string
    apply_override(raw, "data.path='/tmp/x'")
    assert raw == {
        "federation": {"rounds": 3},
        "model": {"moe_layers": [4, 5]},
        "name": "quick",
        "data": {"path": "/tmp/x"},
    }


def test_override_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "rounds")
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_override({"name": "x"}, "name.sub=1")


def test_load_applies_overrides_then_validates(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('name = "e"\n[federation]\nrounds = 4\n')
    assert load(path, ["federation.rounds=7"]).federation.rounds == 7
    with pytest.raises(ConfigError, match=r"federation\.rounds"):
        load(path, ["federation.rounds=0"])
    with pytest.raises(ConfigError, match=r"train\.nope: unknown key"):
        load(path, ["train.nope=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_json_round_trip_is_lossless():
    cfg = validate({"seed": 3, "model": {"moe_layers": [1, 2]}, "data": {"max_train_examples": 9}})
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg
