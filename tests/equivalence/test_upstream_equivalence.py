"""The hub's model ports answer exactly as `mlx-openai-server launch` does, option by option.

Every test sends one request to upstream and the same request to the hub and
compares the answers, ids and clocks aside. Tests also check that the option
under test visibly took effect, so two servers that both ignored it would fail.
The tests share the servers' prompt caches, so each request goes to both sides
in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlx_hub.engine.patches import switch

from ..helpers import text_only
from ..test_model_types import image_chat
from .conftest import FLAG_CASE
from .servers import Pair, answer

pytestmark = pytest.mark.timeout(600)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def chat(served: str, cases: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A greedy chat request for case ``served``; ``extra`` adds or replaces fields (``model`` too)."""
    body = {
        "model": served,
        "messages": [{"role": "user", "content": "Hello, how are you?"}],
        "max_tokens": 12,
        "temperature": 0.0,
        **text_only(cases[served]["model_path"]),
    }
    body.update(extra)
    return body


def same(pair: Pair, served: str, path: str, body: dict[str, Any] | None = None, files: Any = None) -> Any:
    upstream, hub = pair.send(served, path, body, files)
    assert hub == upstream
    return upstream


@pytest.mark.parametrize("served", ["chat", "spec", "kvq"])
def test_chat(pair: Pair, cases: dict[str, Any], served: str) -> None:
    reply = same(pair, served, "/v1/chat/completions", chat(served, cases))
    assert reply["status"] == 200
    assert reply["body"]["choices"][0]["message"]["content"]
    assert reply["body"]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("served", ["chat", "spec", "kvq"])
def test_chat_stream_chunk_by_chunk(pair: Pair, cases: dict[str, Any], served: str) -> None:
    reply = same(pair, served, "/v1/chat/completions", chat(served, cases, stream=True))
    assert reply["type"] == "text/event-stream" and reply["body"][-1] == "[DONE]"
    assert len(reply["body"]) > 5


@pytest.mark.parametrize("stream", [False, True])
def test_responses(pair: Pair, cases: dict[str, Any], stream: bool) -> None:
    body = {"model": "chat", "input": "Hello", "max_output_tokens": 8, "temperature": 0.0, "stream": stream}
    reply = same(pair, "chat", "/v1/responses", body)
    assert reply["status"] == 200
    if stream:
        assert reply["type"] == "text/event-stream" and len(reply["body"]) > 3


def seen(pair: Pair, served: str, body: dict[str, Any]) -> Any:
    """The hub's answer to a multimodal chat, which is upstream's where upstream can answer.

    On mlx-vlm 0.4 (upstream's pins) ``launch`` cannot generate on its worker thread
    and answers "There is no Stream(cpu, 0) in current thread" (an intended difference,
    docs/migrating.md; patches ``thread_local_stream``); there the hub's answer stands alone.
    """
    upstream, hub = pair.send(served, "/v1/chat/completions", body)
    if switch.needed_here("thread_local_stream"):
        assert "There is no Stream" in json.dumps(upstream), upstream
        return hub
    assert hub == upstream
    return upstream


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("served", ["see", "see-batched"])
def test_multimodal_chat_with_an_image(pair: Pair, cases: dict[str, Any], served: str, stream: bool) -> None:
    """An image chat, served one at a time and batched (where the installed mlx-vlm can batch)."""
    if served not in cases:
        pytest.skip("the installed mlx-vlm cannot batch; upstream's batched multimodal request hangs")
    body = image_chat(served, Path(cases[served]["model_path"]), temperature=0.0, stream=stream)
    reply = seen(pair, served, body)
    assert reply["status"] == 200, reply
    if stream:
        assert reply["body"][-1] == "[DONE]" and reply["body"][-2]["usage"]["completion_tokens"] == 6
        return
    assert reply["body"]["choices"][0]["message"]["content"]
    usage = reply["body"]["usage"]
    assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] > 20  # the image's patch tokens


def test_an_empty_multimodal_answer(pair: Pair, cases: dict[str, Any]) -> None:
    """The model ends its turn at once (every token is its end of turn), served one at a time.

    Streamed, both sides answer alike. Not streamed, upstream 1.8.1 answers 500
    where the hub answers as the stream did: an intended difference (docs/migrating.md,
    patches ``vlm_last_step_usage``).
    """
    body = image_chat("mute", Path(cases["mute"]["model_path"]), temperature=0.0)
    final = seen(pair, "mute", {**body, "stream": True})["body"][-2]
    assert final["choices"][0]["finish_reason"] == "stop" and final["usage"]["completion_tokens"] == 1
    upstream, hub = pair.send("mute", "/v1/chat/completions", body)
    assert hub["status"] == 200, hub
    (choice,) = hub["body"]["choices"]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    assert hub["body"]["usage"] == final["usage"]
    if not switch.needed_here("vlm_last_step_usage"):  # a release that answers by itself
        assert hub == upstream
        return
    assert upstream["status"] == 500, upstream
    if not switch.needed_here("thread_local_stream"):  # else upstream fails before it generates
        assert "peak_memory" in upstream["body"]["detail"]["error"]["message"]


