"""Prompt caches that survive unloads and restarts: generated models, real ports, answers compared.

At temperature 0 a request served from a restored cache must give the same
tokens as the same request on a hub that never saw it (cold). Each case runs
the conversation cold on a hub without persistence, then on a persisting hub:
first request, unload and load, a new Hub on the same folder; status counters
must show the restored cache was used.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlx_hub.config import ConfigError

from .helpers import base_url, meta, text_only

Make = Callable[..., Any]

#: Plain lm one request at a time, the same with a quantized KV cache, and lm through the batch scheduler.
CASES = {
    "lm": {"disable_batching": True},
    "lm-kv8": {"disable_batching": True, "kv_bits": 8, "kv_group_size": 32},
    "batched": {},
}

SYSTEM = (
    "You are a careful assistant for a shop that sells tea, coffee and cups. Answer in one short line. "
    "Prices: green tea 4, black tea 3, espresso 2, latte 3, cups 5. Opening hours nine to five."
)


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM * 3}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: what costs {i + 2}?"})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": f"Answer {i}: tea and cups."})
    return messages


def body(model: Path, turns: int) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": conversation(turns),
        "max_tokens": 8,
        "temperature": 0,
        **text_only(model),
    }


async def ask(hub: Any, model: Path, turns: int) -> tuple[str, int]:
    """The answer's text and how many prompt tokens upstream says came from a cache."""
    async with httpx.AsyncClient(timeout=120) as client:
        reply = await client.post(f"{base_url(hub, 'm')}/chat/completions", json=body(model, turns))
    assert reply.status_code == 200, reply.text
    data = reply.json()
    details = data["usage"].get("prompt_tokens_details") or {}
    return data["choices"][0]["message"]["content"], int(details.get("cached_tokens") or 0)


def stored_classes(hub: Any) -> set[str]:
    """The cache classes the entries on disk hold (mlx-lm's format keeps them as metadata)."""
    import mlx.core as mx

    from mlx_hub.engine.patches.prompt_cache import entry_layout

    names = set()
    for path in hub.prompt_store.root.rglob("*.safetensors"):
        if path.name.startswith("."):  # a payload still being written (published by rename)
            continue
        _, metadata = mx.load(str(path), return_metadata=True)
        names |= set(entry_layout(metadata)[1])
    return names


def entry(model: Path, **options: Any) -> dict[str, Any]:
    return {"name": "m", "model_path": str(model), "default": True, **options}


@pytest.mark.parametrize("case", list(CASES))
async def test_restored_cache_answers_as_cold_after_unload_and_restart(
    case: str, small_llama: Path, hub_config: Make, make_hub: Make, tmp_path: Path
) -> None:
    options = CASES[case]
    cold_hub = await make_hub(hub_config([entry(small_llama, **options)], prompt_cache_disk_size=0))
    cold = [(await ask(cold_hub, small_llama, turns))[0] for turns in (1, 2)]
    assert cold_hub.prompt_store is None and not (tmp_path / "prompt-cache").exists()
    await cold_hub.shutdown()

    doc = hub_config([entry(small_llama, **options)], prompt_cache_path=str(tmp_path / "pc"))
    hub = await make_hub(doc)
    assert (await ask(hub, small_llama, 1))[0] == cold[0]
    first = meta(hub, "m")
    assert (first["prompt_cache_hits"], first["prompt_cache_misses"]) == (0, 1)
    assert first["prompt_cache_disk_bytes"] > 0
    assert stored_classes(hub) == ({"QuantizedKVCache"} if "kv_bits" in options else {"KVCache"})

    await hub.unload("m")
    await hub.load("m")
    assert len(hub.slots["m"].handler.prompt_cache) > 0  # the entries were restored
    text, cached = await ask(hub, small_llama, 1)
    assert text == cold[0]
    after_unload = meta(hub, "m")
    assert after_unload["prompt_cache_hits"] == 1 and after_unload["prompt_cache_tokens_reused"] > 100
    assert cached > 100
    await hub.shutdown()

    restarted = await make_hub(doc)  # a new hub on the same folder: a restart
    text, cached = await ask(restarted, small_llama, 2)  # a longer conversation: the stored one is its prefix
    assert text == cold[1]
    status = meta(restarted, "m")
    assert status["prompt_cache_hits"] == 1 and status["prompt_cache_tokens_reused"] > 100 and cached > 100
    hub_level = restarted.status()["prompt_cache"]
    assert hub_level["enabled"] and 0 < hub_level["disk_bytes"] <= hub_level["cap_bytes"]


