"""Clients that wait and leave: a stream answers at once, and a client that leaves gives its place up.

Two members of a ``max_loaded: 1`` group: ``a`` is loaded and held busy (a
real admission, as a request in flight holds it), so a request for ``b`` must
wait for a group place, through real ports and real HTTP clients.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlx_hub.core import admission

from .helpers import meta
from .test_hub import eventually, lm
from .test_peer_apis import HELLO, claude, close_clients, oai, port_url  # noqa: F401


def pair(tiny_llama: Path, tmp_path: Path, **b: Any) -> list[dict[str, Any]]:
    other = shutil.copytree(tiny_llama, tmp_path / "b")  # its own folder: one folder would share weights
    return [
        lm("a", tiny_llama, jit_enabled=True, default=True, group="g"),
        lm("b", other, jit_enabled=True, default=True, group="g", **b),
    ]


def cancelled(text: str, model: str, stage: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mlx_hub_requests_cancelled_by_client_total" and sample.labels == {
                "model": model,
                "stage": stage,
            }:
                return sample.value
    return 0.0


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, "max_tokens": 3, **extra}


async def test_a_client_that_leaves_while_waiting_causes_no_load_and_no_eviction(
    start, hub_config, tiny_llama: Path, tmp_path: Path
) -> None:
    live = await start(hub_config(pair(tiny_llama, tmp_path), groups=[{"name": "g", "max_loaded": 1}]))
    a, b = live.hub.slots["a"], live.hub.slots["b"]
    await oai(live.url).chat.completions.create(**chat("a"))  # a loads
    held = await admission.acquire(live.hub, a)  # ... and stays busy
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=1.0)) as http:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                await http.post(f"{live.url}/v1/chat/completions", json=chat("b"))
        await eventually(lambda: b.waiting == 0 and not b.load_in_progress())
    finally:
        admission.release(live.hub, a, reserved=held)
    await asyncio.sleep(0.5)  # a is idle now: a load still pending for b would evict it
    assert b.memory_state.value == "unloaded" and b.load_count == 0
    assert a.memory_state.value == "loaded" and a.load_count == 1
    assert meta(live.hub, "b")["cancelled_waiting"] == 1
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{live.url}/metrics")).text
    assert cancelled(metrics, "b", "waiting") == 1
    assert 'mlx_hub_unloads_total{model="a"' not in metrics  # nothing was evicted for b

    # A generation cut by its client: counted, and its reservation given back.
    async with httpx.AsyncClient() as http:
        body = chat("a", max_tokens=1500, stream=True)
        async with http.stream("POST", f"{port_url(live, 'a')}/v1/chat/completions", json=body) as reply:
            async for _ in reply.aiter_lines():
                assert a.active == 1 and a.reserved_bytes > 0
                break
    await eventually(lambda: a.active == 0)
    assert a.reserved_bytes == 0
    assert meta(live.hub, "a")["cancelled_generating"] == 1


async def test_a_waiting_stream_answers_at_once_and_says_why(
    start, hub_config, tiny_llama: Path, tmp_path: Path
) -> None:
    live = await start(
        hub_config(pair(tiny_llama, tmp_path), groups=[{"name": "g", "max_loaded": 1}], loading_progress=True)
    )
    a, b = live.hub.slots["a"], live.hub.slots["b"]
    await oai(live.url).chat.completions.create(**chat("a"))
    held = await admission.acquire(live.hub, a)
    lines: list[str] = []
    async with httpx.AsyncClient(timeout=30) as http:
        body = chat("b", stream=True)
        async with http.stream("POST", f"{live.url}/v1/chat/completions", json=body) as reply:
            # The status and headers came while b still waits for a's place.
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
            assert live.hub.slots["b"].waiting == 1
            async for line in reply.aiter_lines():
                lines.append(line)
                if line.startswith(": queued") and a.active:
                    admission.release(live.hub, a, reserved=held)  # a's place frees: b loads and answers
    lines = [line for line in lines if line]
    assert lines[0] == ": queued 1"
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    reasoning = [d["choices"][0]["delta"].get("reasoning_content") for d in data if d["choices"]]
    assert any(r and "waiting for a place in group 'g'" in r for r in reasoning)
    assert lines[-1] == "data: [DONE]" and any(
        d["choices"] and d["choices"][0]["delta"].get("content") for d in data
    )

    # The SDK reads the same stream as any other (comments are ignored).
    streamed = await oai(live.url).chat.completions.create(**chat("b"), stream=True)
    assert [c async for c in streamed]

    # Anthropic: the lines are a thinking block before the answer's own blocks, and the SDK folds it all.
    held = await admission.acquire(live.hub, b)
    asyncio.get_running_loop().call_later(2.5, lambda: admission.release(live.hub, b, reserved=held))
    async with claude(live.url).messages.stream(model="a", max_tokens=3, messages=HELLO) as stream:
        final = await stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert "waiting for a place in group 'g' to run a (position 1)" in final.content[0].thinking
    assert final.usage.output_tokens == 3 and final.stop_reason == "max_tokens"


async def test_a_refusal_after_the_stream_opened_is_an_error_event(
    start, hub_config, tiny_llama: Path, tmp_path: Path
) -> None:
    live = await start(
        hub_config(pair(tiny_llama, tmp_path, queue_timeout=2.5), groups=[{"name": "g", "max_loaded": 1}])
    )
    a = live.hub.slots["a"]
    await oai(live.url).chat.completions.create(**chat("a"))
    held = await admission.acquire(live.hub, a)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            plain = await http.post(f"{live.url}/v1/chat/completions", json=chat("b"))
            openai_stream = await http.post(f"{live.url}/v1/chat/completions", json=chat("b", stream=True))
            anthropic = await http.post(f"{port_url(live, 'b')}/v1/messages", json=chat("b", stream=True))
            responses_body = {"model": "b", "input": "Hello", "max_output_tokens": 3, "stream": True}
            responses = await http.post(f"{live.url}/v1/responses", json=responses_body)
        with pytest.raises(openai.APIError):  # the SDK raises on the error event
            async for _ in await oai(live.url).chat.completions.create(**chat("b"), stream=True):
                pass
    finally:
        admission.release(live.hub, a, reserved=held)
    assert plain.status_code == 429  # not streaming: unchanged
    error = plain.json()
    assert openai_stream.status_code == 200 and openai_stream.text.startswith(": queued 1\n\n")
    assert openai_stream.text.count(": queued 1") >= 2  # one a second while it waited 2.5 s
    event = [line for line in openai_stream.text.splitlines() if line.startswith("data: {")]
    assert json.loads(event[0][6:])["error"]["code"] == error["error"]["code"]
    assert openai_stream.text.rstrip().endswith("data: [DONE]")
    assert anthropic.status_code == 200 and "event: error" in anthropic.text
    body = json.loads(anthropic.text.split("event: error\ndata: ")[1].split("\n")[0])
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert responses.status_code == 200 and "event: error" in responses.text
    late = json.loads(responses.text.split("event: error\ndata: ")[1].split("\n")[0])
    assert late["error"]["code"] == error["error"]["code"]
