"""A Flower deployment on this machine: a SuperLink and N SuperNodes as separate processes on
127.0.0.1, with TLS (a CA and a server certificate made here) and SuperNode authentication
(an ECDSA key pair per SuperNode, registered before it starts). Each SuperNode gets its own
``--node-config``: partition id, number of partitions and device tier. Optionally a reverse
proxy sits between the SuperNodes and the SuperLink, as in docs/DEPLOYMENT.md.

Used by the integration tests and the engine benchmark, and a quick way to try a deployment;
docs/DEPLOYMENT.md gives the same steps as shell commands for real machines. Every process
runs in its own process group and :meth:`LocalDeployment.stop` ends them all.
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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import tomli_w

BIN = Path(sys.executable).parent
CONNECTION = "deploy"  # the connection's name in $FLWR_HOME/config.toml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path) -> dict[str, str]:
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


TAG = "HFEDMOE_LOCALNET"  # environment variable marking every process a deployment starts


class Processes:
    """Processes started in their own process groups, each with ``TAG=tag`` in its
    environment (inherited by whatever it starts); :meth:`stop` ends them all."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.tag = uuid.uuid4().hex
        self.env, self.logs = {**env, TAG: self.tag}, logs
        self.procs: list[subprocess.Popen] = []
        self.files: list[IO] = []

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        """Start ``args`` (a program of this Python's bin directory, or an absolute path)."""
        log = (self.logs / f"{name}.log").open("w")
        self.files.append(log)
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
        """SIGTERM every group, wait up to 20 s, SIGKILL what is left, anywhere it went."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        stop_pids(lambda: tagged(self.tag))  # groups and whatever left them
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for f in self.files:
            f.close()


def _live(pid_dir: Path) -> bool:
    try:
        return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_dirs() -> list[Path]:
    return [d for d in Path("/proc").iterdir() if d.name.isdigit()]


def matching(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker`` (Linux /proc)."""
    pids = []
    for d in _proc_dirs():
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and _live(d):
            pids.append(int(d.name))
    return pids


def tagged(tag: str) -> list[int]:
    """Pids of live processes with ``TAG=tag`` in their environment."""
    needle = f"{TAG}={tag}".encode()
    pids = []
    for d in _proc_dirs():
        try:
            environ = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and _live(d):
            pids.append(int(d.name))
    return pids


def stop_pids(find: Callable[[], list[int]]) -> None:
    """SIGTERM, then SIGKILL, every process ``find()`` returns, until it returns none."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in find():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while find() and time.monotonic() < deadline:
            time.sleep(0.2)


def stop_matching(marker: str) -> None:
    """Stop every process whose command line contains ``marker``."""
    stop_pids(lambda: matching(marker))


def private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (what `openssl req`
    would make; docs/DEPLOYMENT.md shows the openssl commands). The CA's key is never written:
    as in the guide, it stays off the server."""
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
    private(
        paths[2],
        key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
    )
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair: ECDSA P-384 in OpenSSH format (`ssh-keygen -t ecdsa -b 384`)."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    secret, public = directory / name, directory / f"{name}.pub"
    private(secret, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH))
    return secret, public


def wait_until(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def flwr_json(env: dict[str, str], *args: str) -> dict:
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


def healthy(ca: Path, port: int, host: str = "127.0.0.1") -> bool:
    import ssl
    import urllib.request

    try:
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(f"https://{host}:{port}/health", context=context) as r:
            return r.status == 200
    except OSError:
        return False


class LocalDeployment:
    """``with LocalDeployment(workdir, ["phone", "laptop"]) as d:`` a SuperLink and one
    SuperNode per tier (partition i gets tier i; None = no tier), online; ``d.env`` runs the
    ``flwr`` CLI against it (connection :data:`CONNECTION`, the SuperLink's loopback address).

    ``proxy(d)``, if given, runs once the SuperLink is up: it starts a reverse proxy (with
    ``d.processes``, so that it stops with the rest) and returns the address the SuperNodes
    then dial instead of the SuperLink's."""

    def __init__(
        self,
        workdir: Path,
        tiers: list[str | None],
        proxy: Callable[[LocalDeployment], str] | None = None,
        data_paths: list[str] | None = None,
    ):
        """``data_paths``: each SuperNode's own data (its node config's data-path)."""
        self.workdir = Path(workdir)
        self.tiers = tiers
        self.proxy = proxy
        self.data_paths = data_paths
        self.home = self.workdir / "flwr-home"
        self.env = flwr_env(self.home)
        self.processes = Processes(self.env, self.workdir)
        self.port = free_port()

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        (certs := self.workdir / "certs").mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.ca, self.server_cert, self.server_key = make_certificates(certs)
        address = f"127.0.0.1:{self.port}"
        connection = {"address": address, "root-certificates": str(self.ca)}
        (self.home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
        )
        self.processes.start(
            "superlink",
            "flower-superlink",
            "--ssl-ca-certfile", str(self.ca),
            "--ssl-certfile", str(self.server_cert),
            "--ssl-keyfile", str(self.server_key),
            "--enable-supernode-auth",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--database", str(self.workdir / "superlink.db"),
            "--disable-runtime-dependency-installation",
        )  # fmt: skip
        wait_until("the SuperLink", lambda: healthy(self.ca, self.port))
        self.fleet_address = self.proxy(self) if self.proxy else address
        for pid, tier in enumerate(self.tiers):
            private, public = make_node_key(self.workdir, f"node{pid}")
            registered = flwr_json(self.env, "supernode", "register", str(public), CONNECTION)
            if not registered.get("success"):
                raise RuntimeError(f"registering SuperNode {pid} failed: {registered}")
            self.start_supernode(f"supernode{pid}", private, pid, tier)
        wait_until(f"{len(self.tiers)} SuperNodes online", lambda: self.online() == len(self.tiers))

    def start_supernode(
        self, name: str, private_key: Path, partition: int, tier: str | None
    ) -> subprocess.Popen:
        node_config = f"partition-id={partition} num-partitions={len(self.tiers)}"
        if tier is not None:
            node_config += f" device-tier='{tier}'"
        if self.data_paths is not None and 0 <= partition < len(self.data_paths):
            node_config += f" data-path='{self.data_paths[partition]}'"
        return self.processes.start(
            name,
            "flower-supernode",
            "--superlink", self.fleet_address,
            "--root-certificates", str(self.ca),
            "--auth-supernode-private-key", str(private_key),
            "--node-config", node_config,
            "--host", "127.0.0.1",
            "--port", str(free_port()),
            FLWR_HOME=str(self.workdir / f"home-{name}"),
        )  # fmt: skip

    def online(self) -> int:
        nodes = flwr_json(self.env, "supernode", "ls", CONNECTION).get("nodes", [])
        return sum(n.get("status") == "online" for n in nodes)

    def stop(self) -> None:
        self.processes.stop()

    def leftovers(self) -> list[int]:
        """Live processes this deployment started (none after :meth:`stop`)."""
        return tagged(self.processes.tag)
