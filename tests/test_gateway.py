"""One /v1 for every model, the memory budget, keep_alive, /metrics and API keys."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlx_hub.core import admission

from .helpers import LiveController, hello, meta, request_room, text_only
from .test_hub import eventually, lm

Start = Callable[..., Any]


def gateway(live: LiveController, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)


async def ask(client: openai.AsyncOpenAI, model: str, **extra: Any) -> Any:
    return await client.chat.completions.create(**hello(model, 5, **extra))


async def test_routes_by_name_and_by_path(
    start: Start, hub_config, tiny_llama: Path, tiny_qwen: Path
) -> None:
    live = await start(
        hub_config(
            [
                lm("llama", tiny_llama, default=True, served_model_name="Llama-Tiny"),
                lm("qwen", tiny_qwen, default=True, jit_enabled=True),
            ]
        )
    )
    client = gateway(live)
    reply = await ask(client, "llama", **text_only(tiny_llama))
    assert reply.choices[0].message.content and reply.model == "llama"
    reply = await ask(client, "Llama-Tiny", **text_only(tiny_llama))  # by served_model_name
    assert reply.model == "Llama-Tiny"
    async with httpx.AsyncClient(base_url=live.url) as http:
        lost = await http.post("/v1/no/such/route", json={"model": "llama"})
    assert lost.status_code == 404 and lost.json()["error"]["type"] == "invalid_request_error"
    assert meta(live.hub, "qwen")["memory_state"] == "unloaded"
    reply = await ask(client, str(tiny_qwen), **text_only(tiny_qwen))  # by model_path
    assert reply.choices[0].message.content
    assert meta(live.hub, "qwen")["memory_state"] == "loaded"  # JIT load through the controller
    listed = await client.models.list()
    assert [m.id for m in listed.data] == ["llama", "qwen"]
    assert {m.id: m.model_extra["memory_state"] for m in listed.data} == {"llama": "loaded", "qwen": "loaded"}
    with pytest.raises(openai.NotFoundError) as info:
        await ask(client, "nope")
    message = info.value.response.json()["error"]["message"]
    assert "'nope' not found" in message and "llama, qwen" in message


async def test_streaming_passes_through(start: Start, hub_config, tiny_llama: Path) -> None:
    live = await start(hub_config([lm("llama", tiny_llama, default=True)]))
    stream = await ask(
        gateway(live), "llama", stream=True, stream_options={"include_usage": True}, **text_only(tiny_llama)
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and len(chunks) > 3
    assert meta(live.hub, "llama")["in_flight"] == 0


async def test_stopped_models_start_on_demand_only_when_jit(
    start: Start, hub_config, tiny_llama: Path
) -> None:
    models = [lm("jit", tiny_llama, jit_enabled=True), lm("plain", tiny_llama, default=False)]
    live = await start(hub_config(models))  # default written: only defaults start, so plain stays stopped
    assert (await ask(gateway(live), "jit")).choices
    assert meta(live.hub, "jit")["process_state"] == "running"
    with pytest.raises(openai.ConflictError) as info:
        await ask(gateway(live), "plain")
    assert "start-model plain" in info.value.response.json()["error"]["message"]


async def test_embeddings_through_the_controller(start: Start, hub_config, tiny_embedder: Path) -> None:
    model = {
        "name": "embed",
        "model_path": str(tiny_embedder),
        "model_type": "embeddings",
        "jit_enabled": True,
    }
    live = await start(hub_config([model]))
    result = await gateway(live).embeddings.create(model="embed", input=["a", "b"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 64


def sized(path: Path) -> int:
    return (path / "model.safetensors").stat().st_size


async def test_budget_evicts_lru_and_spares_pinned(
    start: Start, hub_config, tiny_llama: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    import shutil

    size = sized(tiny_llama)
    # Three folders of one size: three copies (entries of one folder would share one, test_shared_weights).
    folders = {n: shutil.copytree(tiny_llama, tmp_path / n) for n in ("a", "b", "c")}
    models = [
        lm("pinned", tiny_qwen, default=True, pinned=True, prompt_cache_size=0),
        *(lm(n, folders[n], jit_enabled=True, prompt_cache_size=0) for n in ("a", "b", "c")),
    ]
    # Three of the four models and one request's KV and prefill (it counts too, tests/test_memory.py), not four.
    room = max(request_room(p, prompt_cache_size=0) for p in (tiny_llama, tiny_qwen))
    budget = sized(tiny_qwen) + 2 * size + room + size // 4
    assert 4 * size > budget
    live = await start(hub_config(models, max_memory=budget))
    client = gateway(live)
    await ask(client, "a")
    await ask(client, "b")
    await ask(client, "a")  # b is now the least recently used
    await ask(client, "c")
    states = {n: meta(live.hub, n)["memory_state"] for n in ("pinned", "a", "b", "c")}
    assert states == {"pinned": "loaded", "a": "loaded", "b": "unloaded", "c": "loaded"}
    status = live.hub.status()
    assert status["memory"]["budget_bytes"] == budget
    assert status["memory"]["models_bytes"] <= budget * 1.1


async def test_budget_full_and_busy_answers_503(
    start: Start, hub_config, tiny_llama: Path, tmp_path: Path
) -> None:
    import shutil

    size = sized(tiny_llama)
    other = shutil.copytree(tiny_llama, tmp_path / "b")  # its own copy: one folder would share a's
    models = [
        lm("a", tiny_llama, default=True, prompt_cache_size=0),
        lm("b", other, jit_enabled=True, queue_timeout=0.3, prompt_cache_size=0),
    ]
    # One model and its request fit, two models do not.
    budget = size + request_room(other, prompt_cache_size=0) + size // 4
    assert 2 * size > budget
    live = await start(hub_config(models, max_memory=budget))
    await admission.acquire(live.hub, live.hub.slots["a"])
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await ask(gateway(live), "b")
    finally:
        admission.release(live.hub, live.hub.slots["a"])
    assert info.value.status_code == 503
    error = info.value.response.json()["error"]
    assert error["code"] == "memory_budget_exceeded" and "busy or pinned" in error["message"]
    assert (await ask(gateway(live), "b")).choices  # a is idle now: it gives way
    assert meta(live.hub, "a")["memory_state"] == "unloaded"


async def test_model_bigger_than_the_budget_fails_at_once(start: Start, hub_config, tiny_llama: Path) -> None:
    live = await start(hub_config([lm("a", tiny_llama, jit_enabled=True)], max_memory=1024))
    with pytest.raises(openai.InternalServerError) as info:
        await ask(gateway(live), "a")
    assert "more than the whole max_memory budget" in info.value.response.json()["error"]["message"]


async def test_pinned_model_is_not_evicted_from_its_group(start: Start, hub_config, tiny_llama: Path) -> None:
    models = [
        lm("p", tiny_llama, default=True, jit_enabled=True, group="g", pinned=True),
        lm("x", tiny_llama, default=True, jit_enabled=True, group="g", queue_timeout=0.3),
    ]
    live = await start(hub_config(models, groups=[{"name": "g", "max_loaded": 1}]))
    await ask(gateway(live), "p")
    with pytest.raises(openai.RateLimitError):
        await ask(gateway(live), "x")
    assert meta(live.hub, "p")["memory_state"] == "loaded"


async def test_keep_alive_zero_never_and_durations(start: Start, hub_config, tiny_llama: Path) -> None:
    models = [
        lm("zero", tiny_llama, default=True, jit_enabled=True),
        lm("never", tiny_llama, default=True, jit_enabled=True, auto_unload_minutes=0.002),
    ]
    live = await start(hub_config(models))
    client = gateway(live)
    await ask(client, "zero", extra_body={"keep_alive": 0})
    await eventually(lambda: meta(live.hub, "zero")["memory_state"] == "unloaded")
    await ask(client, "never", extra_body={"keep_alive": -1})
    assert meta(live.hub, "never")["keep_alive_seconds"] == -1
    await asyncio.sleep(0.5)  # four times its own 0.12 s timer
    assert await admission.reap_idle(live.hub) == [] and meta(live.hub, "never")["memory_state"] == "loaded"
    await ask(client, "never", extra_body={"keep_alive": "10m"})
    assert meta(live.hub, "never")["keep_alive_seconds"] == 600
    assert meta(live.hub, "never")["idle_seconds_left"] > 590
    with pytest.raises(openai.BadRequestError) as info:
        await ask(client, "never", extra_body={"keep_alive": "soon"})
    assert "keep_alive 'soon'" in info.value.response.json()["error"]["message"]


async def test_metrics_parse_and_count(start: Start, hub_config, tiny_llama: Path) -> None:
    live = await start(hub_config([lm("m", tiny_llama, default=True, jit_enabled=True)]))
    client = gateway(live)
    await ask(client, "m")
    stream = await ask(client, "m", stream=True, stream_options={"include_usage": True})
    async for _ in stream:
        pass
    with pytest.raises(openai.BadRequestError):
        await ask(client, "m", extra_body={"keep_alive": "soon"})
    await live.hub.unload("m")
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{live.url}/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    route = "/v1/chat/completions"
    assert value("mlx_hub_requests_total", model="m", route=route, status="200") == 2
    assert value("mlx_hub_requests_total", model="m", route=route, status="400") == 1
    assert value("mlx_hub_request_errors_total", model="m", route=route) == 1
    assert value("mlx_hub_loads_total", model="m") == 1
    assert value("mlx_hub_load_seconds_count", model="m") == 1
    assert value("mlx_hub_unloads_total", model="m", reason="manual") == 1
    assert value("mlx_hub_generated_tokens_total", model="m") >= 2  # both answers reported usage
    assert value("mlx_hub_model_loaded", model="m") == 0
    assert value("mlx_hub_model_port_running", model="m") == 1
    assert value("mlx_hub_model_memory_state", model="m", state="unloaded") == 1


async def test_api_keys_guard_every_port(start: Start, hub_config, tiny_llama: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLX_HUB_API_KEY", "from-env")
    live = await start(hub_config([lm("m", tiny_llama, default=True)], api_keys=["sekret"]))
    port = live.hub.slots["m"].port
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{live.url}/health")).status_code == 200
        assert (await http.get(f"{live.url}/hub/")).status_code == 200  # the page that asks for the key
        refused = await http.get(f"{live.url}/hub/status")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (await http.get(f"{live.url}/metrics")).status_code == 401
        ok = await http.get(f"{live.url}/hub/status", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        await ask(gateway(live, "wrong"), "m")
    model_port = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await ask(model_port, "m")
    assert (await ask(gateway(live, "sekret"), "m")).choices
    model_port = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0)
    assert (await ask(model_port, "m")).choices


async def test_cross_site_control_posts_are_refused(start: Start, hub_config, tiny_llama: Path) -> None:
    live = await start(hub_config([lm("m", tiny_llama, default=True)]))
    async with httpx.AsyncClient(base_url=live.url) as http:
        host = live.url.removeprefix("http://")
        evil = await http.post("/hub/models/m/stop", headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403 and evil.json()["error"]["code"] == "cross_site"
        marked = await http.post("/hub/models/m/stop", headers={"Sec-Fetch-Site": "cross-site"})
        assert marked.status_code == 403
        assert meta(live.hub, "m")["process_state"] == "running"
        same = await http.post("/hub/models/m/unload", headers={"Origin": f"http://{host}"})
        assert same.status_code == 200 and same.json()["status"] == "unloaded"
        assert (await http.post("/hub/models/m/load")).status_code == 200  # no Origin: curl, the CLI


async def test_responses_and_multipart_routes(start: Start, hub_config, tiny_llama: Path) -> None:
    live = await start(hub_config([lm("m", tiny_llama, default=True)]))
    response = await gateway(live).responses.create(model="m", input="Hello", max_output_tokens=5)
    assert response.output_text is not None
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
        # Audio uploads name the model in a form field; the router must read it there.
        files = {"file": ("a.wav", b"RIFF....WAVE", "audio/wav")}
        unknown = await http.post("/v1/audio/transcriptions", data={"model": "nope"}, files=files)
        assert unknown.status_code == 404 and "'nope' not found" in unknown.json()["error"]["message"]
        routed = await http.post("/v1/audio/transcriptions", data={"model": "m"}, files=files)
        assert routed.status_code != 404  # reached model m's upstream route (which refuses audio for an LM)
        assert (
            live.hub.metrics.requests.labels(
                "m", "/v1/audio/transcriptions", str(routed.status_code)
            )._value.get()
            == 1
        )
