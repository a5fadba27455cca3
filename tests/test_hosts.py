"""The Host check: the controller and every model port answer only to the names the hub is served under.

A page whose name is rebound to 127.0.0.1 (DNS rebinding) sends its own name
as Host and Origin; it must get 403, on a real port, whatever the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_hub.config import ConfigError, load_config
from mlx_hub.core.hub import Hub
from mlx_hub.testing.fake_engine import fake
from mlx_hub.web import hosts
from mlx_hub.web.controller import build_controller_app
from mlx_hub.web.hosts import host_name
from mlx_hub.web.server import AppServer

from .helpers import free_port, hello, own_address

Make = Callable[..., Any]


@contextlib.asynccontextmanager
async def controller(hub: Hub, shutdowns: list[bool] | None = None) -> AsyncIterator[int]:
    """The hub's controller on a real loopback port; yields the port."""
    port = free_port()
    app = build_controller_app(
        hub, request_shutdown=lambda: (shutdowns if shutdowns is not None else []).append(True)
    )
    server = AppServer(app, "127.0.0.1", port, name="controller")
    await server.start()
    try:
        yield port
    finally:
        hub.activity.close_streams()
        await server.stop()


async def call(port: int, path: str, host: str, method: str = "GET", **kw: Any) -> httpx.Response:
    """A request to 127.0.0.1:``port`` whose Host header says ``host``, as a rebound browser sends it."""
    headers = {"Host": host, **kw.pop("headers", {})}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        return await http.request(method, path, headers=headers, **kw)


def refused(answer: httpx.Response) -> bool:
    if answer.status_code != 403:
        return False
    error = answer.json()["error"]
    assert error["code"] == "host_not_allowed" and error["type"] == "permission_error"
    assert "allowed_hosts in hub.yaml" in error["message"]
    return True


async def test_a_rebound_page_can_neither_control_nor_read_the_hub(fast: Make) -> None:
    """The issue's reproduction: Host and Origin both the page's own name, sent to 127.0.0.1."""
    hub = await fast([fake("m")], request_log_bodies=True)
    model_port = hub.slots["m"].port
    shutdowns: list[bool] = []
    async with controller(hub, shutdowns) as port:
        evil = f"evil.test:{port}"
        shut = await call(port, "/hub/shutdown", evil, "POST", headers={"Origin": f"http://{evil}"})
        unload = await call(port, "/hub/models/m/unload", evil, "POST", headers={"Origin": f"http://{evil}"})
        reads = [await call(port, path, evil) for path in ("/hub/requests", "/hub/logs", "/hub/status")]
        routed = await call(port, "/v1/chat/completions", evil, "POST", json=hello("m", 4))
        own = [
            await call(
                model_port, "/v1/chat/completions", f"evil.test:{model_port}", "POST", json=hello("m", 4)
            ),
            await call(model_port, "/v1/models", "EVIL.test"),
        ]
        still = await call(port, "/hub/status", f"127.0.0.1:{port}")
    assert refused(shut) and shutdowns == []
    assert "evil.test" in shut.json()["error"]["message"]
    assert refused(unload) and all(refused(r) for r in reads) and refused(routed)
    assert all(refused(r) for r in own)
    assert still.status_code == 200 and still.json()["models"][0]["metadata"]["memory_state"] == "loaded"


async def test_the_names_the_hub_is_served_under_are_accepted(fast: Make) -> None:
    """Loopback in every spelling, allowed_hosts, this machine's name; any port, any case."""
    hub = await fast([fake("m")], allowed_hosts=["Mac-Studio.local", "*.proxy.test"])
    model_port = hub.slots["m"].port
    names = [
        "localhost",
        "LOCALHOST:{port}",
        "127.0.0.1:{port}",
        "127.1.2.3",
        "[::1]:{port}",
        "[::1]",
        "localhost.",
        "0.0.0.0:{port}",
        "mac-studio.local:{port}",
        "chat.proxy.test",
        socket.gethostname(),
    ]
    async with controller(hub) as port:
        for name in names:
            status = await call(port, "/hub/status", name.format(port=port))
            assert status.status_code == 200, (name, status.text)
            models = await call(model_port, "/v1/models", name.format(port=model_port))
            assert models.status_code == 200, (name, models.text)
        answer = await call(
            model_port, "/v1/chat/completions", "mac-studio.local", "POST", json=hello("m", 4)
        )
        assert answer.status_code == 200
        for name in ("proxy.test", "mac-studio.local.evil.test", "192.0.2.9", "[::2]"):
            assert refused(await call(port, "/hub/status", name)), name


