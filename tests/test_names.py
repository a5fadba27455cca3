"""Aliases and model cards: the names clients send, and what GET /v1/models tells them.

Coding agents send names the hub does not serve (Claude Code asks for
``claude-...``, many tools hard-code ``gpt-4o``); an entry's ``aliases`` make
those names mean it. The cards a client reads say what each model can do and
how long its context is, without loading anything.
"""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from mlx_hub.config import ConfigError, parse_config

from .test_hub import lm
from .test_peer_apis import HELLO, claude, close_clients, oai, port_url  # noqa: F401

ALIASES = ["claude-sonnet-4-5", "gpt-4o-mini"]


def test_aliases_are_unique_across_the_file() -> None:
    doc = {
        "models": [
            {"name": "qwen", "model_path": "/m/q", "aliases": ["gpt-4o", "claude-x"]},
            {"name": "coder", "model_path": "/m/c", "aliases": ["gpt-4o", "qwen"]},
            {"name": "llama", "model_path": "/m/l", "served_model_name": "claude-x"},
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="hub.yaml")
    text = str(info.value)
    # Each error names the entry with the alias and the entry that already has the name.
    assert "model 'coder' (models[1]): field 'aliases': 'gpt-4o' is already an alias of model 'qwen'" in text
    assert "'qwen' is already the name of model 'qwen' (models[0])" in text
    assert "model 'qwen' (models[0]): field 'aliases': 'claude-x' is already the served_model_name" in text
    for bad in ([""], [" gpt-4o"], "gpt-4o", [3]):
        with pytest.raises(ConfigError, match="aliases"):
            parse_config({"models": [{"name": "a", "model_path": "/m", "aliases": bad}]}, source="hub.yaml")
    ok = parse_config({"models": [{"name": "a", "model_path": "/m", "aliases": ["a", "b"]}]}, source="x")
    assert ok.models[0].names == ("/m", "a", "b")


async def test_aliases_answer_on_v1_messages_and_the_port(start, hub_config, tiny_llama: Path) -> None:
    live = await start(hub_config([lm("m", tiny_llama, jit_enabled=True, default=True, aliases=ALIASES)]))
    # /v1 on the controller: an OpenAI SDK tool that asks for gpt-4o-mini.
    reply = await oai(live.url).chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=3)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens == 3
    # /v1/messages on the controller: what Claude Code sends.
    message = await claude(live.url).messages.create(model="claude-sonnet-4-5", max_tokens=3, messages=HELLO)
    assert message.usage.output_tokens == 3 and message.model == "claude-sonnet-4-5"
    # The model's own port takes them too, on chat and on messages.
    port = port_url(live, "m")
    on_port = await oai(port).chat.completions.create(model="claude-sonnet-4-5", messages=HELLO, max_tokens=2)
    assert on_port.usage.completion_tokens == 2
    assert (await claude(port).messages.create(model="gpt-4o-mini", max_tokens=2, messages=HELLO)).content
    # A name nobody has is still refused, with the names that exist.
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        await oai(live.url).chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    with pytest.raises(anthropic.NotFoundError):
        await claude(port).messages.create(model="claude-opus-4", max_tokens=2, messages=HELLO)


async def test_model_cards_on_v1_and_ports_load_nothing(
    start, hub_config, tiny_llama: Path, tiny_embedder: Path
) -> None:
    live = await start(
        hub_config(
            [
                lm("m", tiny_llama, jit_enabled=True, default=True, aliases=ALIASES, max_output_tokens=512),
                {
                    "name": "e",
                    "model_path": str(tiny_embedder),
                    "model_type": "embeddings",
                    "jit_enabled": True,
                },
            ]
        )
    )
    client = oai(live.url)
    cards = {card.id: card.model_dump() for card in (await client.models.list()).data}
    chat, embed = cards["m"], cards["e"]
    assert chat["context_length"] == 2048 and chat["max_output_tokens"] == 512 and chat["aliases"] == ALIASES
    assert chat["capabilities"] == {
        "chat": True,
        "completions": True,
        "messages": True,
        "tools": False,
        "vision": False,
        "embeddings": False,
        "audio": False,
        "images": False,
    }
    assert embed["capabilities"]["embeddings"] and not embed["capabilities"]["chat"]
    assert chat["loaded"] is False and chat["memory_state"] == "unloaded"

    # models.retrieve by name, alias or path, on /v1 and on the port.
    for name in ("m", "gpt-4o-mini", str(tiny_llama)):
        card = await client.models.retrieve(name)
        assert card.id == "m" and card.model_dump()["context_length"] == 2048
    on_port = await oai(port_url(live, "m")).models.retrieve("claude-sonnet-4-5")
    assert on_port.id == str(tiny_llama) and on_port.model_dump()["capabilities"]["messages"]
    for url in (live.url, port_url(live, "m")):
        with pytest.raises(openai.NotFoundError, match="nope"):
            await oai(url).models.retrieve("nope")
    async with httpx.AsyncClient() as http:  # a path id, slashes and all, on the raw wire
        raw = (await http.get(f"{live.url}/v1/models/{tiny_llama}")).json()
    assert raw["hub_name"] == "m"

    # Nothing above loaded anything; once loaded, the card says so.
    assert {s.memory_state.value for s in live.hub.slots.values()} == {"unloaded"}
    await client.chat.completions.create(model="m", messages=HELLO, max_tokens=1)
    assert (await client.models.retrieve("m")).model_dump()["loaded"] is True
