"""Two ``mlx_hub.Hub`` objects in one process share no engine state, and may share a prompt-cache folder.

Weights copies, whisper holders, tokenizer copies and reservations belong to
each hub's engine; before they did, two hubs serving the same folder under the
same entry name shared one copy and each other's holders, so an unload in one
hub changed the other's accounting.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from mlx_hub.core import admission
from mlx_hub.engine.prompt_listing import describe

from .helpers import hello, meta
from .test_prompt_store import record_store_work


async def test_two_hubs_keep_their_own_weights_counters_and_reservations(
    make_hub, hub_config, tiny_llama: Path
) -> None:
    entry = {"name": "m", "model_path": str(tiny_llama), "default": True}
    first = await make_hub(hub_config([entry]))
    second = await make_hub(hub_config([entry]))
    assert first.engine is not second.engine

    # Each hub read its own copy, and each copy has only its own hub's holder.
    (mine,), (theirs,) = first.engine.shared("m"), second.engine.shared("m")
    assert mine.holders == ["m"] and theirs.holders == ["m"]
    assert mine.model() is not None and mine.model() is not theirs.model()
    assert meta(second, "m")["memory_bytes"] > 0.5 * meta(first, "m")["memory_bytes"] > 0

    # A reservation in one hub is not in the other's budget arithmetic.
    slot = second.slots["m"]
    reserved = await admission.acquire(second, slot, hello("m", 64))
    try:
        assert admission.reserved_bytes(second) == reserved.bytes > 0
        assert admission.reserved_bytes(first) == 0
    finally:
        admission.release(second, slot, reserved=reserved)

    # Each engine counts prompts with its own tokenizer copy.
    first.engine.estimate_request(first.slots["m"].entry, hello("m", 8))
    assert first.engine.counter.tokenizer(first.slots["m"].entry) is not None
    assert first.engine.counter is not second.engine.counter

    # Unloading in one hub frees its copy only; the other keeps serving with its own.
    assert await first.unload("m") == "unloaded"
    assert first.engine.shared("m") == [] and second.engine.shared("m")[0].holders == ["m"]
    async with httpx.AsyncClient(timeout=60) as http:
        url = f"http://127.0.0.1:{second.slots['m'].port}/v1/chat/completions"
        reply = await http.post(url, json=hello("m", 4))
    assert reply.status_code == 200, reply.text
    # With the first copy gone, the first hub's estimate counts the whole folder again; the second's does not.
    assert first.engine.estimate(first.slots["m"].entry) > 0
    assert second.engine.estimate(second.slots["m"].entry) == 0


async def test_two_hubs_share_one_prompt_cache_folder_without_failing_each_other(
    make_hub, hub_config, tiny_llama: Path, tiny_qwen: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = str(tmp_path / "shared-prompt-cache")  # as two configs on the default folder would
    one = {"name": "a", "model_path": str(tiny_llama), "default": True, "disable_batching": True}
    other = {"name": "b", "model_path": str(tiny_qwen), "default": True, "disable_batching": True}
    first = await make_hub(hub_config([one], prompt_cache_path=folder))
    second = await make_hub(hub_config([other], prompt_cache_path=folder))

    async def ask(hub, name: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as http:
            url = f"http://127.0.0.1:{hub.slots[name].port}/v1/chat/completions"
            return await http.post(url, json=hello(name, 4))

    assert (await ask(second, "b")).status_code == 200
    assert (await ask(first, "a")).status_code == 200
    key = first.prompt_store.known["a"]
    assert first.prompt_store.entries(key)
    # The second hub's cap leaves room for its own entry only: its next write evicts the oldest
    # entries of both hubs, the first hub's included, though that identity is not in its hub.yaml.
    store = second.prompt_store
    store.cap = store.usage()[store.known["b"]]
    assert (await ask(second, "b")).status_code == 200
    assert first.prompt_store.entries(key) == []
    row = next(r for r in describe(store)["identities"] if r["key"] == key)
    assert row["in_use"] and not row["known"]  # another live hub's: kept, with its description
    assert (Path(folder) / key / "identity.json").exists()
    # The first hub is not failed by it: its next request misses, answers, and is cached again;
    # the lookup that found the entry gone (on the event loop) left the index to the store's thread.
    seen = record_store_work(monkeypatch)
    assert (await ask(first, "a")).status_code == 200
    assert threading.current_thread().name not in {name for _, name in seen}
    assert first.prompt_store.entries(key)
