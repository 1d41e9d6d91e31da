"""The same ServerApp and ClientApp on Flower's own engines (docs/DEPLOYMENT.md):

* the Ray simulation (`hfedmoe flower`, i.e. `flwr run` on a managed local SuperLink) gives
  exactly the per-round metrics of the embedded engine for the same seed;
* a real deployment, a SuperLink and three SuperNodes as separate processes on 127.0.0.1 with
  TLS and SuperNode authentication, each SuperNode with its own device tier and partition
  (``--node-config``), runs HFedMoE; the server learns every node's budget by a query first.

Every process is started in its own process group and stopped at the end, pass or fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from hfedmoe.data.partition import held_out_count
from hfedmoe.results import engine_independent, read_metrics

from .support.cli import run_cli
from .support.localnet import (
    CONNECTION,
    LocalDeployment,
    flwr_env,
    free_port,
    make_node_key,
    stop_matching,
)
from .support.tiers import three_tiers

REPO = Path(__file__).resolve().parents[1]
TIERS = ["small", "medium", "large"]  # _three_tiers' tier names, one per partition


def flower(config: Path, run_dir: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hfedmoe", "flower", str(config), "-o", str(run_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def config_file(tiny_bert_dir, tmp_path_factory) -> Path:
    """HFedMoE, 2 rounds, three clients on three device tiers (budgets 2, 5 and all 8)."""
    raw = three_tiers(tiny_bert_dir, "hfedmoe")
    path = tmp_path_factory.mktemp("flower") / "tiers.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def test_the_ray_simulation_gives_the_embedded_engines_metrics(config_file, tmp_path):
    embedded = tmp_path / "embedded"
    proc = run_cli("run", str(config_file), "-o", str(embedded), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    env = {
        **flwr_env(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    try:
        proc = flower(config_file, tmp_path / "ray", env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:  # flwr leaves its managed SuperLink running: stop it
        stop_matching(f"--port {port}")
    assert engine_independent(tmp_path / "ray") == engine_independent(embedded)


#: three sites, each with its own CSV (the chat desk has no billing), and the server's test file
SITES = [str(REPO / "examples" / "data" / "sites" / f"{s}.csv") for s in ("phone", "email", "chat")]
OWN_DATA = {
    "dataset": "local",
    "clients": "own",
    "test_path": str(REPO / "examples" / "data" / "support_tickets_test.csv"),
    "label_names": ["billing", "shipping", "technical"],
    "columns": {"text": "subject", "text_pair": "body", "label": "team"},
    "client_test_fraction": 0.2,  # each site evaluates on a fifth of its own rows
}


def test_a_deployment_with_tls_and_node_authentication(tiny_bert_dir, tmp_path):
    """SuperLink + 3 SuperNodes on 127.0.0.1, 2 rounds of HFedMoE, then everything stops.
    Each site reads its own CSV, named by its SuperNode (--node-config data-path); the config
    names no training data at all, so the server cannot read any."""
    raw = three_tiers(tiny_bert_dir, "hfedmoe", data=OWN_DATA)
    raw["eval"]["mode"] = "both"  # the server's test file, and each site on its own rows
    config_file = tmp_path / "sites.toml"
    config_file.write_text(tomli_w.dumps(raw))
    run_dir = tmp_path / "run"
    with LocalDeployment(tmp_path / "net", TIERS, data_paths=SITES) as net:
        # a SuperNode whose key was never registered is refused
        rogue, _ = make_node_key(net.workdir, "rogue")
        refused = net.start_supernode("rogue", rogue, 0, None)
        assert refused.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in (net.workdir / "rogue.log").read_text()
        proc = flower(config_file, run_dir, net.env, "--connection", CONNECTION)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not net.leftovers(), "processes left behind"

    metrics = read_metrics(run_dir)
    assert [r["round"] for r in metrics] == [0, 1, 2]
    devices = metrics[0]["devices"]  # each node's own tier, learnt by the budget query
    assert [(d["partition_id"], d["tier"]) for d in devices] == list(enumerate(TIERS))
    assert [d["expert_budget"] for d in devices] == [2, 5, 8]
    rows = [len(Path(p).read_text().splitlines()) - 1 for p in SITES]  # below the header
    sizes = [n - held_out_count(n, 0.2) for n in rows]  # what each site trains on
    assert [d["num_examples"] for d in devices] == sizes  # each site declared its own file
    for record in metrics:  # every site evaluated in rounds 0 and 2, the sampled ones between
        said = {c["partition_id"]: c["examples"] for c in record["federated_clients"]}
        assert said == {i: held_out_count(rows[i], 0.2) for i in range(3)}
        assert record["federated_failures"] == {}
    for record in metrics[1:]:
        assert record["clients_ok"] == 3 and record["failures"] == {}
        for client in record["clients"]:
            assert client["max_active_per_step"] <= client["expert_budget"]
            assert client["num_examples"] == sizes[client["partition_id"]]
    # the deployment trains what the embedded engine trains with each client's file listed
    simulated = tmp_path / "simulated.toml"
    simulated.write_text(tomli_w.dumps({**raw, "data": {**raw["data"], "client_paths": SITES}}))
    embedded = tmp_path / "embedded"
    proc = run_cli("run", str(simulated), "-o", str(embedded), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert engine_independent(run_dir) == engine_independent(embedded)
