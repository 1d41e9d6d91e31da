"""The same ServerApp and ClientApp on Flower's own engines (docs/DEPLOYMENT.md):

* the Ray simulation (`hfedmoe flower`, i.e. `flwr run` on a managed local SuperLink) gives
  exactly the per-round metrics of the embedded engine for the same seed;
* a real deployment, a SuperLink and three SuperNodes as separate processes on 127.0.0.1 with
  TLS and SuperNode authentication, each SuperNode with its own device tier and partition
  (``--node-config``), runs HFedMoE; the server learns every node's budget by a query first.

Every process is started in its own process group and killed at the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from hfedmoe.results import read_metrics

from .test_budget import _three_tiers
from .test_end_to_end import TIMING_KEYS, run_cli

BIN = Path(sys.executable).parent
TIERS = ["small", "medium", "large"]  # _three_tiers' tier names, one per partition


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_independent(run_dir: Path) -> list[dict]:
    """metrics.jsonl without timings and node ids (each engine numbers its nodes its own way)."""
    drop = TIMING_KEYS | {"node_id"}

    def strip(d: dict) -> dict:
        return {
            k: ([strip(x) for x in v] if k in ("clients", "devices") else v)
            for k, v in d.items()
            if k not in drop
        }

    return [strip(r) for r in read_metrics(run_dir)]


class Processes:
    """Processes started in their own process groups; all killed by :meth:`stop`."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.procs = env, logs, []

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(
                ProcessLookupError, PermissionError
            ):  # the group, including children (superexec, clientapps)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _flwr_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }


def _matching(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _stop_matching(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _matching(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while _matching(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def config_file(tiny_bert_dir, tmp_path_factory) -> Path:
    """HFedMoE, 2 rounds, three clients on three device tiers (budgets 2, 5 and all 8)."""
    raw = _three_tiers(tiny_bert_dir, "hfedmoe")
    path = tmp_path_factory.mktemp("flower") / "tiers.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


# --- Ray simulation ----------------------------------------------------------------------------


def test_the_ray_simulation_gives_the_embedded_engines_metrics(config_file, tmp_path):
    embedded = tmp_path / "embedded"
    proc = run_cli("run", str(config_file), "-o", str(embedded), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    port = _free_port()
    env = {**_flwr_env(tmp_path / "flwr-home"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)}
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "hfedmoe",
                "flower",
                str(config_file),
                "-o",
                str(tmp_path / "ray"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:  # flwr leaves its managed SuperLink running: stop it
        _stop_matching(f"--port {port}")
    assert _engine_independent(tmp_path / "ray") == _engine_independent(embedded)


# --- the deployment engine: SuperLink + SuperNodes, TLS, SuperNode authentication ---------------


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (what `openssl req`
    would make; docs/DEPLOYMENT.md shows the openssl commands)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("hfedmoe-test-ca"))
        .issuer_name(name("hfedmoe-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = directory / "ca.crt", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair: ECDSA P-384 in OpenSSH format (`ssh-keygen -t ecdsa -b 384`)."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
    )
    public.write_bytes(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH))
    return private, public


def _wait(what: str, check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _flwr_json(env: dict, *args: str) -> dict:
    out = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"error": out.stdout + out.stderr}


def _healthy(ca: Path, port: int) -> bool:
    import ssl
    import urllib.request

    try:
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context) as r:
            return r.status == 200
    except OSError:
        return False


def test_a_deployment_with_tls_and_node_authentication(config_file, tmp_path):
    """SuperLink + 3 SuperNodes on 127.0.0.1, 2 rounds of HFedMoE, then everything stops."""
    (certs := tmp_path / "certs").mkdir()
    ca, server_cert, server_key = make_certificates(certs)
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = _flwr_env(home)
    link = _free_port()
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "deploy",
                    "deploy": {"address": f"127.0.0.1:{link}", "root-certificates": str(ca)},
                }
            }
        )
    )
    processes = Processes(env, tmp_path)
    marker = str(tmp_path)  # every process's command line names a path under tmp_path
    try:
        processes.start(
            "superlink",
            "flower-superlink",
            "--ssl-ca-certfile", str(ca),
            "--ssl-certfile", str(server_cert),
            "--ssl-keyfile", str(server_key),
            "--enable-supernode-auth",
            "--host", "127.0.0.1",
            "--port", str(link),
            "--database", str(tmp_path / "superlink.db"),
            "--disable-runtime-dependency-installation",
        )  # fmt: skip
        _wait("the SuperLink", lambda: _healthy(ca, link))
        for pid, tier in enumerate(TIERS):
            private, public = make_node_key(tmp_path, f"node{pid}")
            registered = _flwr_json(env, "supernode", "register", str(public), "deploy")
            assert registered.get("success"), registered
            processes.start(
                f"supernode{pid}",
                "flower-supernode",
                "--superlink", f"127.0.0.1:{link}",
                "--root-certificates", str(ca),
                "--auth-supernode-private-key", str(private),
                "--node-config", f"partition-id={pid} num-partitions=3 device-tier='{tier}'",
                "--host", "127.0.0.1",
                "--port", str(_free_port()),
                FLWR_HOME=str(tmp_path / f"home-node{pid}"),
            )  # fmt: skip

        def online() -> int:
            nodes = _flwr_json(env, "supernode", "ls", "deploy").get("nodes", [])
            return sum(n.get("status") == "online" for n in nodes)

        _wait("three SuperNodes online", lambda: online() == 3)
        # a SuperNode whose key was never registered is refused
        rogue, _ = make_node_key(tmp_path, "rogue")
        refused = processes.start(
            "rogue",
            "flower-supernode",
            "--superlink", f"127.0.0.1:{link}",
            "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(rogue),
            "--node-config", "partition-id=0 num-partitions=3",
            "--port", str(_free_port()),
            FLWR_HOME=str(tmp_path / "home-rogue"),
        )  # fmt: skip
        assert refused.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()

        run_dir = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "hfedmoe", "flower", str(config_file), "--connection",
             "deploy", "-o", str(run_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        processes.stop()
        _stop_matching(marker)
    assert not _matching(marker), "processes left behind"

    metrics = read_metrics(run_dir)
    assert [r["round"] for r in metrics] == [0, 1, 2]
    devices = metrics[0]["devices"]  # each node's own tier, learnt by the budget query
    assert [(d["partition_id"], d["tier"]) for d in devices] == list(enumerate(TIERS))
    assert [d["expert_budget"] for d in devices] == [2, 5, 8]
    for record in metrics[1:]:
        assert record["clients_ok"] == 3 and record["failures"] == {}
        for client in record["clients"]:
            assert client["max_active_per_step"] <= client["expert_budget"]
