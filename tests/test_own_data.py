"""Data that stays with its owner (``data.clients = "own"``): every client reads its own file
and only it, the server reads only its test file, and a config that cannot work that way is
one clear line.
"""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import pytest

from hfedmoe.data import tables
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import client_source, server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.results import read_metrics

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "examples" / "data" / "sites"
PATHS = [SITES / f"{name}.csv" for name in ("phone", "email", "chat")]
TEST = REPO / "examples" / "data" / "support_tickets_test.csv"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _raw(model_dir: Path, **data) -> dict:
    raw = tomllib.loads((REPO / "examples" / "configs" / "own_data.toml").read_text())
    raw["data"].update({"client_paths": [str(p) for p in PATHS], "test_path": str(TEST), **data})
    raw["data"] = {k: v for k, v in raw["data"].items() if v is not None}  # None: left out
    raw["model"].update(name_or_path=str(model_dir), moe_layers=[1])
    raw["federation"].update(rounds=2, check_wire=True)
    raw["train"].update(local_steps=2, device="cpu")
    raw["threads"] = 1
    return raw


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every data file read from now on, in order."""
    seen: list[Path] = []
    real = tables.read_table

    def spy(path, *args, **kwargs):
        seen.append(Path(path).resolve())
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tables, "read_table", spy)
    monkeypatch.setattr("hfedmoe.data.datasets.read_table", spy)
    return seen


def test_the_server_reads_only_its_test_file(tiny_bert_dir, reads):
    cfg = validate(_raw(tiny_bert_dir))
    workload = server_workload(cfg)
    assert reads == [TEST.resolve()]
    assert workload.label_names == ("billing", "shipping", "technical")
    assert workload.partition_sizes is None  # each node declares its own
    assert len(workload.test) == len(_rows(TEST))


def test_each_client_trains_on_exactly_its_own_file(tiny_bert_dir, tmp_path, reads):
    cfg = validate(_raw(tiny_bert_dir))
    for client, path in enumerate(PATHS):
        data = client_source(cfg, 3).partition(cfg, client)
        assert len(data) == len(_rows(path))  # every row of its file, nothing else
        assert reads[-1] == path.resolve()
    # a node's own data-path wins over the config's list
    data = client_source(cfg, 3).partition(cfg, 0, str(PATHS[2]))
    assert len(data) == len(_rows(PATHS[2])) and reads[-1] == PATHS[2].resolve()

    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    metrics = read_metrics(tmp_path / "run")
    sizes = {d["partition_id"]: d["num_examples"] for d in metrics[0]["devices"]}
    assert sizes == {i: len(_rows(p)) for i, p in enumerate(PATHS)}  # as each node declared
    for record in metrics[1:]:
        assert record["clients_ok"] == 3
        for row in record["clients"]:
            assert row["num_examples"] == sizes[row["partition_id"]]
    assert set(reads) == {TEST.resolve(), *(p.resolve() for p in PATHS)}


def test_a_node_without_data_of_its_own_is_one_clear_error(tiny_bert_dir):
    cfg = validate(_raw(tiny_bert_dir, client_paths=None))
    with pytest.raises(ConfigError, match=r"data-path: client 1 has no data of its own"):
        client_source(cfg, 3).partition(cfg, 1)


def test_a_data_path_on_a_partitioned_federation_is_one_clear_error(tiny_bert_dir):
    raw = _raw(
        tiny_bert_dir, clients="partition", client_paths=None, path=str(PATHS[1]), partitioner="iid"
    )
    cfg = validate(raw)
    with pytest.raises(ConfigError, match=r"data-path: this node names its own data"):
        client_source(cfg, 3).partition(cfg, 0, str(PATHS[1]))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"dataset": "bbc_news", "test_path": None}, r"data\.dataset: expected 'local'"),
        ({"test_path": None}, r"data\.test_path: expected the server's test file"),
        ({"label_names": None}, r"data\.label_names: expected the class names"),
        ({"validation_fraction": 0.1}, r"data\.validation_fraction: expected 0"),
        ({"client_paths": ["a.csv"]}, r"data\.client_paths: 1 paths for .*num_clients = 3"),
        ({"clients": "partition"}, r"data\.client_paths: only with data\.clients = 'own'"),
    ],
)
def test_a_config_that_cannot_keep_data_on_its_site_is_one_clear_error(
    tiny_bert_dir, data, fragment
):
    with pytest.raises(ConfigError, match=fragment):
        validate(_raw(tiny_bert_dir, **data))


def test_a_specialised_construction_needs_one_data_set(tiny_bert_dir):
    raw = _raw(tiny_bert_dir)
    raw["model"]["construction"] = "cluster"
    with pytest.raises(ConfigError, match=r"model\.construction: expected 'upcycle'"):
        validate(raw)
