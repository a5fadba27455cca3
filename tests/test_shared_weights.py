"""One copy of the weights for every entry of one model: measured, accounted once, freed with the last."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from mlx_hub.engine import memory

from .helpers import base_url, meta, text_only
from .test_hub import lm


def profiles(path: Path, **extra: object) -> list[dict[str, object]]:
    """A 'fast' and a 'long' profile of one model: other served names and sampling defaults."""
    return [
        lm("fast", path, default=True, served_model_name="small-fast", default_max_tokens=3, **extra),
        lm("long", path, default=True, served_model_name="small-long", default_max_tokens=7, **extra),
    ]


async def answer_tokens(hub, name: str, path: Path) -> int:
    client = openai.AsyncOpenAI(base_url=base_url(hub, name), api_key="x", max_retries=0)
    served = meta(hub, name)["served_model_name"]
    reply = await client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "Hello"}], temperature=0.0, **text_only(path)
    )
    assert reply.model == served
    return reply.usage.completion_tokens


async def test_two_profiles_share_one_copy(make_hub, hub_config, small_llama: Path) -> None:
    memory.free_memory()
    baseline = memory.active_memory()
    hub = await make_hub(hub_config(profiles(small_llama)))
    fast, long = meta(hub, "fast"), meta(hub, "long")
    weights = (small_llama / "model.safetensors").stat().st_size
    grown = memory.active_memory() - baseline
    assert abs(grown - weights) < 0.2 * weights, (grown, weights)  # one copy, not two
    # Each answers with its own settings, on its own port.
    assert await answer_tokens(hub, "fast", small_llama) == 3
    assert await answer_tokens(hub, "long", small_llama) == 7
    # Accounting: the first holder carries the copy; both say what they share and with whom.
    assert fast["shared_with"] == ["long"] and long["shared_with"] == ["fast"]
    assert fast["shared_bytes"] == long["shared_bytes"] > 0.8 * weights
    assert long["memory_bytes"] < 0.05 * weights  # the second profile added almost nothing
    assert abs(hub.status()["memory"]["models_bytes"] - grown) < 0.2 * weights  # counted once

    assert await hub.unload("fast") == "unloaded"
    # What it gave back is its own (its prompt cache), not the copy: "long" holds that.
    assert meta(hub, "fast")["freed_bytes"] < 0.25 * weights
    assert meta(hub, "long")["memory_bytes"] > 0.8 * weights  # and now carries it
    assert await answer_tokens(hub, "long", small_llama) == 7  # still serving
    assert await hub.unload("long") == "unloaded"
    memory.free_memory()
    assert abs(memory.active_memory() - baseline) <= 0.01 * weights  # the last holder freed it


async def test_the_budget_admits_a_second_profile_but_not_a_second_copy(
    make_hub, hub_config, small_llama: Path, models_dir: Path
) -> None:
    from mlx_hub.testing.tinymodel import make_model

    weights = (small_llama / "model.safetensors").stat().st_size
    shape = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768}
    twin = make_model(
        models_dir / "small-llama-twin", arch="llama", shape=shape, seed=12
    )  # same size, other folder
    models = [*profiles(small_llama, jit_enabled=True), lm("twin", twin, jit_enabled=True, default=True)]
    hub = await make_hub(hub_config(models, max_memory=int(1.5 * weights)))
    await answer_tokens(hub, "fast", small_llama)
    await answer_tokens(hub, "long", small_llama)  # fits: the copy is already there
    assert meta(hub, "fast")["memory_state"] == meta(hub, "long")["memory_state"] == "loaded"
    client = openai.AsyncOpenAI(base_url=base_url(hub, "twin"), api_key="x", max_retries=0)
    await client.chat.completions.create(
        model="twin", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    # A second copy does not fit: both profiles gave way, and only then was the copy freed.
    assert meta(hub, "twin")["memory_state"] == "loaded"
    assert meta(hub, "fast")["memory_state"] == meta(hub, "long")["memory_state"] == "unloaded"


async def test_a_draft_model_another_entry_serves_is_shared(
    make_hub, hub_config, small_llama: Path, tiny_llama: Path
) -> None:
    memory.free_memory()
    baseline = memory.active_memory()
    small, tiny = ((p / "model.safetensors").stat().st_size for p in (small_llama, tiny_llama))
    models = [
        lm("tiny", tiny_llama, default=True),
        lm("spec", small_llama, default=True, draft_model_path=str(tiny_llama)),
    ]
    hub = await make_hub(hub_config(models))
    grown = memory.active_memory() - baseline
    assert abs(grown - (small + tiny)) < 0.2 * small, (grown, small, tiny)  # the draft was not read again
    assert meta(hub, "spec")["shared_with"] == ["tiny"] and meta(hub, "tiny")["shared_with"] == ["spec"]
    client = openai.AsyncOpenAI(base_url=base_url(hub, "spec"), api_key="x", max_retries=0)
    reply = await client.chat.completions.create(
        model="spec", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **text_only(small_llama)
    )
    assert reply.usage.completion_tokens == 4  # speculative decoding with the shared draft


@pytest.mark.parametrize("kind", ["multimodal", "embeddings"])
async def test_other_model_types_share_too(
    make_hub, hub_config, tiny_vlm: Path, tiny_embedder: Path, kind: str
) -> None:
    path = tiny_vlm if kind == "multimodal" else tiny_embedder
    weights = (path / "model.safetensors").stat().st_size
    memory.free_memory()
    baseline = memory.active_memory()
    entries = [
        {
            "name": n,
            "model_path": str(path),
            "model_type": kind,
            "default": True,
            "served_model_name": f"{kind}-{n}",
        }
        for n in ("one", "two")
    ]
    hub = await make_hub(hub_config(entries))
    grown = memory.active_memory() - baseline
    assert grown < 1.5 * weights, (grown, weights)  # one copy, not two
    assert meta(hub, "two")["shared_with"] == ["one"]
    if kind == "multimodal":  # the second entry's own processor still reads images
        from .test_model_types import image_chat

        client = openai.AsyncOpenAI(base_url=base_url(hub, "two"), api_key="x", max_retries=0)
        reply = await client.chat.completions.create(**image_chat("multimodal-two", path))
        assert reply.usage.completion_tokens == 6 and reply.usage.prompt_tokens > 10
    for name in ("one", "two"):
        assert await hub.unload(name) == "unloaded"
    memory.free_memory()
    assert abs(memory.active_memory() - baseline) <= 0.02 * weights