async def test_restored_entries_on_disk_are_not_the_models_memory(
    tiny_llama: Path, hub_config: Make, make_hub: Make, tmp_path: Path
) -> None:
    """Upstream 1.8.1 keeps its prompt-cache entries in files and reads one only on a hit: restored at a
    start they hold no memory, so the model's bytes in status, and the size admission and the budget
    count, are the same with them as without; their bytes show as prompt_cache_disk_bytes."""
    doc = hub_config([entry(tiny_llama, disable_batching=True)], prompt_cache_path=str(tmp_path / "pc"))
    hub = await make_hub(doc)
    await ask(hub, tiny_llama, 1)
    await hub.shutdown()

    restarted = await make_hub(doc)
    slot, cache = restarted.slots["m"], restarted.slots["m"].handler.prompt_cache
    assert len(cache) > 0 and cache.nbytes > 0  # restored: upstream counts the entries' tensor bytes
    with_entries = (meta(restarted, "m"), restarted.status()["memory"]["models_bytes"], slot.candidate())
    assert with_entries[0]["prompt_cache_bytes"] == 0 and with_entries[0]["prompt_cache_disk_bytes"] > 0
    assert with_entries[2].evictable == 0  # nothing in memory to drop instead of unloading

    restarted.prompt_store.clear(["m"])  # the files go, and the live cache forgets them
    assert len(cache) == 0
    row = meta(restarted, "m")
    assert row["prompt_cache_disk_bytes"] == 0
    assert row["memory_bytes"] == with_entries[0]["memory_bytes"]
    assert restarted.status()["memory"]["models_bytes"] == with_entries[1]
    assert slot.candidate().size == with_entries[2].size  # what admission and the budget count


def test_only_a_cache_that_holds_its_entries_in_memory_counts_them() -> None:
    """1.6.3's LRUPromptCache (as mlx-lm's) holds each entry's arrays; 1.8.1's holds a file per entry."""
    from types import SimpleNamespace

    from app.utils.prompt_cache import LRUPromptCache as OnDisk
    from mlx_lm.models.cache import LRUPromptCache as InMemory

    from mlx_hub.engine.handlers import prompt_cache_bytes

    in_memory, on_disk = InMemory(), OnDisk()
    in_memory._n_bytes = on_disk._n_bytes = 1000
    assert prompt_cache_bytes(SimpleNamespace(prompt_cache=in_memory)) == 1000
    assert prompt_cache_bytes(SimpleNamespace(prompt_cache=on_disk)) == 0
    assert prompt_cache_bytes(SimpleNamespace()) == 0
    on_disk.close()


