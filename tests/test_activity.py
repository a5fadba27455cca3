"""What the hub is doing, against real ports and generated models: the request log, events, history, logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from mlx_hub import Hub

from .helpers import LiveController, free_port, hello, text_only


def entries(tiny_llama: Path, tiny_qwen: Path) -> list[dict[str, Any]]:
    return [
        {"name": "alpha", "model_path": str(tiny_llama), "default": True, "context_length": 2048},
        {"name": "beta", "model_path": str(tiny_qwen), "jit_enabled": True, "context_length": 2048},
    ]


@pytest.fixture
async def live(hub_config, tiny_llama: Path, tiny_qwen: Path) -> AsyncIterator[LiveController]:
    doc = hub_config(entries(tiny_llama, tiny_qwen))
    async with LiveController(Hub.from_config(doc, reap_interval=0.05), free_port()) as controller:
        yield controller


async def rows(url: str, **params: Any) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{url}/hub/requests", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]


async def test_requests_are_logged_with_tokens_speed_route_and_api(
    live: LiveController, tiny_llama: Path
) -> None:
    alpha = live.hub.slots["alpha"]
    bias = text_only(tiny_llama)
    async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(**hello("alpha", 8, stream=True, **bias))
        pieces = [
            c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content
        ]
    assert pieces
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{alpha.port}/v1", api_key="x", max_retries=0
    ) as c:
        whole = await c.chat.completions.create(**hello("alpha", 6, **bias))
        again = await c.chat.completions.create(**hello("alpha", 6, **bias))  # the same prompt: cache reuse
    async with anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{alpha.port}", api_key="x", max_retries=0
    ) as a:
        said = await a.messages.create(
            model="alpha", max_tokens=5, messages=[{"role": "user", "content": "Hi"}], extra_body=bias
        )
    listed = await rows(live.url, model="alpha")
    claude, second, first, streamed = listed[:4]
    assert streamed["via"] == "v1" and streamed["stream"] and streamed["api"] == "openai"
    assert streamed["completion_tokens"] == 8 and streamed["prompt_tokens"] > 0
    assert 0 <= streamed["wait_s"] <= streamed["ttft_s"] <= streamed["total_s"]
    assert streamed["tokens_per_s"] > 0 and streamed["status"] == 200 and not streamed["disconnected"]
    assert first["via"] == "port" and not first["stream"] and first["ttft_s"] is None
    assert first["completion_tokens"] == whole.usage.completion_tokens == 6
    assert first["prompt_tokens"] == whole.usage.prompt_tokens and first["tokens_per_s"] > 0
    cached = again.usage.prompt_tokens_details.cached_tokens if again.usage.prompt_tokens_details else None
    assert second["cached_tokens"] == cached  # what upstream's usage reported, whatever it was
    assert claude["api"] == "anthropic" and claude["route"] == "/v1/messages"
    assert claude["completion_tokens"] == said.usage.output_tokens
    assert claude["prompt_tokens"] == said.usage.input_tokens
    assert all(r["request_body"] is None and r["response_text"] is None for r in listed)
    # A request that fails is logged with its code.
    async with httpx.AsyncClient() as http:
        refused = await http.post(
            f"{live.url}/v1/chat/completions", json=hello("alpha", 3, keep_alive="soon")
        )
    assert refused.status_code == 400
    (latest,) = await rows(live.url, limit=1)
    assert latest["status"] == refused.status_code and latest["error"] == refused.json()["error"]["code"]


async def test_the_log_survives_a_restart(hub_config, tiny_llama: Path, tiny_qwen: Path) -> None:
    doc = hub_config(entries(tiny_llama, tiny_qwen))
    async with LiveController(Hub.from_config(doc), free_port()) as first:
        async with httpx.AsyncClient() as http:
            await http.post(f"{first.url}/v1/chat/completions", json=hello("alpha", 3))
    async with LiveController(Hub.from_config(doc), free_port()) as second:
        listed = await rows(second.url)
    assert [r["model"] for r in listed] == ["alpha"] and listed[0]["completion_tokens"] is not None
    assert (Path(doc["log_path"]) / "requests.db").exists()


async def events(url: str, wanted: Callable[[str, Any], bool], seen: list[tuple[str, Any]]) -> None:
    """Read ``/hub/events`` into ``seen`` until an event ``wanted`` accepts arrives."""
    async with httpx.AsyncClient(timeout=None) as http, http.stream("GET", f"{url}/hub/events") as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        kind = None
        async for line in reply.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind:
                data = json.loads(line[6:])
                seen.append((kind, data))
                if wanted(kind, data):
                    return


async def test_events_push_state_changes_and_finished_requests(live: LiveController) -> None:
    seen: list[tuple[str, Any]] = []

    def done(kind: str, data: Any) -> bool:
        """Both arrived: beta's finished request, and its move to loaded (published a moment after a change)."""
        kinds = {
            k
            for k, d in seen
            if (k, d.get("model" if k == "request" else "id")) in (("request", "beta"), ("model", "beta"))
        }
        loaded = any(k == "model" and d["id"] == "beta" and d["memory_state"] == "loaded" for k, d in seen)
        return kinds == {"request", "model"} and loaded

    reader = asyncio.create_task(events(live.url, done, seen))
    while not seen:  # the stream opened with the whole status
        await asyncio.sleep(0.02)
    assert seen[0][0] == "status" and {m["id"] for m in seen[0][1]["models"]} == {"alpha", "beta"}
    async with httpx.AsyncClient() as http:  # a JIT model: its port opens and it loads on this request
        reply = await http.post(f"{live.url}/v1/chat/completions", json=hello("beta", 3))
    assert reply.status_code == 200
    await asyncio.wait_for(reader, 60)
    moves = [d for k, d in seen if k == "model" and d["id"] == "beta"]
    assert moves and moves[-1]["memory_state"] == "loaded"
    assert moves[0]["previous_memory_state"] == "unloaded"
    request = next(d for k, d in seen if k == "request")
    assert request["status"] == 200 and request["via"] == "v1" and "request_body" not in request


