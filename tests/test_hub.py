"""The hub end to end: real models on real ports, driven by the official openai client."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlx_hub.core import admission
from mlx_hub.core.errors import CapacityError, PortStartError, UnknownModelError
from mlx_hub.engine import memory

from .helpers import base_url, hello, meta, text_only


def client(hub: Any, name: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(hub, name), api_key="unused", max_retries=0, **kw)


async def chat(hub: Any, name: str, **kw: Any) -> str:
    bias = text_only(hub.slots[name].entry.model_path) if name in hub.slots else {}
    reply = await client(hub, name).chat.completions.create(
        **hello(name, kw.pop("max_tokens", 6), **bias, **kw)
    )
    return reply.choices[0].message.content or ""


async def eventually(predicate: Any, timeout: float = 20.0) -> None:
    """Wait for a state the hub reaches on its own (a timer, a background unload)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


def lm(name: str, path: Path, **kw: Any) -> dict[str, Any]:
    return {"name": name, "model_path": str(path), "context_length": 2048, **kw}


@pytest.mark.compat
async def test_two_models_side_by_side(make_hub, hub_config, tiny_llama: Path, tiny_qwen: Path) -> None:
    hub = await make_hub(
        hub_config([lm("llama", tiny_llama, default=True), lm("qwen", tiny_qwen, default=True)])
    )
    assert hub.slots["llama"].port != hub.slots["qwen"].port
    for name, path in (("llama", tiny_llama), ("qwen", tiny_qwen)):
        c = client(hub, name)
        request = hello(name, 6, **text_only(path))
        reply = await c.chat.completions.create(**request)
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 6
        stream = await c.chat.completions.create(**request, stream=True)
        pieces = [
            ch.choices[0].delta.content async for ch in stream if ch.choices and ch.choices[0].delta.content
        ]
        assert pieces
        listed = await c.models.list()
        assert [m.id for m in listed.data] == [str(path)]
    status = hub.status()
    assert status["counts"] == {"registered": 2, "started": 2, "loaded": 2}
    for name in ("llama", "qwen"):
        m = meta(hub, name)
        assert (m["process_state"], m["memory_state"]) == ("running", "loaded")
        assert m["memory_bytes"] > 0 and m["load_count"] == 1 and m["in_flight"] == 0


@pytest.mark.compat
async def test_jit_first_request_loads_once_for_concurrent_waiters(
    make_hub, hub_config, tiny_qwen: Path
) -> None:
    hub = await make_hub(hub_config([lm("q", tiny_qwen, default=True, jit_enabled=True)]))
    assert meta(hub, "q")["memory_state"] == "unloaded"
    async with httpx.AsyncClient() as http:
        health = (await http.get(base_url(hub, "q").removesuffix("/v1") + "/health")).json()
        assert health["status"] == "ok" and health["model_status"] == "unloaded"
        listed = (await http.get(base_url(hub, "q") + "/models")).json()
        assert [m["id"] for m in listed["data"]] == [str(tiny_qwen)]  # listed while unloaded
    replies = await asyncio.gather(*(chat(hub, "q") for _ in range(6)))
    assert all(replies)
    m = meta(hub, "q")
    assert m["memory_state"] == "loaded" and m["load_count"] == 1


async def test_ready_waits_for_what_runs_before_it(hub_config, tiny_llama: Path) -> None:
    """The CLI's ``start`` prints its table once status says ready. A supervised hub restores what a
    crash took after its models started (held-back ports, reloads): ready before that let the CLI
    print a held-back model as still starting (a CI failure of the crash-recovery test)."""
    from mlx_hub import Hub

    hub = Hub.from_config(hub_config([lm("a", tiny_llama, default=True)]))
    release = asyncio.Event()
    seen: list[bool] = []

    async def restore(owner: Any) -> None:
        seen.append(owner.ready)
        await release.wait()

    starting = asyncio.create_task(hub.start(before_ready=restore))
    try:
        await eventually(lambda: bool(seen))
        assert meta(hub, "a")["process_state"] == "running" and hub.status()["ready"] is False
        release.set()
        assert await starting == ["a"]
        assert hub.status()["ready"] is True and seen == [False]
    finally:
        release.set()
        await hub.shutdown()


