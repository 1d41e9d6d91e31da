"""The deployment docs/DEPLOYMENT.md documents, with the guide's own reverse-proxy configs:
nginx's and Caddy's blocks are read from the guide, and only their ports and paths change.

A SuperLink with TLS and SuperNode authentication listens on 127.0.0.1; the proxy listens on
another loopback port, and the SuperNode knows only the proxy's address. Through the proxy the
SuperNode comes online and trains a one-round job, and `/health` answers, while every Control
API call is refused (the `flwr` CLI's and raw requests alike, with paths that try to escape the
Fleet API's prefix); on the loopback address the same calls work. Skipped where the proxy is
not installed (`.ci/run` installs nginx and Caddy).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from hfedmoe.results import read_metrics

from .support.configs import tiny_raw
from .support.localnet import (
    CONNECTION,
    LocalDeployment,
    flwr_json,
    free_port,
    healthy,
    make_node_key,
    wait_until,
)

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "DEPLOYMENT.md"
SUPERLINK = "127.0.0.1:8000"  # the guide's SuperLink address
PROXIED = "proxied"  # a `flwr` connection to the proxy's address


def program(name: str) -> str | None:
    found = shutil.which(name) or f"/usr/sbin/{name}"
    return found if Path(found).is_file() else None


def guide_block(language: str) -> str:
    """The guide's one code block in ``language``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", GUIDE.read_text(), re.S | re.M)
    assert len(blocks) == 1, f"docs/DEPLOYMENT.md should have one {language} block"
    return blocks[0]


def adapt(block: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert old in block, f"the guide's config no longer has {old!r}"
        block = block.replace(old, new)
    return block


def start_nginx(net: LocalDeployment) -> str:
    """nginx with the guide's server block, on a free loopback port."""
    port, work = free_port(), net.workdir / "nginx"
    work.mkdir()
    certs = net.ca.parent
    server = adapt(
        guide_block("nginx"),
        {
            "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
            "/etc/flower/": f"{certs}/",
            f"https://{SUPERLINK}": f"https://127.0.0.1:{net.port}",
        },
    )
    temp = "".join(
        f"    {kind}_temp_path {work}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = work / "nginx.conf"
    config.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")  # workers must read the test's tmp dirs
        + f"pid {work}/nginx.pid;\nerror_log {work}/error.log info;\nevents {{}}\n"
        + f"http {{\n    access_log {work}/access.log;\n{temp}{server}}}\n"
    )
    nginx = program("nginx")
    net.processes.start("nginx", nginx, "-p", str(work), "-c", str(config), "-e", "stderr",
                        "-g", "daemon off;")  # fmt: skip
    wait_until("nginx", lambda: healthy(net.ca, port), timeout=30)
    return f"127.0.0.1:{port}"


def start_caddy(net: LocalDeployment) -> str:
    """Caddy with the guide's site block, on a free loopback port."""
    port, work = free_port(), net.workdir / "caddy"
    work.mkdir()
    certs = net.ca.parent
    site = adapt(
        guide_block("caddyfile"),
        {
            "superlink.example.org:443": f"127.0.0.1:{port}",
            "/etc/caddy/server.pem": str(net.server_cert),
            "/etc/caddy/server.key": str(net.server_key),
            "/etc/flower/": f"{certs}/",
            f"https://{SUPERLINK}": f"https://127.0.0.1:{net.port}",
        },
    )
    # no admin endpoint, no redirect listener on :80, loopback only, no state outside the test's
    # directory;
    # the SuperNode dials an IP address, so its TLS hello names no server
    caddyfile = work / "Caddyfile"
    caddyfile.write_text(
        "{\n\tadmin off\n\tauto_https disable_redirects\n\tdefault_sni localhost\n"
        "\tdefault_bind 127.0.0.1\n"
        f"\tstorage file_system {work}/data\n}}\n\n{site}"
    )
    caddy = program("caddy")
    net.processes.start("caddy", caddy, "run", "--config", str(caddyfile), "--adapter",
                        "caddyfile", HOME=str(work), XDG_DATA_HOME=str(work),
                        XDG_CONFIG_HOME=str(work))  # fmt: skip
    wait_until("Caddy", lambda: healthy(net.ca, port), timeout=30)
    return f"127.0.0.1:{port}"


PROXIES = {"nginx": start_nginx, "caddy": start_caddy}


def post(ca: Path, address: str, path: str) -> int:
    """The status of an empty POST to ``path``, sent as written (no client-side cleaning)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=str(ca)), timeout=30
    )
    try:
        connection.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize(
    "proxy",
    [
        # nginx in the default selection; Caddy's run is the same test (CI time), so it is slow.
        pytest.param(
            name,
            marks=[
                pytest.mark.skipif(not program(name), reason=f"no {name}"),
                *([pytest.mark.slow] if name == "caddy" else []),
            ],
        )
        for name in sorted(PROXIES)
    ],
)
def test_the_proxy_passes_the_fleet_api_and_nothing_else(proxy, tiny_bert_dir, tmp_path):
    raw = tiny_raw(
        tiny_bert_dir,
        algorithm="hfedmoe",
        federation={"num_clients": 1, "clients_per_round": 1, "rounds": 1},
    )
    config = tmp_path / "one.toml"
    config.write_text(tomli_w.dumps(raw))
    run_dir = tmp_path / "run"
    with LocalDeployment(tmp_path / "net", [None], proxy=PROXIES[proxy]) as net:
        # LocalDeployment waited for the SuperNode, which dials the proxy, to come online
        proxied, direct = net.fleet_address, f"127.0.0.1:{net.port}"
        assert proxied != direct
        assert "Failed" not in (net.workdir / "supernode0.log").read_text()
        assert healthy(net.ca, int(proxied.rsplit(":", 1)[1]))

        # the Control API: open on loopback, closed through the proxy
        home = net.home / "config.toml"
        home.write_text(
            home.read_text()
            + tomli_w.dumps(
                {"superlink": {PROXIED: {"address": proxied, "root-certificates": str(net.ca)}}}
            )
        )
        assert "runs" in flwr_json(net.env, "ls", CONNECTION)
        assert "runs" not in flwr_json(net.env, "ls", PROXIED)
        assert not flwr_json(net.env, "supernode", "ls", PROXIED).get("nodes")
        _, public = make_node_key(net.workdir, "intruder")
        assert not flwr_json(net.env, "supernode", "register", str(public), PROXIED).get("success")
        nodes = flwr_json(net.env, "supernode", "ls", CONNECTION)["nodes"]
        assert [n["status"] for n in nodes] == ["online"]  # the intruder's key is not there
        assert post(net.ca, direct, "/v1/control/list-runs") == 200
        for path in (
            "/v1/control/list-runs",
            "/v1/control/register-node",
            "/v1/runtime/get-nodes",
            "/docs",
            "/openapi.json",
            "/v1/fleet/../control/list-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
            "/v1/fleet/..%2fcontrol/list-runs",
            "//v1/control/list-runs",
        ):
            assert post(net.ca, proxied, path) in (400, 404), path

        # the SuperNode receives work and returns its reply through the proxy
        proc = subprocess.run(
            [sys.executable, "-m", "hfedmoe", "flower", str(config), "-o", str(run_dir),
             "--connection", CONNECTION],
            env=net.env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not net.leftovers(), "processes left behind"
    metrics = read_metrics(run_dir)
    assert [r["round"] for r in metrics] == [0, 1]
    assert metrics[1]["clients_ok"] == 1 and metrics[1]["failures"] == {}
