"""A model sharded over an MLX distributed group: two local ranks over loopback (ring backend).

Real rank processes (mlx-lm's distributed server under ``engine/sharded/rank.py``),
real collectives, the real hub in front. Each test launches its own group, so a
fault in one cannot leak into another.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_hub.config import ConfigError, load_config
from mlx_hub.engine.sharded.rank import FAULT_ENV

from .helpers import meta

pytestmark = pytest.mark.timeout(420)

LOCAL_PAIR = {"hosts": ["127.0.0.1", "127.0.0.1"]}
CHAT = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def llama(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / "sharded-llama", arch="llama", seed=4)  # greedy text that is not one token


@pytest.fixture(scope="module")
def qwen2(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / "sharded-qwen2", arch="qwen2", seed=3)  # saved without an index file


def _entries(path: Path, **distributed: Any) -> list[dict[str, Any]]:
    return [
        {"name": "plain", "model_path": str(path), "jit_enabled": True},
        {
            "name": "sharded",
            "model_path": str(path),
            "jit_enabled": True,
            "distributed": {**LOCAL_PAIR, **distributed},
        },
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


async def _chat(client: httpx.AsyncClient, url: str, model: str, stream: bool = False) -> str:
    body = {"model": model, "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": stream}
    if not stream:
        answer = await client.post(url + "/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["message"]["content"]
    text = ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices") or []:
                    text += choice.get("delta", {}).get("content") or ""
    return text


async def _messages(client: httpx.AsyncClient, url: str, model: str) -> str:
    body = {"model": model, "messages": CHAT, "max_tokens": 12, "temperature": 0}
    answer = await client.post(url + "/v1/messages", json=body)
    assert answer.status_code == 200, answer.text
    return "".join(block.get("text", "") for block in answer.json()["content"])


def test_options_that_cannot_work_sharded_are_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(
        "models:\n"
        "  - name: big\n    model_path: /m\n    draft_model_path: /d\n    lora_paths: [/a]\n"
        "    distributed: {hosts: [a, b]}\n"
        "  - name: emb\n    model_path: /m\n    model_type: embeddings\n    distributed: {hosts: [a, b]}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    text = str(caught.value)
    assert "model 'big' (models[0]): field 'draft_model_path': cannot be used with distributed" in text
    assert "model 'big' (models[0]): field 'lora_paths': cannot be used with distributed" in text
    assert "model 'emb' (models[1]): field 'model_type'" in text
    config.write_text(
        "models:\n  - name: big\n    model_path: /m\n    distributed: {hosts: [a, b], hostfile: /x}\n"
    )
    with pytest.raises(ConfigError, match=r"field 'distributed.hostfile'.*does not exist"):
        load_config(config)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_a_sharded_model_answers_as_the_same_model_unsharded(
    arch: str, request: pytest.FixtureRequest, hub_config: Any, start: Any
) -> None:
    """llama splits tensor-parallel, qwen2 (saved without an index) pipeline-parallel; greedy answers match."""
    path = request.getfixturevalue(arch)
    parallel = "tensor" if arch == "llama" else "pipeline"
    live = await start(hub_config(_entries(path, parallel=parallel), prompt_cache_disk_size=0))
    async with httpx.AsyncClient(timeout=300) as client:
        plain = await _chat(client, live.url, "plain")
        assert await _chat(client, live.url, "sharded") == plain
        assert await _chat(client, live.url, "sharded", stream=True) == plain
        port = f"http://127.0.0.1:{live.hub.slots['sharded'].port}"
        assert await _chat(client, port, "sharded") == plain  # its own port as well as /v1
        await live.hub.unload("plain")  # a fresh prompt cache: Messages compared cold on both
        assert await _messages(client, live.url, "sharded") == await _messages(client, live.url, "plain")
        listed = (await client.get(live.url + "/v1/models")).json()
        assert "sharded" in {m["id"] for m in listed["data"]}
        metrics = (await client.get(live.url + "/metrics")).text
        assert 'mlx_hub_rank_memory_bytes{host="127.0.0.1",model="sharded",rank="1"}' in metrics
    ranks = meta(live.hub, "sharded")["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["state"] == "loaded" for r in ranks)
    assert all(r["memory_bytes"] > 0 and _alive(r["pid"]) for r in ranks)
    assert live.hub.slots["sharded"].handler.parallel == parallel
    await live.hub.stop_model("sharded")
    assert not any(_alive(r["pid"]) for r in ranks), "a rank outlived stop-model"
    assert meta(live.hub, "sharded")["ranks"] == []


async def _wait_failed(live: Any, name: str, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        row = meta(live.hub, name)
        if row["memory_state"] == "failed":
            return row
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} did not fail within {seconds} s: {meta(live.hub, name)}")


async def test_a_killed_rank_fails_the_model_by_name_and_the_next_request_relaunches(
    llama: Path, hub_config: Any, start: Any
) -> None:
    live = await start(hub_config(_entries(llama)[1:], prompt_cache_disk_size=0))
    async with httpx.AsyncClient(timeout=300) as client:
        first = await _chat(client, live.url, "sharded")
        assert meta(live.hub, "sharded")["memory_bytes"] > 0  # the ranks on this machine count here
        ranks = meta(live.hub, "sharded")["ranks"]
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        row = await _wait_failed(live, "sharded", 30)
        assert "rank 1 on 127.0.0.1" in row["memory_last_error"] and "exited" in row["memory_last_error"]
        assert not any(_alive(r["pid"]) for r in ranks), "rank 0 was left running"
        assert await _chat(client, live.url, "sharded") == first  # the next request launches it again
        again = meta(live.hub, "sharded")["ranks"]
    assert {r["pid"] for r in again}.isdisjoint(r["pid"] for r in ranks)
    await live.hub.shutdown()
    assert not any(_alive(r["pid"]) for r in again), "a rank outlived shutdown"


async def test_a_stopped_rank_fails_the_group_with_its_name(
    llama: Path, hub_config: Any, start: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1's serving loop stops inside the loop (its reports go on): only the step count shows the stall,
    and the request in flight ends with an error that says so instead of hanging."""
    monkeypatch.setenv(FAULT_ENV, "1:stall-on-request")
    live = await start(hub_config(_entries(llama, stall_seconds=4)[1:], prompt_cache_disk_size=0))
    async with httpx.AsyncClient(timeout=120) as client:
        body = {"model": "sharded", "messages": CHAT, "max_tokens": 12, "temperature": 0}
        answer = await client.post(live.url + "/v1/chat/completions", json=body)
    assert answer.status_code >= 500, answer.text
    assert "no progress" in answer.text and "rank" in answer.text
    row = await _wait_failed(live, "sharded", 30)
    assert "no progress for 4 s" in row["memory_last_error"]