async def test_idle_unload_keeps_port_and_reloads_on_demand(make_hub, hub_config, tiny_llama: Path) -> None:
    # 0.005 min = 0.3 s of idleness.
    hub = await make_hub(
        hub_config([lm("a", tiny_llama, default=True, jit_enabled=True, auto_unload_minutes=0.005)])
    )
    await chat(hub, "a")
    assert meta(hub, "a")["memory_state"] == "loaded"
    await eventually(lambda: meta(hub, "a")["memory_state"] == "unloaded")
    m = meta(hub, "a")
    assert m["process_state"] == "running" and m["memory_bytes"] == 0 and m["freed_bytes"] > 0
    await chat(hub, "a")
    assert meta(hub, "a")["load_count"] == 2


async def test_idle_unload_never_while_in_flight(make_hub, hub_config, tiny_llama: Path) -> None:
    hub = await make_hub(
        hub_config([lm("a", tiny_llama, default=True, jit_enabled=True, auto_unload_minutes=0.002)])
    )
    slot = hub.slots["a"]
    await admission.acquire(hub, slot)  # exactly what a request's gate does on arrival
    try:
        await asyncio.sleep(0.5)  # well past the 0.12 s timer, several reaper rounds
        assert await admission.reap_idle(hub) == []
        assert meta(hub, "a")["memory_state"] == "loaded" and meta(hub, "a")["in_flight"] == 1
    finally:
        admission.release(hub, slot)
    await eventually(lambda: meta(hub, "a")["memory_state"] == "unloaded")


async def test_unload_waits_for_the_request_in_flight(make_hub, hub_config, tiny_llama: Path) -> None:
    hub = await make_hub(hub_config([lm("a", tiny_llama, default=True)]))
    slot = hub.slots["a"]
    await admission.acquire(hub, slot)
    unloading = asyncio.create_task(hub.unload("a"))
    await eventually(lambda: meta(hub, "a")["memory_state"] == "unloading")
    await asyncio.sleep(0.2)
    assert not unloading.done() and slot.handler is not None
    admission.release(hub, slot)
    assert await unloading == "unloaded"
    assert meta(hub, "a")["memory_state"] == "unloaded"


async def test_group_evicts_least_recently_used(
    make_hub, hub_config, tiny_llama: Path, tiny_qwen: Path
) -> None:
    models = [
        lm("a", tiny_llama, default=True, jit_enabled=True, group="g"),
        lm("b", tiny_qwen, default=True, jit_enabled=True, group="g"),
        lm("c", tiny_llama, default=True, jit_enabled=True, group="g"),
    ]
    hub = await make_hub(hub_config(models, groups=[{"name": "g", "max_loaded": 2}]))
    await chat(hub, "a")
    await chat(hub, "b")
    await chat(hub, "a")  # a is now more recent than b
    await chat(hub, "c")
    states = {n: meta(hub, n)["memory_state"] for n in "abc"}
    assert states == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    await chat(hub, "b")  # now c is more recent than a
    states = {n: meta(hub, n)["memory_state"] for n in "abc"}
    assert states == {"a": "unloaded", "b": "loaded", "c": "loaded"}
    group = hub.status()["groups"][0]
    assert group["loaded"] == 2 and "Group 'g' is at max_loaded (2)" in hub.status()["warnings"]


async def test_group_at_capacity_waits_then_answers_429(
    make_hub, hub_config, tiny_llama: Path, tiny_qwen: Path
) -> None:
    models = [
        lm("a", tiny_llama, default=True, jit_enabled=True, group="g"),
        lm("b", tiny_qwen, default=True, jit_enabled=True, group="g", queue_timeout=0.5),
    ]
    hub = await make_hub(hub_config(models, groups=[{"name": "g", "max_loaded": 1}]))
    await chat(hub, "a")
    slot_a = hub.slots["a"]
    await admission.acquire(hub, slot_a)  # a is busy: nothing can be evicted
    try:
        with pytest.raises(openai.RateLimitError) as info:
            await chat(hub, "b")
        body = info.value.response.json()
        assert body["error"]["code"] == "group_at_capacity" and "max_loaded (1)" in body["error"]["message"]
        assert info.value.response.headers["retry-after"]
        with pytest.raises(CapacityError):
            await hub.load("b")
        # A request that arrives while a is busy waits, and is served once a frees up.
        waiting = asyncio.create_task(chat(hub, "b"))
        await asyncio.sleep(0.1)
        assert not waiting.done()
    finally:
        admission.release(hub, slot_a)
    assert await waiting
    assert (meta(hub, "a")["memory_state"], meta(hub, "b")["memory_state"]) == ("unloaded", "loaded")