async def test_an_edited_config_json_is_a_new_identity_and_the_stale_cache_is_evicted(
    tiny_llama: Path, hub_config: Make, make_hub: Make, tmp_path: Path
) -> None:
    """config.json shapes the KV (rope_theta here): after an edit and a restart the stored cache is
    not served, and it is evicted, folder and all, when the new identity's entry needs the room."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    doc = hub_config([entry(model, disable_batching=True)], prompt_cache_path=str(tmp_path / "pc"))
    hub = await make_hub(doc)
    await ask(hub, model, 1)
    stale = hub.prompt_store.known["m"]
    (kept,) = hub.prompt_store.entries(stale)
    await hub.shutdown()

    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": config["rope_theta"] * 50}))
    # Room for the new entry (the same tokens, so the same size), not for it beside the stale one.
    cap = max(kept.nbytes, kept.bytes + kept.bytes // 2)
    assert cap < 2 * kept.bytes
    restarted = await make_hub({**doc, "prompt_cache_disk_size": cap})
    _, cached = await ask(restarted, model, 1)
    assert cached == 0 and restarted.slots["m"].handler.prompt_cache.restored == 0
    row = meta(restarted, "m")
    assert (row["prompt_cache_hits"], row["prompt_cache_misses"]) == (0, 1)
    store = restarted.prompt_store
    assert store.known["m"] != stale
    assert row["prompt_cache_disk_bytes"] > 0 and stale not in store.keys()  # evicted, folder and all


async def test_a_corrupt_cache_file_is_skipped_deleted_and_served_cold(
    small_llama: Path, hub_config: Make, make_hub: Make
) -> None:
    doc = hub_config([entry(small_llama, disable_batching=True)])
    hub = await make_hub(doc)
    cold, _ = await ask(hub, small_llama, 1)
    await hub.unload("m")
    payloads = list(hub.prompt_store.root.rglob("*.safetensors"))
    assert payloads
    for path in payloads:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a crash
    await hub.load("m")
    text, cached = await ask(hub, small_llama, 1)
    assert text == cold and cached == 0
    assert not any(p.exists() for p in payloads)
    assert meta(hub, "m")["prompt_cache_hits"] == 0


async def test_disk_size_zero_keeps_upstreams_temporary_cache(
    small_llama: Path, hub_config: Make, make_hub: Make, tmp_path: Path
) -> None:
    hub = await make_hub(hub_config([entry(small_llama)], prompt_cache_disk_size="0"))
    await ask(hub, small_llama, 1)
    await hub.unload("m")
    await hub.load("m")
    _, cached = await ask(hub, small_llama, 1)
    assert cached == 0  # upstream's behaviour: the unload took the cache with it
    assert not (tmp_path / "prompt-cache").exists()
    assert hub.status()["prompt_cache"]["enabled"] is False


def test_a_cache_folder_others_can_write_is_refused(hub_config: Make, tmp_path: Path) -> None:
    from mlx_hub import Hub

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    doc = hub_config([{"name": "m", "model_path": "x/y"}], prompt_cache_path=str(shared))
    with pytest.raises(ConfigError) as err:
        Hub.from_config(doc)
    assert str(shared) in str(err.value) and "chmod 700" in str(err.value)


def test_prompt_cache_disk_size_is_validated(hub_config: Make) -> None:
    from mlx_hub.config import parse_config

    for bad in ("lots", -1, "20XB", True):
        with pytest.raises(ConfigError) as err:
            parse_config(hub_config([{"name": "m", "model_path": "x/y"}], prompt_cache_disk_size=bad))
        assert "prompt_cache_disk_size" in str(err.value)
    good = parse_config(hub_config([{"name": "m", "model_path": "x/y"}], prompt_cache_disk_size="20GB"))
    assert good.prompt_cache_cap == 20 << 30
    assert parse_config(hub_config([{"name": "m", "model_path": "x/y"}])).prompt_cache_cap == 10 << 30


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mlx_hub.cli", "cache", *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


async def test_cache_command_lists_and_clears_with_and_without_a_hub(
    tiny_llama: Path, hub_config: Make, start: Make, tmp_path: Path
) -> None:
    from mlx_hub.service.runtime import Runtime, clear_runtime, write_runtime

    config = tmp_path / "hub.yaml"
    doc = hub_config([entry(tiny_llama, disable_batching=True)], prompt_cache_path=str(tmp_path / "pc"))
    config.write_text(yaml.safe_dump(doc))
    live = await start(str(config))
    await ask(live.hub, tiny_llama, 1)
    logs = Path(doc["log_path"])
    write_runtime(logs, Runtime(os.getpid(), "127.0.0.1", live.port, str(config), time.time()))
    try:
        listed = await asyncio.to_thread(cli, config)  # the CLI asks the running hub
        assert listed.returncode == 0, listed.stderr
        assert (
            "tiny-llama-" in listed.stdout
            and " m " in listed.stdout
            and "prompt_cache_disk_size" in listed.stdout
        )
        cleared = await asyncio.to_thread(cli, config, "clear", "m")
        assert cleared.returncode == 0 and "cleared 1" in cleared.stdout, cleared.stderr
        assert meta(live.hub, "m")["prompt_cache_disk_bytes"] == 0
        assert len(live.hub.slots["m"].handler.prompt_cache) == 0  # the live cache forgot the deleted entries
        _, cached = await ask(live.hub, tiny_llama, 1)
        assert cached == 0
        unknown = await asyncio.to_thread(cli, config, "clear", "nosuch")
        assert unknown.returncode == 1 and "nosuch" in unknown.stderr
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{live.url}/metrics")).text
        assert 'mlx_hub_prompt_cache_misses_total{model="m"} 2.0' in metrics
        cap = next(
            line for line in metrics.splitlines() if line.startswith("mlx_hub_prompt_cache_disk_cap_bytes ")
        )
        assert float(cap.split()[1]) == 10 << 30
    finally:
        clear_runtime(logs)
    offline = await asyncio.to_thread(cli, config)  # no runtime file: the CLI reads the folder itself
    assert offline.returncode == 0 and "tiny-llama-" in offline.stdout, offline.stderr
    all_cleared = await asyncio.to_thread(cli, config, "clear")
    assert all_cleared.returncode == 0, all_cleared.stderr
    assert not list((tmp_path / "pc").rglob("*.safetensors"))


async def ask_as(hub: Any, name: str, model: Path) -> int:
    async with httpx.AsyncClient(timeout=120) as client:
        reply = await client.post(
            f"http://127.0.0.1:{hub.slots[name].port}/v1/chat/completions",
            json={**body(model, 1), "model": name},
        )
    assert reply.status_code == 200, reply.text
    return int((reply.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


async def test_a_group_swap_keeps_the_cache_and_profiles_share_one(
    tiny_llama: Path, tiny_qwen: Path, hub_config: Make, make_hub: Make
) -> None:
    doc = hub_config(
        [
            {
                "name": "a",
                "model_path": str(tiny_llama),
                "jit_enabled": True,
                "default": True,
                "group": "g",
                "disable_batching": True,
            },
            {"name": "b", "model_path": str(tiny_qwen), "jit_enabled": True, "default": True, "group": "g"},
            {"name": "a2", "model_path": str(tiny_llama), "default": True, "disable_batching": True},
        ],
        groups=[{"name": "g", "max_loaded": 1}],
    )
    hub = await make_hub(doc)
    assert hub.prompt_store.known["a"] == hub.prompt_store.known["a2"] != hub.prompt_store.known["b"]
    assert await ask_as(hub, "a", tiny_llama) == 0
    assert (
        await ask_as(hub, "a2", tiny_llama) > 100
    )  # a profile of the same weights reads a's entry while loaded
    assert await ask_as(hub, "b", tiny_qwen) == 0  # swaps a out of the group
    assert hub.slots["a"].memory_state.value == "unloaded"
    assert await ask_as(hub, "a", tiny_llama) > 100  # swaps b out, and a finds its cache on disk
    rows = {row["id"]: row["metadata"] for row in hub.status()["models"]}
    assert (rows["a"]["prompt_cache_hits"], rows["a"]["prompt_cache_misses"]) == (1, 1)
    assert rows["a2"]["prompt_cache_hits"] == 1 and rows["b"]["prompt_cache_misses"] == 1
    assert rows["a"]["prompt_cache_disk_bytes"] == rows["a2"]["prompt_cache_disk_bytes"] > 0


async def test_a_cache_hit_takes_no_store_lock_and_writes_nothing_on_the_event_loop(
    tiny_llama: Path, hub_config: Make, make_hub: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .test_prompt_store import record_store_work, wait_until

    hub = await make_hub(hub_config([entry(tiny_llama, disable_batching=True)]))
    await ask(hub, tiny_llama, 1)  # a miss: the entry is written on upstream's worker thread
    seen = record_store_work(monkeypatch)
    _, cached = await ask(hub, tiny_llama, 1)  # looked up (and loaded) on the event loop
    assert cached > 0
    loop = threading.current_thread().name
    assert seen and loop not in {name for _, name in seen}  # the worker wrote the new entry; the loop nothing
    wait_until(lambda: any(name.startswith("prompt-store") for _, name in seen))  # the use: written later


async def first_content(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> float:
    """Stream a reply until its first text arrives; the monotonic time it did."""
    async with client.stream("POST", url, json={**payload, "stream": True}) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if (
                line.startswith("data: {")
                and '"content":"' in line.replace(" ", "")
                and '"content":""' not in line
            ):
                return time.monotonic()
    raise AssertionError("the stream ended without text")


async def test_a_slow_cache_write_holds_up_no_other_request(
    small_llama: Path, hub_config: Make, make_hub: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing a finished request's cache to disk (files, fsyncs, the index) must not stop the batch: with
    that write held, another request still gets its tokens; the first reply ends once its entry is on disk."""
    from mlx_hub.engine.prompt_store import PromptStore

    hub = await make_hub(hub_config([entry(small_llama)], prompt_cache_path=str(tmp_path / "pc")))
    await ask(hub, small_llama, 1)  # the batch scheduler is running, its first entry written
    entered, release = threading.Event(), threading.Event()
    commit = PromptStore.commit

    def held_commit(self: PromptStore, *args: Any, **kwargs: Any) -> bool:
        entered.set()
        release.wait(120)
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(PromptStore, "commit", held_commit)
    url = f"{base_url(hub, 'm')}/chat/completions"
    async with httpx.AsyncClient(timeout=180) as client:
        first = asyncio.create_task(client.post(url, json=body(small_llama, 3)))
        try:
            for _ in range(1200):  # the first request's entry reaches the (held) index write
                if entered.is_set():
                    break
                await asyncio.sleep(0.1)
            assert entered.is_set()
            other = {**body(small_llama, 1), "messages": [{"role": "user", "content": "Another question."}]}
            await asyncio.wait_for(first_content(client, url, other), timeout=90)
            assert not first.done()  # its reply ends after its entry's write, which is still held
        finally:
            release.set()
        reply = await first
    assert reply.status_code == 200, reply.text
    assert meta(hub, "m")["prompt_cache_disk_bytes"] > 0
