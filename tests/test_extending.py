"""docs/EXTENDING.md's worked examples: each runs, and the code on the page is the code in
examples/extending/ (so the guide cannot go stale)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hfedmoe.algorithms import ClientUpdate, build_algorithm
from hfedmoe.data import load_dataset
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.foundation.config import DataConfig, ExperimentConfig, validate
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.factory import build_model
from hfedmoe.results import read_metrics

from .support.configs import save_tiny_model, tiny_raw

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "EXTENDING.md"
FEDAVGM = "examples.extending.fedavgm"
FLEX_OLMO = "examples.extending.flex_olmo"


def test_the_guide_shows_the_examples_as_they_are():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    files = ["fedavgm.py", "flex_olmo.py", "folder_of_texts.py"]
    assert len(blocks) == len(files)
    for block, name in zip(blocks, files, strict=True):
        assert block == (REPO / "examples" / "extending" / name).read_text(), name


# --- a federated algorithm ------------------------------------------------------------------


def test_fedavgm_moves_along_its_momentum_by_hand(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, plugins=[FEDAVGM], algorithm="fedavgm"))
    algorithm = build_algorithm(cfg)

    def update(value: float, n: int) -> ClientUpdate:
        return ClientUpdate({"w": torch.tensor([value])}, n)

    # round 1: the clients' mean (weights 1 and 3) is 0.6 -> a step of 0.4, v = 0.4, w = 0.6
    w = algorithm.aggregate(1, {"w": torch.tensor([1.0])}, {0: update(0.0, 1), 1: update(0.8, 3)})
    assert w["w"].item() == pytest.approx(0.6)
    # round 2: mean 0.5 -> step 0.1, v = 0.9 * 0.4 + 0.1 = 0.46, w = 0.6 - 0.46 = 0.14
    w = algorithm.aggregate(2, w, {0: update(0.5, 2)})
    assert w["w"].item() == pytest.approx(0.14)
    assert algorithm.state_dict()["velocity"]["w"].item() == pytest.approx(0.46)


def test_a_plugin_reads_its_own_config_section(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir, plugins=[FEDAVGM], algorithm="fedavgm", fedavgm={"beta": 0.5})
    cfg = validate(raw)
    assert cfg.section("fedavgm").beta == 0.5
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg  # it reaches every process alike
    algorithm = build_algorithm(cfg)

    def update(value: float, n: int) -> ClientUpdate:
        return ClientUpdate({"w": torch.tensor([value])}, n)

    # round 1 as above: v = 0.4, w = 0.6
    w = algorithm.aggregate(1, {"w": torch.tensor([1.0])}, {0: update(0.0, 1), 1: update(0.8, 3)})
    # round 2 with beta 0.5: v = 0.5 x 0.4 + 0.1 = 0.3, w = 0.6 - 0.3 = 0.3
    w = algorithm.aggregate(2, w, {0: update(0.5, 2)})
    assert w["w"].item() == pytest.approx(0.3)
    # without the section, its defaults
    default = validate(tiny_raw(tiny_bert_dir, plugins=[FEDAVGM], algorithm="fedavgm"))
    assert default.section("fedavgm").beta == 0.9


def test_a_plugin_section_is_validated_like_a_built_in_one(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir, plugins=[FEDAVGM], algorithm="fedavgm", fedavgm={"beta": 1.5})
    with pytest.raises(ConfigError, match=r"fedavgm\.beta: Input should be less than 1"):
        validate(raw)
    raw = tiny_raw(tiny_bert_dir, plugins=[FEDAVGM], fedavgm={"gamma": 1.0})
    with pytest.raises(ConfigError, match=r"fedavgm\.gamma: Extra inputs are not permitted"):
        validate(raw)
    with pytest.raises(ConfigError, match=r"nosuch"):  # no plugin registered it: unknown
        validate(tiny_raw(tiny_bert_dir, nosuch={"beta": 0.5}))


def test_a_plugin_algorithm_runs_as_a_built_in_one(tiny_bert_dir, tmp_path):
    cfg = validate(tiny_raw(tiny_bert_dir, plugins=[FEDAVGM], algorithm="fedavgm"))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[-1]["clients_ok"] == 2


def test_a_plugin_that_cannot_be_imported_is_a_config_error():
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_plugin'"):
        validate({"plugins": ["no_such_plugin"]})


# --- a model family --------------------------------------------------------------------------


def test_a_registered_family_loads_and_trains(tmp_path):
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

    directory = save_tiny_model(
        tmp_path / "flex-olmo",
        lambda vocab: FlexOlmoForCausalLM(
            FlexOlmoConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                num_experts=4,
                num_experts_per_tok=2,
                pad_token_id=0,
                eos_token_id=0,
            )
        ),
    )
    raw = tiny_raw(
        directory,
        plugins=[FLEX_OLMO],
        algorithm="hfedmoe",
        data={"task": "language-modeling", "max_train_examples": 40, "max_test_examples": 8},
    )
    raw["federation"]["rounds"] = 1
    cfg = validate(raw)
    model = build_model(cfg.model, "language-modeling", [], seed=0)
    assert ExpertModel(model).shape == (2, 4)
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    assert read_metrics(tmp_path / "run")[-1]["clients_ok"] == 2


# --- a data set ------------------------------------------------------------------------------


def test_a_folder_of_texts_becomes_a_local_data_set(tmp_path):
    from examples.extending.folder_of_texts import folder_table

    for label, texts in {
        "cats": ["purr", "meow", "nap"],
        "dogs": ["bark", "fetch", "walk"],
    }.items():
        (tmp_path / "texts" / label).mkdir(parents=True)
        for n, text in enumerate(texts):
            (tmp_path / "texts" / label / f"{'ab'[n % 2]}-{n}.txt").write_text(text + "\n")
    folder_table(tmp_path / "texts").to_parquet(tmp_path / "texts.parquet")
    cfg = DataConfig(
        dataset="local",
        path=str(tmp_path / "texts.parquet"),
        columns={"group": "source"},
        test_fraction=0.34,
    )
    split = load_dataset(cfg, seed=0)
    rows = {
        text: (int(label), int(group))
        for part in (split.train, split.test)
        for text, label, group in zip(part.texts, part.labels, part.groups, strict=True)
    }
    assert split.train.label_names == ("cats", "dogs") and split.train.group_names == ("a", "b")
    assert rows == {  # files a-0, b-1, a-2 of each class
        "purr": (0, 0),
        "meow": (0, 1),
        "nap": (0, 0),
        "bark": (1, 0),
        "fetch": (1, 1),
        "walk": (1, 0),
    }
