"""Stop means stop: a request that never ends cannot hold stop-model, shutdown or SIGTERM.

"Never ends" is a stream or a plain request with a max_tokens the tiny model
would need minutes for. The bounds below only catch a hang (the stop used to
wait forever); they are not timings.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlx_hub.engine import memory

from .helpers import base_url, free_port, free_range, hello, meta, text_only
from .test_hub import eventually, lm

ENDLESS = 1_000_000  # tokens
HANG = 60.0  # seconds after which a stop counts as hung


async def endless_stream(url: str, model: str, path: Path, seen: asyncio.Event) -> list[str]:
    lines: list[str] = []
    body = hello(model, ENDLESS, stream=True, **text_only(path))
    async with httpx.AsyncClient(timeout=None) as http:
        try:
            async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line.startswith("data: {"):
                        seen.set()
        except httpx.HTTPError as exc:
            lines.append(f"error: {type(exc).__name__}")
    return lines


async def test_stop_model_cancels_a_stream_that_never_ends(make_hub, hub_config, small_llama: Path) -> None:
    memory.free_memory()
    before = memory.active_memory()
    hub = await make_hub(hub_config([lm("m", small_llama, default=True)]))
    held = meta(hub, "m")["memory_bytes"]
    seen = asyncio.Event()
    client = asyncio.create_task(endless_stream(base_url(hub, "m"), "m", small_llama, seen))
    await asyncio.wait_for(seen.wait(), HANG)
    assert meta(hub, "m")["in_flight"] == 1
    assert await asyncio.wait_for(hub.stop_model("m", drain_timeout=1), HANG) == "stopped"
    lines = await asyncio.wait_for(client, HANG)
    # Cut, not completed: upstream's generator ends its stream when cancelled, and
    # the connection then closes mid-body, which the client sees as an error.
    assert lines[-1] == "error: RemoteProtocolError", lines[-4:]
    assert meta(hub, "m")["memory_state"] == "unloaded" and meta(hub, "m")["process_state"] == "inactive"
    memory.free_memory()
    assert abs(memory.active_memory() - before) <= 0.01 * held


async def test_an_unanswered_request_gets_503_model_stopped(make_hub, hub_config, small_llama: Path) -> None:
    hub = await make_hub(hub_config([lm("m", small_llama, default=True)]))

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(timeout=None) as http:
            return await http.post(
                f"{base_url(hub, 'm')}/chat/completions", json=hello("m", ENDLESS, **text_only(small_llama))
            )

    request = asyncio.create_task(ask())
    await eventually(lambda: meta(hub, "m")["in_flight"] == 1)
    await asyncio.sleep(0.5)  # generating, well short of its end
    assert await asyncio.wait_for(hub.stop_model("m", drain_timeout=0.5), HANG) == "stopped"
    response = await asyncio.wait_for(request, HANG)
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_stopped"


async def test_shutdown_uses_the_configured_drain_timeout(make_hub, hub_config, small_llama: Path) -> None:
    hub = await make_hub(hub_config([lm("m", small_llama, default=True)], drain_timeout=1))
    seen = asyncio.Event()
    client = asyncio.create_task(endless_stream(base_url(hub, "m"), "m", small_llama, seen))
    await asyncio.wait_for(seen.wait(), HANG)
    await asyncio.wait_for(hub.shutdown(), HANG)
    assert (await asyncio.wait_for(client, HANG))[-1] == "error: RemoteProtocolError"


def test_sigterm_ends_the_daemon_despite_an_endless_stream(tmp_path: Path, small_llama: Path) -> None:
    port, start = free_port(), free_range()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "model_starting_port": start,
        "log_path": str(tmp_path / "logs"),
        "drain_timeout": 1,
        "models": [lm("m", small_llama, default=True, port=start)],
    }
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(config))
    args = [
        sys.executable,
        "-m",
        "mlx_hub.cli",
        "start",
        "--foreground",
        "--config",
        str(tmp_path / "hub.yaml"),
    ]
    daemon = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy()
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{port}/hub/status", timeout=2).json()["counts"]["loaded"]
                    == 1
                ):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline and daemon.poll() is None, "the hub did not start"
            time.sleep(0.3)
        body: dict[str, Any] = hello("m", ENDLESS, stream=True, **text_only(small_llama))
        with (
            httpx.Client(timeout=None) as http,
            http.stream("POST", f"http://127.0.0.1:{start}/v1/chat/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(HANG) == 0
            with pytest.raises(httpx.HTTPError):
                list(lines)  # the stream was cut when the daemon stopped
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
