"""Faults: broken models, a disconnecting client, unload and shutdown at awkward moments, a full disk.

Each must leave the other models serving and every state file valid. (A taken
port, a missing path, corrupt weights and SIGKILL of the daemon are covered in
test_hub.py and test_cli.py.)
"""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import threading
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest

from mlx_hub import Hub, fsutil
from mlx_hub.core.errors import HubError
from mlx_hub.engine import memory

from ..helpers import base_url, hello, meta, text_only
from ..test_hub import chat, eventually, lm

pytestmark = pytest.mark.reliability  # `make soak` runs these at full length


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


async def test_config_the_handler_rejects(make_hub, hub_config, tiny_llama: Path, tmp_path: Path) -> None:
    odd = copy_model(tiny_llama, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (odd / "config.json").write_text(json.dumps(config))
    hub = await make_hub(hub_config([lm("odd", odd, default=True), lm("good", tiny_llama, default=True)]))
    m = meta(hub, "odd")
    assert m["memory_state"] == "failed" and "no_such_architecture" in m["memory_last_error"]
    assert await chat(hub, "good")


async def test_load_that_fails_halfway_frees_what_it_took(
    make_hub, hub_config, small_llama: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    half = copy_model(small_llama, tmp_path / "half")
    weights = mx.load(str(half / "model.safetensors"))
    keep = dict(list(weights.items())[: len(weights) // 2])  # the file reads fine; the model is incomplete
    mx.save_safetensors(str(half / "model.safetensors"), keep)
    del weights, keep
    memory.free_memory()
    before = memory.active_memory()
    hub = await make_hub(
        hub_config([lm("half", half, jit_enabled=True, default=True), lm("good", tiny_llama, default=True)])
    )
    good_bytes = meta(hub, "good")["memory_bytes"]
    with pytest.raises(openai.InternalServerError):  # 503 with the reason
        await chat(hub, "half")
    assert meta(hub, "half")["memory_state"] == "failed"
    memory.free_memory()
    assert memory.active_memory() - before - good_bytes < 64 * 1024
    assert await chat(hub, "good")


async def test_client_disconnect_mid_stream(make_hub, hub_config, small_llama: Path) -> None:
    hub = await make_hub(hub_config([lm("s", small_llama, default=True)]))
    body = hello("s", 400, stream=True, **text_only(small_llama))
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{base_url(hub, 's')}/chat/completions", json=body) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: {")
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream
    await eventually(lambda: meta(hub, "s")["in_flight"] == 0)
    assert await asyncio.wait_for(hub.unload("s"), 30) == "unloaded"
    assert await hub.load("s") == "loaded"
    assert await chat(hub, "s")


async def test_unload_during_a_stream_waits_for_it(make_hub, hub_config, small_llama: Path) -> None:
    hub = await make_hub(hub_config([lm("s", small_llama, default=True)]))
    body = hello("s", 60, stream=True, **text_only(small_llama))
    unloading: asyncio.Task[str] | None = None
    finish = None
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", f"{base_url(hub, 's')}/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    if unloading is None:
                        unloading = asyncio.create_task(hub.unload("s"))
                        await asyncio.sleep(0.05)
                    for choice in json.loads(line[6:]).get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                    assert not unloading.done(), "the weights went while the stream was still running"
    assert finish in ("stop", "length")  # the stream ran to its own end
    assert await asyncio.wait_for(unloading, 30) == "unloaded"


async def test_shutdown_during_a_load(hub_config, small_llama: Path) -> None:
    memory.free_memory()
    before = memory.active_memory()
    threads = {t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")}
    hub = Hub.from_config(hub_config([lm("s", small_llama, jit_enabled=True, default=True)]))
    await hub.start()
    loading = asyncio.create_task(hub.load("s"))
    await asyncio.sleep(0.01)  # the load is under way (admitted, reading weights in its thread)
    await asyncio.wait_for(hub.shutdown(), 60)
    (outcome,) = await asyncio.gather(loading, return_exceptions=True)
    # Either the load finished before the stop reached it, or it was cut off; nothing else.
    assert outcome == "loaded" or isinstance(outcome, HubError | asyncio.CancelledError), outcome
    assert hub.slots == {}
    memory.free_memory()
    assert abs(memory.active_memory() - before) < 64 * 1024
    await asyncio.sleep(0.5)
    assert {t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")} <= threads


async def test_disk_full_while_saving_state(make_hub, hub_config, tiny_llama: Path, monkeypatch) -> None:
    doc = hub_config([lm("a", tiny_llama, default=True)])
    hub = await make_hub(doc)
    ports_file = Path(doc["log_path"]) / "ports.json"
    saved = ports_file.read_text()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    result = await hub.reload({**doc, "models": [*doc["models"], lm("b", tiny_llama, default=True)]})
    assert result["started"] == ["b"]  # the reload went through; only remembering ports failed
    assert ports_file.read_text() == saved and json.loads(saved)  # the old file, intact and valid
    assert not list(ports_file.parent.glob(".ports.json.*"))  # no temporary file left behind
    assert await chat(hub, "a") and await chat(hub, "b")
