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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_hub.config import ConfigError, load_config
from mlx_hub.engine.sharded.group import SSH_ENV
from mlx_hub.engine.sharded.rank import FAULT_ENV

from .helpers import checkout_env, meta

pytestmark = pytest.mark.timeout(420)

LOCAL_PAIR = {"hosts": ["127.0.0.1", "127.0.0.1"]}
CHAT = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def llama(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / "sharded-llama", arch="llama", seed=4)  # greedy text that is not one token


#: A tool call the qwen2 model holds as one token, so a logit_bias makes it "say" the call.
CALL = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
#: A template that names ``<tool_call>`` and ``tool_call.name``: mlx-lm infers its JSON tool parser from it.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for tool_call in message.tool_calls or [] %}<tool_call>{{ tool_call.name }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def qwen2(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_model

    # saved without an index file; CALL is one token of its vocabulary
    return make_model(models_dir / "sharded-qwen2", arch="qwen2", seed=3, phrases=(CALL,))


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
    config.write_text(
        "models:\n  - name: big\n    model_path: /m\n    context_length: 4096\n    max_concurrency: 2\n"
        "    distributed: {hosts: [a, b]}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "field 'context_length'" in str(caught.value) and "batch_completion_size" in str(caught.value)


def test_a_sharded_request_gets_the_entrys_sampling_defaults_and_names_the_loaded_model() -> None:
    from mlx_hub.config import ModelConfig
    from mlx_hub.web.rank_proxy import for_rank, unserved

    entry = ModelConfig(name="m", model_path="/m", default_seed=7, default_repetition_penalty=1.1)
    body = json.loads(for_rank({"model": "m", "seed": 3, "messages": []}, entry))
    assert body == {"model": "default_model", "seed": 3, "repetition_penalty": 1.1, "messages": []}
    assert unserved({"response_format": {"type": "text"}}) is None
    assert unserved({"response_format": {"type": "json_object"}})[0] == "response_format"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_a_sharded_model_answers_as_the_same_model_unsharded(
    arch: str, request: pytest.FixtureRequest, hub_config: Any, start: Any
) -> None:
    """llama splits tensor-parallel, qwen2 (saved without an index) pipeline-parallel; greedy answers match."""
    path = request.getfixturevalue(arch)
    parallel = "tensor" if arch == "llama" else "pipeline"
    entries = _entries(path, parallel=parallel)
    entries[1]["aliases"] = ["big-model"]
    if arch == "qwen2":  # an entry's chat_template_file reaches every rank
        template = path.parent / "sharded-tools.jinja"
        template.write_text(TOOLS_TEMPLATE)
        for one in entries:
            one["chat_template_file"] = str(template)
    live = await start(hub_config(entries, prompt_cache_disk_size=0, api_keys=["sk-test"]))
    async with httpx.AsyncClient(timeout=300, headers={"Authorization": "Bearer sk-test"}) as client:
        lacking = await client.post(live.url + "/v1/embeddings", json={"model": "sharded", "input": "x"})
        assert lacking.status_code == 404 and "distributed group" in lacking.json()["error"]["message"]
        assert meta(live.hub, "sharded")["memory_state"] == "unloaded"  # refused before any rank started
        plain = await _chat(client, live.url, "plain")
        assert await _chat(client, live.url, "big-model") == plain  # an alias, through /v1
        refused = await httpx.AsyncClient().post(live.url + "/v1/chat/completions", json={"model": "sharded"})
        assert refused.status_code == 401  # keys hold for a sharded entry as for any
        prompt = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        texts = [
            (await client.post(live.url + "/v1/completions", json={**prompt, "model": m})).json()["choices"][
                0
            ]["text"]
            for m in ("plain", "sharded")
        ]
        assert texts[0] == texts[1]  # /v1/completions: the raw prompt, no template, on both
        assert await _chat(client, live.url, "sharded", stream=True) == plain
        port = f"http://127.0.0.1:{live.hub.slots['sharded'].port}"
        assert await _chat(client, port, "sharded") == plain  # its own port as well as /v1
        await live.hub.unload("plain")  # a fresh prompt cache: Messages compared cold on both
        assert await _messages(client, live.url, "sharded") == await _messages(client, live.url, "plain")
        counted = [
            (await client.post(live.url + "/v1/messages/count_tokens", json={"model": m, "messages": CHAT}))
            for m in ("plain", "sharded")
        ]
        assert counted[1].status_code == 200, counted[1].text
        assert counted[0].json()["input_tokens"] == counted[1].json()["input_tokens"] > 0  # as rank 0 renders
        listed = (await client.get(live.url + "/v1/models")).json()
        assert "sharded" in {m["id"] for m in listed["data"]}
        metrics = (await client.get(live.url + "/metrics")).text
        assert 'mlx_hub_rank_memory_bytes{host="127.0.0.1",model="sharded",rank="1"}' in metrics
        if arch == "qwen2":
            await _tools_and_response_format(client, live.url, path)
    ranks = meta(live.hub, "sharded")["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["state"] == "loaded" for r in ranks)
    assert all(r["memory_bytes"] > 0 and _alive(r["pid"]) for r in ranks)
    assert live.hub.slots["sharded"].handler.parallel == parallel
    await live.hub.stop_model("sharded")
    assert not any(_alive(r["pid"]) for r in ranks), "a rank outlived stop-model"
    assert meta(live.hub, "sharded")["ranks"] == []


async def _tools_and_response_format(client: httpx.AsyncClient, url: str, path: Path) -> None:
    """Tools reach the ranks' parser through the entry's template; a JSON schema is refused, not ignored."""
    from mlx_hub.testing.tinymodel import phrase_token

    body = {
        "model": "sharded",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
        "max_tokens": 1,
        "temperature": 0,
        "logit_bias": {str(phrase_token(path, CALL)): 100},
    }
    answer = await client.post(url + "/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    (call,) = answer.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    refused = await client.post(url + "/v1/chat/completions", json={**body, "response_format": schema})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "response_format"
    assert "distributed" in refused.json()["error"]["message"]


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
        body = {"model": "sharded", "messages": CHAT, "max_tokens": 2000, "temperature": 0, "stream": True}
        said = ""
        async with (
            asyncio.timeout(120),
            client.stream("POST", live.url + "/v1/chat/completions", json=body) as answer,
        ):
            async for line in answer.aiter_lines():  # the stream is under way: rank 1 dies
                if line.startswith("data: {") and not said:
                    said = "killed"
                    os.kill(ranks[1]["pid"], signal.SIGKILL)
                elif '"error"' in line:
                    said = line
        assert "rank 1 on 127.0.0.1" in said, said  # the request in flight names the rank that failed
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


FAKE_SSH = Path(__file__).with_name("fake_ssh.sh")


def _hostfile(tmp_path: Path, second: str) -> str:
    """Rank 0 here; rank 1 on ``second``, reached through ssh (the stand-in runs it here too)."""
    path = tmp_path / "hosts.json"
    path.write_text(
        json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": second, "ips": ["127.0.0.1"]}])
    )
    return str(path)


async def test_a_rank_on_another_host_runs_through_ssh_and_ends_with_its_model(
    llama: Path, hub_config: Any, start: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SSH_ENV, str(FAKE_SSH))
    entry = {"name": "sharded", "model_path": str(llama), "jit_enabled": True}
    entry["distributed"] = {"hostfile": _hostfile(tmp_path, "studio-2.test")}
    live = await start(hub_config([entry], prompt_cache_disk_size=0))
    async with httpx.AsyncClient(timeout=300) as client:
        assert await _chat(client, live.url, "sharded")
    ranks = meta(live.hub, "sharded")["ranks"]
    assert [(r["host"], r["local"]) for r in ranks] == [("127.0.0.1", True), ("studio-2.test", False)]
    assert ranks[1]["memory_bytes"] > 0  # reported over the ssh session's stdout
    own = live.hub.slots["sharded"].memory_bytes
    assert (
        0 < own < ranks[0]["memory_bytes"] + ranks[1]["memory_bytes"]
    )  # the budget counts this machine's rank
    await live.hub.unload("sharded")
    assert not any(_alive(r["pid"]) for r in ranks), "a rank outlived unload-model"


async def test_a_host_that_cannot_be_reached_fails_the_load_by_name(
    llama: Path, hub_config: Any, start: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SSH_ENV, str(FAKE_SSH))
    monkeypatch.setenv("FAKE_SSH_DOWN", "studio-2.test")
    entry = {"name": "sharded", "model_path": str(llama), "jit_enabled": True}
    entry["distributed"] = {"hostfile": _hostfile(tmp_path, "studio-2.test")}
    other = {"name": "plain", "model_path": str(llama), "jit_enabled": True}
    live = await start(hub_config([entry, other], prompt_cache_disk_size=0))
    async with httpx.AsyncClient(timeout=300) as client:
        body = {"model": "sharded", "messages": CHAT, "max_tokens": 4}
        answer = await client.post(live.url + "/v1/chat/completions", json=body)
        assert answer.status_code >= 500
        assert "rank 1 on studio-2.test" in answer.text and "Connection refused" in answer.text
        assert await _chat(client, live.url, "plain")  # the other models keep serving
    assert meta(live.hub, "sharded")["memory_state"] == "failed"


def test_no_rank_outlives_a_hub_that_is_killed(llama: Path, hub_config: Any, tmp_path: Path) -> None:
    """A crash of the hub (SIGKILL: no shutdown runs) leaves no rank behind: each follows its hub."""
    doc = hub_config([{"name": "sharded", "model_path": str(llama), "distributed": LOCAL_PAIR}])
    doc["prompt_cache_disk_size"] = 0
    script = tmp_path / "hub.py"
    script.write_text(
        "import asyncio, json\n"
        "from mlx_hub import Hub\n"
        "from mlx_hub.core.slot_status import ranks\n"
        f"DOC = {doc!r}\n"
        "async def main():\n"
        "    async with Hub.from_config(DOC) as hub:\n"
        "        await hub.load('sharded')\n"
        "        pids = [r['pid'] for r in ranks(hub.slots['sharded'])]\n"
        "        print('RANKS', json.dumps(pids), flush=True)\n"
        "        await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    env = checkout_env()
    hub = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        assert hub.stdout is not None
        while not line.startswith("RANKS"):
            line = hub.stdout.readline()
            assert line or hub.poll() is None, "the hub ended before its ranks loaded"
        pids = json.loads(line.split(" ", 1)[1])
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        hub.kill()
        hub.wait(30)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a rank outlived its hub"


async def test_rank_0_refusing_a_translated_request_is_a_refusal_with_its_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A non-200 from rank 0 under Anthropic Messages becomes a RequestError carrying that status and text."""
    from types import SimpleNamespace

    from mlx_hub.web import rank_proxy
    from mlx_hub.web import translate as tr

    async def refusing(slot: Any, path: str, body: bytes) -> tuple[Any, Any, httpx.Response]:
        return None, httpx.AsyncClient(), httpx.Response(422, content=b"logit_bias must be a dict")

    monkeypatch.setattr(rank_proxy, "_upstream", refusing)
    slot = SimpleNamespace(entry=SimpleNamespace(**dict.fromkeys(rank_proxy.BODY_DEFAULTS)))
    with pytest.raises(tr.RequestError) as caught:
        async for _ in rank_proxy._chat_chunks(slot, {"messages": CHAT}):  # type: ignore[arg-type]
            pass
    assert caught.value.status == 422 and "logit_bias must be a dict" in caught.value.message
