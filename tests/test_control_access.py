"""Who may control the hub and read its request log: the CLI with keys, only this machine without."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlx_hub.core.hub import Hub
from mlx_hub.testing.fake_engine import fake
from mlx_hub.web.controller import build_controller_app
from mlx_hub.web.local_control import is_local_client

from .helpers import free_port, free_range, hello, meta, own_address
from .test_cli import ENV, kill_leftover_daemon, rows

Make = Callable[..., Any]


def remote(hub: Hub, address: str = "192.0.2.77") -> httpx.AsyncClient:
    """The controller as a client at ``address`` reaches it (another machine, as the ASGI scope says)."""
    app = build_controller_app(hub, request_shutdown=lambda: None)
    transport = httpx.ASGITransport(app=app, client=(address, 40123))
    return httpx.AsyncClient(transport=transport, base_url="http://192.0.2.2:8000")


async def test_without_keys_only_this_machine_may_change_state(fast: Make) -> None:
    hub = await fast([fake("m")])
    async with remote(hub) as http:
        stop = await http.post("/hub/models/m/stop")
        for path in ("/hub/shutdown", "/hub/reload", "/hub/service/stop", "/hub/models/m/unload"):
            assert (await http.post(path)).status_code == 403, path
        assert (await http.get("/hub/status")).status_code == 200  # reads stay open
        assert (await http.get("/metrics")).status_code == 200
        answer = await http.post("/v1/chat/completions", json=hello("m", 4))  # inference unchanged
    assert stop.status_code == 403
    error = stop.json()["error"]
    assert error["code"] == "api_keys_required" and "api_keys" in error["message"]
    assert "192.0.2.77" in error["message"]
    assert answer.status_code == 200
    assert meta(hub, "m")["process_state"] == "running" and meta(hub, "m")["memory_state"] == "loaded"
    async with remote(hub, "127.0.0.1") as http:
        assert (await http.post("/hub/models/m/unload")).json()["status"] == "unloaded"
    async with remote(hub, "::1") as http:
        assert (await http.post("/hub/models/m/load")).json()["status"] == "loaded"


async def test_without_keys_only_this_machine_may_read_prompts(fast: Make) -> None:
    """The request log, the logs and the event stream can hold what was asked and answered."""
    hub = await fast([fake("m")], request_log_bodies=True)
    async with remote(hub) as http:
        assert (await http.post("/v1/chat/completions", json=hello("m", 4))).status_code == 200
        assert (await http.get("/hub/history")).status_code == 200  # other reads stay open
        assert (await http.get("/hub/status")).status_code == 200
        private = (
            "/hub/requests",
            "/hub/requests/",
            "/hub/logs",
            "/hub/logs?model=m&follow=1",
            "/hub/events",
        )
        for path in private:  # the streams last: refused, they end; served, they would not
            answer = await http.get(path)
            assert answer.status_code == 403, path
            error = answer.json()["error"]
            assert error["code"] == "api_keys_required" and "192.0.2.77" in error["message"], path
            assert "api_keys" in error["message"] and "prompts" in error["message"], path
    async with remote(hub, "127.0.0.1") as http:  # this machine reads them, prompts and all
        (row,) = (await http.get("/hub/requests")).json()["data"]
        assert (await http.get("/hub/logs")).status_code == 200
    assert '"Hello"' in row["request_body"]


async def test_with_keys_the_key_decides_wherever_the_client_is(fast: Make) -> None:
    hub = await fast([fake("m")], api_keys=["sekret"])
    key = {"Authorization": "Bearer sekret"}
    async with remote(hub) as http:
        assert (await http.post("/hub/models/m/unload")).status_code == 401
        keyed = await http.post("/hub/models/m/unload", headers=key)
        assert (await http.get("/hub/requests")).status_code == 401
        assert (await http.get("/hub/requests", headers=key)).status_code == 200
        assert (await http.get("/hub/logs", headers=key)).status_code == 200
    assert keyed.status_code == 200 and keyed.json()["status"] == "unloaded"


@pytest.mark.parametrize(
    ("client", "server", "local"),
    [
        (("127.0.0.1", 1), ("127.0.0.1", 8000), True),
        (("127.8.9.10", 1), ("0.0.0.0", 8000), True),
        (("::1", 1), ("::1", 8000), True),
        (("::ffff:127.0.0.1", 1), ("::", 8000), True),
        (("192.0.2.2", 1), ("192.0.2.2", 8000), True),  # this machine, through its own LAN address
        (("192.0.2.77", 1), ("192.0.2.2", 8000), False),
        (("fe80::1%eth0", 1), ("::", 8000), False),
        (("not-an-address", 1), ("192.0.2.2", 8000), False),
        (None, None, True),  # no address: a Unix socket or an in-process call
    ],
)
def test_what_counts_as_this_machine(client: Any, server: Any, local: bool) -> None:
    assert is_local_client({"type": "http", "client": client, "server": server}) is local


async def test_a_real_connection_from_this_machines_lan_address_may_control(fast: Make) -> None:
    """A real socket: the controller on every address, reached through the LAN address, counts as local."""
    address = own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    from mlx_hub.web.server import AppServer

    hub = await fast([fake("m")])
    port = free_port()
    server = AppServer(build_controller_app(hub, request_shutdown=lambda: None), "0.0.0.0", port, name="c")
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://{address}:{port}") as http:
            answer = await http.post("/hub/models/m/unload")
    finally:
        await server.stop()
    assert answer.status_code == 200 and answer.json()["status"] == "unloaded"


# ----------------------------------------------------------------------------- the CLI and keys


def keyed_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "mlx_hub.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        env={k: v for k, v in {**ENV, **(env or {})}.items() if v is not None},
    )


@pytest.fixture
def keyed_hub(tmp_path: Path, tiny_llama: Path) -> Iterator[dict[str, Any]]:
    doc = {
        "host": "127.0.0.1",
        "port": free_port(),
        "model_starting_port": free_range(),
        "log_path": str(tmp_path / "logs"),
        "api_keys": ["sekret"],
        "models": [{"name": "alpha", "model_path": str(tiny_llama), "jit_enabled": True, "default": True}],
    }
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    files = {"path": path, "doc": doc, "logs": tmp_path / "logs"}
    yield files
    kill_leftover_daemon(files)


def test_every_command_reaches_a_keyed_hub(keyed_hub: dict[str, Any]) -> None:
    path, doc = keyed_hub["path"], keyed_hub["doc"]
    no_env = {"MLX_HUB_API_KEY": None}
    os.environ.pop("MLX_HUB_API_KEY", None)
    # The hub accepts hub.yaml's key and the one in its environment; start returns once it is ready.
    started = keyed_cli(path, "start", env={"MLX_HUB_API_KEY": "from-env"})
    assert started.returncode == 0, started.stderr
    assert rows(started.stdout)["alpha"][1:3] == ["running", "unloaded"]
    status = keyed_cli(path, "status", env=no_env)  # hub.yaml's first key
    assert status.returncode == 0 and "alpha" in status.stdout, status.stderr
    assert keyed_cli(path, "status", env={"MLX_HUB_API_KEY": "from-env"}).returncode == 0
    loaded = keyed_cli(path, "load-model", "alpha", env=no_env)
    assert loaded.returncode == 0 and "alpha: loaded" in loaded.stdout
    listed = keyed_cli(path, "list", env=no_env)
    assert "running hub" in listed.stdout

    wrong = keyed_cli(path, "status", env={"MLX_HUB_API_KEY": "nope"})
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert "refused the API key from $MLX_HUB_API_KEY" in wrong.stderr and "MLX_HUB_API_KEY" in wrong.stderr
    flag = keyed_cli(path, "status", "--api-key", "nope", env=no_env)
    assert flag.returncode == 1 and "refused the API key from --api-key" in flag.stderr
    override = keyed_cli(path, "--api-key", "sekret", "status", env={"MLX_HUB_API_KEY": "nope"})
    assert override.returncode == 0, override.stderr  # the flag wins over the variable

    # Without hub.yaml's key (the hub still has it), the CLI sends none and says which key to set.
    bare = dict(doc)
    bare.pop("api_keys")
    path.write_text(yaml.safe_dump(bare, sort_keys=False))
    keyless = keyed_cli(path, "stop", env=no_env)
    assert keyless.returncode == 1 and "Traceback" not in keyless.stderr
    assert "needs an API key: set MLX_HUB_API_KEY" in keyless.stderr
    assert keyed_cli(path, "shutdown", env={"MLX_HUB_API_KEY": "from-env"}).returncode == 0
    with pytest.raises(httpx.TransportError):  # the controller is gone once shutdown returns
        httpx.get(f"http://127.0.0.1:{doc['port']}/health", timeout=2)