def test_embeddings(pair: Pair) -> None:
    reply = same(pair, "embed", "/v1/embeddings", {"model": "embed", "input": ["Hello", "Paris is a city"]})
    assert reply["status"] == 200 and len(reply["body"]["data"]) == 2


def transcribe(pair: Pair, speech: Path, **form: str) -> Any:
    """A greedy transcription of the test tone, sent to both sides."""
    audio = {"file": ("tone.wav", speech.read_bytes(), "audio/wav")}
    return same(
        pair, "ears", "/v1/audio/transcriptions", {"model": "ears", "temperature": "0", **form}, audio
    )


@pytest.mark.parametrize("response_format", ["json", None])
def test_transcriptions(pair: Pair, speech: Path, response_format: str | None) -> None:
    reply = transcribe(pair, speech, **({"response_format": response_format} if response_format else {}))
    assert reply["status"] == 200 and "text" in reply["body"]


@pytest.mark.parametrize("response_format", ["text", "srt", "vtt", "verbose_json"])
def test_transcription_formats_differ_on_purpose(pair: Pair, speech: Path, response_format: str) -> None:
    """An intended difference (docs/migrating.md): upstream 1.8.1 answers ``text`` with the JSON object and
    refuses the other three with 422; the hub answers each as OpenAI does (tests/test_transcripts.py)."""
    audio = {"file": ("tone.wav", speech.read_bytes(), "audio/wav")}
    form = {"model": "ears", "temperature": "0", "response_format": response_format}
    upstream, hub = pair.send("ears", "/v1/audio/transcriptions", form, audio)
    whole = transcribe(pair, speech)["body"]["text"]
    assert upstream["status"] == (200 if response_format == "text" else 422), upstream
    assert hub["status"] == 200, hub
    if response_format == "text":
        assert upstream["body"]["text"] == whole and hub["body"] == whole.strip()
    elif response_format == "verbose_json":
        assert hub["body"]["text"] == whole.strip() and hub["body"]["task"] == "transcribe"
    else:
        assert hub["type"] == "text/plain"