async def test_the_configured_host_is_accepted(fast: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """hub.yaml's ``host``, on a connection that arrived elsewhere (loopback), with no machine name to help."""
    address = own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    monkeypatch.setattr(hosts, "_machine_names", frozenset())  # only the configured host can let it in
    hub = await fast([fake("m", host="127.0.0.1")], host=address)
    model_port = hub.slots["m"].port
    async with controller(hub) as port:
        assert (await call(port, "/hub/status", f"{address}:{port}")).status_code == 200
        assert (await call(model_port, "/v1/models", address)).status_code == 200
        assert refused(await call(port, "/hub/status", socket.gethostname()))


async def test_with_keys_an_allowed_host_still_needs_the_key_and_a_foreign_one_is_refused(fast: Make) -> None:
    hub = await fast([fake("m")], api_keys=["sekret"], allowed_hosts=["hub.lan"])
    key = {"Authorization": "Bearer sekret"}
    model_port = hub.slots["m"].port
    async with controller(hub) as port:
        assert refused(await call(port, "/hub/status", "evil.test", headers=key))
        assert refused(await call(port, "/hub/shutdown", "evil.test", "POST", headers=key))
        assert refused(await call(model_port, "/v1/models", "evil.test", headers=key))
        for name in ("hub.lan", f"localhost:{port}", "[::1]"):
            assert (await call(port, "/hub/status", name)).status_code == 401, name
            assert (await call(port, "/hub/status", name, headers=key)).status_code == 200, name
            assert (await call(model_port, "/v1/models", name, headers=key)).status_code == 200, name


async def test_a_reload_applies_allowed_hosts_at_once(fast: Make) -> None:
    hub = await fast([fake("m")])
    async with controller(hub) as port:
        assert refused(await call(port, "/hub/status", "later.lan"))
        await hub.reload(hub.config.model_copy(update={"allowed_hosts": ["later.lan"]}))
        assert (await call(port, "/hub/status", "later.lan")).status_code == 200
        assert (await call(hub.slots["m"].port, "/v1/models", "later.lan")).status_code == 200


async def test_a_request_without_host_is_answered(fast: Make) -> None:
    """HTTP/1.0 needs no Host: such a client (an old probe) names nothing that could be rebound."""
    hub = await fast([fake("m")])
    async with controller(hub) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hub/status HTTP/1.0\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
    assert head.split()[1] == b"200", head


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost", "localhost"),
        ("LocalHost:8000", "localhost"),
        ("[::1]:8000", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("Mac-Studio.Local.:47850", "mac-studio.local"),
        ("192.0.2.1:80", "192.0.2.1"),
        ("[::1", None),
        ("[::1]x", None),
        ("host:port", None),
        (":8000", None),
    ],
)
def test_host_header_forms(header: str, name: str | None) -> None:
    assert host_name(header) == name


def test_allowed_hosts_entries_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    good = ["mac-studio.local", "192.168.1.20", "[::1]", "fe80::1", "*.example.com", "*", "LAN_box"]
    path.write_text(f"allowed_hosts: {good}\nmodels:\n  - {{name: a, model_path: x}}\n")
    assert load_config(path).allowed_hosts == good
    for bad in ("http://mac-studio.local", "mac-studio.local:8000", "a/b", "", "bad host", "*x.com"):
        path.write_text(f"allowed_hosts: ['{bad}']\nmodels:\n  - {{name: a, model_path: x}}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        (line,) = info.value.problems
        assert str(path) in line and "allowed_hosts" in line and "without scheme, port or path" in line, line