async def test_idle_trigger_protects_recent_members(
    make_hub, hub_config, tiny_llama: Path, tiny_qwen: Path
) -> None:
    models = [
        lm("a", tiny_llama, default=True, jit_enabled=True, group="g"),
        lm("b", tiny_qwen, default=True, jit_enabled=True, group="g", queue_timeout=0.3),
    ]
    groups = [{"name": "g", "max_loaded": 1, "idle_unload_trigger_min": 0.05}]  # 3 s
    hub = await make_hub(hub_config(models, groups=groups))
    await chat(hub, "a")
    hub.slots["a"].touch()  # a was just used: 3 s must pass before it may give way; b waits 0.3 s
    with pytest.raises(openai.RateLimitError):
        await chat(hub, "b")
    hub.slots["a"].last_used -= 3.5  # as if a had been idle for 3.5 s (the monotonic clock, not a sleep)
    assert await chat(hub, "b")
    assert meta(hub, "a")["memory_state"] == "unloaded"


async def test_failing_models_do_not_disturb_the_others(
    make_hub, hub_config, tiny_llama: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in tiny_llama.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    models = [
        lm("good", tiny_llama, default=True),
        lm("corrupt", corrupt, default=True),
        lm("missing", tmp_path / "missing", default=True, jit_enabled=True),
    ]
    hub = await make_hub(hub_config(models))
    assert meta(hub, "good")["memory_state"] == "loaded"
    bad = meta(hub, "corrupt")
    assert bad["memory_state"] == "failed" and bad["memory_last_error"] and bad["process_state"] == "running"
    with pytest.raises(openai.InternalServerError) as info:  # 503 with the reason
        await chat(hub, "missing")
    assert (
        info.value.status_code == 503 and "does not exist" in info.value.response.json()["error"]["message"]
    )
    with pytest.raises(openai.InternalServerError):
        await chat(hub, "corrupt")
    assert meta(hub, "missing")["memory_state"] == "failed"
    assert await chat(hub, "good")
    status = hub.status()
    assert status["status"] == "degraded" and any("'corrupt' failed to load" in w for w in status["warnings"])


async def test_taken_port_fails_that_model_only(make_hub, hub_config, tiny_llama: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        hub = await make_hub(
            hub_config([lm("a", tiny_llama, default=True), lm("b", tiny_llama, default=True, port=taken)])
        )
        m = meta(hub, "b")
        assert m["process_state"] == "failed" and f"port {taken}" in m["process_last_error"]
        with pytest.raises(PortStartError):
            await hub.start_model("b")
        assert await chat(hub, "a")


async def test_memory_returns_to_baseline_after_unload(make_hub, hub_config, small_llama: Path) -> None:
    memory.free_memory()
    before = memory.active_memory()
    hub = await make_hub(hub_config([lm("s", small_llama, default=True)]))
    await chat(hub, "s")
    loaded = meta(hub, "s")["memory_bytes"]
    assert loaded > 1_000_000
    assert await hub.unload("s") == "unloaded"
    assert await hub.unload("s") == "not_loaded"
    memory.free_memory()
    # 1 % of the weights: a leaked tensor of this model is bigger than that,
    # while MLX's own leftovers are bytes (see test_engine).
    assert abs(memory.active_memory() - before) <= 0.01 * loaded
    assert meta(hub, "s")["freed_bytes"] >= 0.99 * loaded


async def test_manual_controls_and_their_answers(make_hub, hub_config, tiny_llama: Path) -> None:
    hub = await make_hub(hub_config([lm("a", tiny_llama, default=True), lm("b", tiny_llama)]))
    assert meta(hub, "b")["process_state"] == "inactive"
    assert await hub.load("b") == "loaded"  # a closed port opens first
    assert meta(hub, "b")["process_state"] == "running"
    assert await hub.stop_model("b") == "stopped"
    assert await hub.start_model("b") == "started"
    assert await hub.start_model("b") == "already_running"
    assert await hub.load("b") == "already_loaded"
    assert await hub.unload("b") == "unloaded"
    with pytest.raises(openai.InternalServerError) as info:  # not JIT: no surprise load
        await chat(hub, "b")
    assert "load-model b" in info.value.response.json()["error"]["message"]
    assert await hub.load("b") == "loaded"
    url = base_url(hub, "b")
    assert await hub.stop_model("b") == "stopped"
    assert await hub.stop_model("b") == "not_running"
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(url + "/models")
    with pytest.raises(UnknownModelError, match="no model named 'zzz'"):
        await hub.start_model("zzz")
    assert await chat(hub, "a")


async def test_reload_diff_and_port_persistence(
    make_hub, hub_config, tiny_llama: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    doc = hub_config(
        [
            lm("keep", tiny_llama, default=True),
            lm("change", tiny_llama, default=True),
            lm("drop", tiny_qwen, default=True),
        ]
    )
    hub = await make_hub(doc)
    ports = {n: s.port for n, s in hub.slots.items()}
    kept_handler = hub.slots["keep"].handler
    new_doc = {
        **doc,
        "models": [
            lm("added", tiny_qwen, default=True),
            lm("keep", tiny_llama, default=True),
            lm("change", tiny_llama, default=True, context_length=1024),
        ],
    }
    result = await hub.reload(new_doc)
    assert result == {
        "started": ["added", "change"],
        "stopped": ["drop", "change"],
        "unchanged": ["keep"],
        "failed": {},
    }
    assert hub.slots["keep"].handler is kept_handler  # untouched: same weights, no reload
    assert list(hub.slots) == ["added", "keep", "change"]
    assert hub.slots["keep"].port == ports["keep"] and hub.slots["change"].port == ports["change"]
    assert hub.slots["added"].port not in ports.values()  # 'drop' keeps its port reserved
    assert "drop" not in [row["id"] for row in hub.status()["models"]]
    assert await chat(hub, "added") and await chat(hub, "change")
    final = {n: s.port for n, s in hub.slots.items()}
    await hub.shutdown()
    # A fresh hub on the same log_path finds the same ports.
    again = await make_hub(new_doc)
    assert {n: s.port for n, s in again.slots.items()} == final


async def test_reload_from_file_rejects_a_broken_config(
    make_hub, hub_config, tiny_llama: Path, tmp_path: Path
) -> None:
    import yaml

    from mlx_hub.config import ConfigError

    path = tmp_path / "hub.yaml"
    doc = hub_config([lm("a", tiny_llama, default=True)])
    path.write_text(yaml.safe_dump(doc))
    hub = await make_hub(path)
    path.write_text(
        yaml.safe_dump({**doc, "models": [{"name": "a", "model_path": str(tiny_llama), "prot": 1}]})
    )
    with pytest.raises(ConfigError, match="did you mean 'port'"):
        await hub.reload()
    assert meta(hub, "a")["memory_state"] == "loaded" and await chat(hub, "a")


async def test_async_with_starts_and_stops(hub_config, tiny_llama: Path) -> None:
    from mlx_hub import Hub

    async with Hub.from_config(hub_config([lm("a", tiny_llama, default=True)])) as hub:
        url = base_url(hub, "a")
        assert await chat(hub, "a")
    assert hub.slots == {}
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(url + "/models")


@pytest.mark.compat
async def test_embeddings_model_beside_a_chat_model(
    make_hub, hub_config, tiny_llama: Path, tiny_embedder: Path
) -> None:
    models = [
        lm("chat", tiny_llama, default=True),
        {
            "name": "embed",
            "model_path": str(tiny_embedder),
            "model_type": "embeddings",
            "default": True,
            "jit_enabled": True,
        },
    ]
    hub = await make_hub(hub_config(models))
    result = await client(hub, "embed").embeddings.create(model="embed", input=["hello world", "paris"])
    vectors = [item.embedding for item in result.data]
    assert len(vectors) == 2 and len(vectors[0]) == 64 and vectors[0] != vectors[1]
    assert meta(hub, "embed")["memory_state"] == "loaded"
    assert await chat(hub, "chat")
