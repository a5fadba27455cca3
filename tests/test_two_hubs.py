"""Two ``mlx_hub.Hub`` objects in one process share no engine state.

Weights copies, whisper holders, tokenizer copies and reservations belong to
each hub's engine; before they did, two hubs serving the same folder under the
same entry name shared one copy and each other's holders, so an unload in one
hub changed the other's accounting.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from mlx_hub.core import admission

from .helpers import hello, meta


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