async def test_events_end_when_the_controller_stops(live: LiveController) -> None:
    seen: list[tuple[str, Any]] = []
    reader = asyncio.create_task(events(live.url, lambda k, d: False, seen))
    while not seen:
        await asyncio.sleep(0.02)
    live.hub.activity.close_streams()
    await asyncio.wait_for(reader, 10)  # the stream ended; the client did not hang up


async def test_history_samples_memory_and_speed(live: LiveController, tiny_llama: Path) -> None:
    live.hub.activity.history.interval = 0.2
    async with httpx.AsyncClient() as http:
        await http.post(f"{live.url}/v1/chat/completions", json=hello("alpha", 4, **text_only(tiny_llama)))
        await asyncio.sleep(0.1)
        live.hub.activity.history.add(live.hub.status_document())  # the watcher's next sample, now
        body = (await http.get(f"{live.url}/hub/history")).json()
    assert body["span"] == 3600
    last, stored = body["samples"][-1], body["samples"][-2]
    assert last["weights_bytes"] > 0 and last["active_bytes"] > 0 and "alpha" in last["models"]
    assert stored["models"]["alpha"]["tokens_per_s"] > 0  # the request finished before that sample


async def test_logs_tail_follow_and_filter(
    hub_config, hub_logging, tiny_llama: Path, tiny_qwen: Path
) -> None:
    doc = hub_config(entries(tiny_llama, tiny_qwen))
    hub = Hub.from_config(doc, model_logs=True)
    hub_logging(hub.config)
    async with LiveController(hub, free_port()) as live, httpx.AsyncClient(timeout=30) as http:
        hub_log = (await http.get(f"{live.url}/hub/logs")).text
        assert "model 'alpha' serving on" in hub_log
        alpha = await http.get(f"{live.url}/hub/logs", params={"model": "alpha"})
        assert alpha.status_code == 200 and "Initialized MLXHandler" in alpha.text
        assert "serving on" not in alpha.text  # the hub's own lines stay in hub.log
        only = await http.get(f"{live.url}/hub/logs", params={"contains": "ALPHA"})
        assert only.text and all("alpha" in line.lower() for line in only.text.splitlines())
        two = await http.get(f"{live.url}/hub/logs", params={"lines": 2})
        assert len(two.text.splitlines()) == 2
        missing = await http.get(f"{live.url}/hub/logs", params={"model": "nope"})
        assert missing.status_code == 404 and "alpha, beta" in missing.json()["error"]["message"]

        async def follow() -> str:
            params = {"model": "alpha", "follow": 1, "lines": 0}
            async with http.stream("GET", f"{live.url}/hub/logs", params=params) as reply:
                async for line in reply.aiter_lines():
                    if "/v1/chat/completions 200" in line:
                        return line
            return ""

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.5)
        await http.post(f"{live.url}/v1/chat/completions", json=hello("alpha", 3, **text_only(tiny_llama)))
        line = await asyncio.wait_for(follower, 30)  # the hub's line for the request, in the model's log
        assert "request via v1: /v1/chat/completions 200" in line and "3 tokens" in line