def test_transcription_stream(pair: Pair, speech: Path) -> None:
    reply = transcribe(pair, speech, stream="true")
    assert reply["status"] == 200 and reply["body"][-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_tools_and_reasoning_parsers_with_a_template_file(
    pair: Pair, cases: dict[str, Any], stream: bool
) -> None:
    body = chat("tools", cases, tools=[WEATHER_TOOL], tool_choice="auto", stream=stream)
    with_tools = same(pair, "tools", "/v1/chat/completions", body)
    assert with_tools["status"] == 200
    if not stream:
        # qwen3_moe's parser opens the reply with <think> (its prompt opened one);
        # a random model never closes it, so upstream hands it back as content.
        message = with_tools["body"]["choices"][0]["message"]
        assert message["content"].startswith("<think>"), message
        plain = same(pair, "tools", "/v1/chat/completions", chat("tools", cases))
        # The template file renders the tools into the prompt.
        assert with_tools["body"]["usage"]["prompt_tokens"] > plain["body"]["usage"]["prompt_tokens"] + 20


@pytest.mark.parametrize("stream", [False, True])
def test_a_harmony_tool_call_through_gpt_oss_parsers(pair: Pair, stream: bool) -> None:
    """gpt-oss's template and Harmony parsers turn its channel text into the same tool call on both."""
    body = {
        "model": "harmony",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "max_tokens": 16,
        "temperature": 0.0,
        "stream": stream,
    }
    reply = same(pair, "harmony", "/v1/chat/completions", body)
    assert reply["status"] == 200
    if stream:
        calls = [
            call
            for chunk in reply["body"]
            if isinstance(chunk, dict)
            for choice in chunk["choices"]
            for call in choice["delta"].get("tool_calls") or []
        ]
        assert calls and calls[0]["function"]["name"] == "get_weather"
        arguments = "".join(c["function"].get("arguments") or "" for c in calls)
    else:
        choice = reply["body"]["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        arguments = call["function"]["arguments"]
    assert json.loads(arguments) == {"city": "Paris"}


def test_tool_call_history_round_trip(pair: Pair, cases: dict[str, Any]) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    reply = same(
        pair, "tools", "/v1/chat/completions", chat("tools", cases, messages=messages, tools=[WEATHER_TOOL])
    )
    assert reply["status"] == 200


def test_sampling_defaults_fill_what_a_request_leaves_out(pair: Pair, cases: dict[str, Any]) -> None:
    body = {
        "model": FLAG_CASE,
        "messages": [{"role": "user", "content": "Hello"}],
        **text_only(cases[FLAG_CASE]["model_path"]),
    }
    reply = same(pair, FLAG_CASE, "/v1/chat/completions", body)
    assert reply["body"]["usage"]["completion_tokens"] == 5  # default_max_tokens (--max-tokens 5)
    again = same(pair, FLAG_CASE, "/v1/chat/completions", body)
    assert again["body"]["choices"] == reply["body"]["choices"]  # default_temperature 0: greedy


def test_prompt_cache_size_one_keeps_only_the_last_prompt(pair: Pair, cases: dict[str, Any]) -> None:
    first = chat(FLAG_CASE, cases, messages=[{"role": "user", "content": "Paris is the capital of France."}])
    second = chat(FLAG_CASE, cases, messages=[{"role": "user", "content": "0123456789 + - * / ="}])
    cached: dict[str, list[int]] = {"upstream": [], "hub": []}
    for body in (first, second, first):
        replies = {}
        for side, base in (("upstream", pair.upstream[FLAG_CASE]), ("hub", pair.hub[FLAG_CASE])):
            replies[side] = pair.client.post(base + "/v1/chat/completions", json=body)
            cached[side].append(replies[side].json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert answer(replies["hub"]) == answer(replies["upstream"])  # cached_tokens aside (REUSE)
    # The third request repeats the first, which the second evicted on both sides:
    # prompt_cache_size 1 bounds the hub's cache as it bounds upstream's.
    assert cached["hub"][2] < 10 and cached["upstream"][2] < 10, cached


def test_seeded_requests_without_batching_repeat(pair: Pair, cases: dict[str, Any]) -> None:
    body = chat("seeded", cases, temperature=0.9, seed=42, max_tokens=16)
    first = same(pair, "seeded", "/v1/chat/completions", body)
    second = same(pair, "seeded", "/v1/chat/completions", body)
    assert first["body"]["choices"] == second["body"]["choices"]
    other = same(pair, "seeded", "/v1/chat/completions", {**body, "seed": 43})
    assert other["body"]["choices"] != first["body"]["choices"]  # the seed is honoured, not ignored


def test_errors(pair: Pair, cases: dict[str, Any]) -> None:
    missing = same(pair, FLAG_CASE, "/v1/chat/completions", {"model": FLAG_CASE})
    assert missing["status"] == 422
    wrong = same(pair, FLAG_CASE, "/v1/chat/completions", chat(FLAG_CASE, cases, model="elsewhere"))
    assert wrong["status"] == 404 and wrong["body"]["detail"]["error"]["type"] == "model_not_found"
    # Intended difference (docs/migrating.md): upstream names its subprocess proxy's class, the hub the handler's.
    upstream, hub = pair.send("embed", "/v1/chat/completions", chat("chat", cases, model="embed"))
    message = upstream["body"]["error"]["message"].replace("HandlerProcessProxy", "MLXEmbeddingsHandler")
    upstream["body"]["error"]["message"] = message
    assert hub == upstream and hub["status"] == 400
    unknown = same(pair, FLAG_CASE, "/v1/nothing-here", {"model": FLAG_CASE})
    assert unknown["status"] == 404


def test_omitted_model_resolves_as_upstream(pair: Pair, cases: dict[str, Any]) -> None:
    body = chat(FLAG_CASE, cases)
    del body["model"]
    reply = same(pair, FLAG_CASE, "/v1/chat/completions", body)
    assert reply["body"]["model"] == FLAG_CASE
    responses = same(pair, FLAG_CASE, "/v1/responses", {"input": "Hello", "max_output_tokens": 4})
    assert responses["status"] == 200


def test_health_and_models_keep_upstreams_fields(pair: Pair) -> None:
    upstream, hub = pair.send(FLAG_CASE, "/health")
    assert hub["status"] == upstream["status"] == 200
    assert {k: hub["body"][k] for k in ("status", "model_id")} == {
        k: upstream["body"][k] for k in ("status", "model_id")
    }
    assert (
        hub["body"]["model_status"] == "loaded"
    )  # the reference hub's word; upstream says "initialized (1 model(s))"
    upstream, hub = pair.send(FLAG_CASE, "/v1/models")
    (up_card,), (hub_card,) = upstream["body"]["data"], hub["body"]["data"]
    assert {k: hub_card[k] for k in up_card} == up_card  # every upstream field, same value
    assert hub_card["hub_name"] == f"hub-{FLAG_CASE}" and hub_card["memory_state"] == "loaded"


def test_the_hub_port_also_answers_to_the_entry_name_and_path(pair: Pair, cases: dict[str, Any]) -> None:
    """An intended difference: upstream accepts only the served name."""
    import httpx

    for name in (f"hub-{FLAG_CASE}", cases[FLAG_CASE]["model_path"]):
        reply = httpx.post(
            f"{pair.hub[FLAG_CASE]}/v1/chat/completions", json=chat(FLAG_CASE, cases, model=name), timeout=60
        )
        assert reply.status_code == 200 and reply.json()["model"] == name
