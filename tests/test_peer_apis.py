"""Anthropic Messages and /v1/completions through real clients, on real ports, with generated models.

Random weights say random things, so a test that needs a tool call or a
reasoning block makes a model whose tokenizer holds that exact text as one
token (``make_model(phrases=...)``) and biases the sampler toward it: the
model then "says" the tool call, and upstream's own parsers find it.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlx_hub.testing.tinymodel import phrase_token, text_only_logit_bias

from .equivalence.conftest import TOOLS_TEMPLATE
from .helpers import LiveController, meta
from .test_hub import eventually, lm

CALL = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
THINK = "<think>sunny</think>"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
#: What tiny models' template renders for one user turn "Hello" (tinymodel.CHAT_TEMPLATE).
HELLO_RENDERED = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"

Start = Callable[..., Any]


@pytest.fixture(scope="session")
def phrase_model(models_dir: Path) -> Path:
    from mlx_hub.testing.tinymodel import make_model

    return make_model(models_dir / "tiny-phrases", arch="qwen2", seed=14, phrases=(CALL, THINK))  # says words


@pytest.fixture(scope="session")
def tools_template(models_dir: Path) -> Path:
    path = models_dir / "peer-tools.jinja"
    path.write_text(TOOLS_TEMPLATE)
    return path


def port_url(live: LiveController, name: str) -> str:
    return f"http://127.0.0.1:{live.hub.slots[name].port}"


_CLIENTS: list[Any] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Close each test's SDK clients in its own loop (an unclosed one complains after the loop ends)."""
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


def claude(url: str, key: str = "unused") -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0)
    _CLIENTS.append(client)
    return client


def oai(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    """An OpenAI client for ``url`` (a port or the controller), at its ``/v1``."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    _CLIENTS.append(client)
    return client


def greedy(path: Path, **extra: Any) -> dict[str, Any]:
    """Sampling fields through ``extra_body``: SDK releases differ in which they name as arguments."""
    return {"extra_body": {"temperature": 0, "logit_bias": text_only_logit_bias(path), **extra}}


def forced(path: Path, phrase: str) -> dict[str, Any]:
    return {"extra_body": {"temperature": 0, "logit_bias": {str(phrase_token(path, phrase)): 100}}}


HELLO = [{"role": "user", "content": "Hello"}]


def prompt_of(usage: Any) -> int:
    """The whole prompt's tokens: Anthropic reports the part the prompt cache served apart."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def a_stop_inside(text: str) -> str:
    """Two characters of ``text`` whose first occurrence is not at its start (so text precedes it)."""
    for at in range(1, len(text) - 1):
        if text.index(text[at : at + 2]) > 0:
            return text[at : at + 2]
    raise AssertionError(f"no stop sequence to pick in {text!r}")


async def test_chat_messages_and_completions_answer_the_same(
    start: Start, hub_config, phrase_model: Path
) -> None:
    live = await start(hub_config([lm("m", phrase_model, default=True)]))
    bias = text_only_logit_bias(phrase_model)
    chat = oai(port_url(live, "m"))
    said = await chat.chat.completions.create(
        model="m", messages=HELLO, max_tokens=6, temperature=0, logit_bias=bias
    )
    expected = said.choices[0].message.content
    assert expected

    for url in (port_url(live, "m"), live.url):  # the model's own port, then the controller's /v1
        message = await claude(url).messages.create(
            model="m", max_tokens=6, messages=HELLO, **greedy(phrase_model)
        )
        assert [block.type for block in message.content] == ["text"]
        assert message.content[0].text == expected
        assert message.stop_reason == "max_tokens" and message.model == "m"
        assert message.usage.output_tokens == 6
        # Anthropic counts what the prompt cache served apart; together they are the prompt.
        assert prompt_of(message.usage) == said.usage.prompt_tokens
        counted = await claude(url).messages.count_tokens(model="m", messages=HELLO)
        assert counted.input_tokens == said.usage.prompt_tokens  # the model's own template and tokenizer

        # The same rendered prompt, sent as written, gives the same text.
        plain = oai(url)
        completion = await plain.completions.create(
            model="m", prompt=HELLO_RENDERED, max_tokens=6, temperature=0, extra_body={"logit_bias": bias}
        )
        assert completion.choices[0].text == expected
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.prompt_tokens == said.usage.prompt_tokens
        assert completion.usage.completion_tokens == 6

    def sync_call() -> str:
        with anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0) as client:
            reply = client.messages.create(model="m", max_tokens=6, messages=HELLO, **greedy(phrase_model))
        return reply.content[0].text

    assert await asyncio.to_thread(sync_call) == expected  # the sync client, off the hub's loop


async def test_messages_stream_sends_anthropics_event_sequence(
    start: Start, hub_config, phrase_model: Path
) -> None:
    live = await start(hub_config([lm("m", phrase_model, default=True)]))
    client = claude(live.url)
    whole = await client.messages.create(model="m", max_tokens=5, messages=HELLO, **greedy(phrase_model))
    kinds: list[str] = []
    async with client.messages.stream(
        model="m", max_tokens=5, messages=HELLO, **greedy(phrase_model)
    ) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert "message_delta" in kinds and kinds.count("text") >= 1
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 5 and prompt_of(final.usage) == prompt_of(whole.usage)

    # The raw wire: event names, a ping, text deltas, and Anthropic's framing.
    body = {
        "model": "m",
        "max_tokens": 3,
        "messages": HELLO,
        "stream": True,
        **greedy(phrase_model)["extra_body"],
    }
    async with httpx.AsyncClient() as http:
        wire = (await http.post(f"{live.url}/v1/messages", json=body)).text
    names = [line[len("event: ") :] for line in wire.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert '"type": "text_delta"' in wire

    # stop_sequences: cut where the text says it, with the reason and the sequence.
    text = whole.content[0].text
    stop = a_stop_inside(text)
    cut = await client.messages.create(
        model="m", max_tokens=5, messages=HELLO, stop_sequences=[stop], **greedy(phrase_model)
    )
    assert cut.content[0].text == text[: text.index(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    # Generation ends at the stop (tests/test_stops.py), so at most the 5 tokens are counted.
    assert 1 <= cut.usage.output_tokens <= 5 and prompt_of(cut.usage) == prompt_of(whole.usage)
    async with client.messages.stream(
        model="m", max_tokens=5, messages=HELLO, stop_sequences=[stop], **greedy(phrase_model)
    ) as stream:
        streamed = "".join([t async for t in stream.text_stream])
        assert (await stream.get_final_message()).stop_reason == "stop_sequence"
    assert streamed == text[: text.index(stop)]


async def test_tool_round_trip_and_thinking_through_the_entrys_parsers(
    start: Start, hub_config, phrase_model: Path, tools_template: Path
) -> None:
    entry = lm(
        "tools",
        phrase_model,
        default=True,
        tool_call_parser="hermes",
        reasoning_parser="qwen3",
        enable_auto_tool_choice=True,
        chat_template_file=str(tools_template),
    )
    live = await start(hub_config([entry]))
    client = claude(port_url(live, "tools"))
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    called = await client.messages.create(
        model="tools", max_tokens=1, messages=ask, tools=[WEATHER], **forced(phrase_model, CALL)
    )
    assert called.stop_reason == "tool_use"
    (use,) = called.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}

    partial: list[str] = []
    async with client.messages.stream(
        model="tools",
        max_tokens=1,
        messages=ask,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        **forced(phrase_model, CALL),
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial.append(event.delta.partial_json)
        streamed = await stream.get_final_message()
    assert "".join(partial) and streamed.content[0].input == {"city": "Paris"}
    assert streamed.stop_reason == "tool_use"

    # The round trip: the tool's answer goes back, and the model answers in text.
    history = [
        *ask,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in called.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}],
        },
    ]
    answer = await client.messages.create(
        model="tools", max_tokens=4, messages=history, tools=[WEATHER], **greedy(phrase_model)
    )
    assert answer.stop_reason == "max_tokens" and answer.content[0].type == "text" and answer.content[0].text
    # The template renders the tools, the call and the result into the prompt.
    bare = await client.messages.count_tokens(model="tools", messages=ask)
    with_tools = await client.messages.count_tokens(model="tools", messages=ask, tools=[WEATHER])
    assert with_tools.input_tokens > bare.input_tokens + 20
    assert prompt_of(answer.usage) > with_tools.input_tokens + 10

    thought = await client.messages.create(
        model="tools", max_tokens=1, messages=ask, **forced(phrase_model, THINK)
    )
    assert [(b.type, getattr(b, "thinking", None)) for b in thought.content] == [("thinking", "sunny")]
    async with client.messages.stream(
        model="tools", max_tokens=1, messages=ask, **forced(phrase_model, THINK)
    ) as stream:
        deltas = [e.delta.type async for e in stream if e.type == "content_block_delta"]
    assert deltas == ["thinking_delta"]


def _png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (30, 200, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_an_image_block_on_the_multimodal_model(start: Start, hub_config, tiny_vlm: Path) -> None:
    entry = {"name": "see", "model_path": str(tiny_vlm), "model_type": "multimodal", "default": True}
    live = await start(hub_config([entry]))
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _png()}}
    content = [{"type": "text", "text": "What is in the picture?"}, image]
    client = claude(port_url(live, "see"))
    reply = await client.messages.create(
        model="see", max_tokens=4, messages=[{"role": "user", "content": content}], **greedy(tiny_vlm)
    )
    assert reply.content[0].type == "text" and reply.content[0].text
    assert reply.usage.output_tokens == 4
    text_only = await client.messages.count_tokens(
        model="see", messages=[{"role": "user", "content": content[:1]}]
    )
    assert prompt_of(reply.usage) > text_only.input_tokens  # the image's tokens are in the prompt
    counted = await client.messages.count_tokens(model="see", messages=[{"role": "user", "content": content}])
    assert counted.input_tokens == prompt_of(reply.usage)
    through = await claude(live.url).messages.create(
        model="see", max_tokens=4, messages=[{"role": "user", "content": content}], **greedy(tiny_vlm)
    )
    assert through.content[0].text == reply.content[0].text
    plain = oai(port_url(live, "see"))
    done = await plain.completions.create(
        model="see",
        prompt="A picture of",
        max_tokens=3,
        temperature=0,
        extra_body={"logit_bias": text_only_logit_bias(tiny_vlm)},
    )
    assert done.choices[0].text and done.usage.completion_tokens == 3
    assert done.usage.prompt_tokens < text_only.input_tokens  # as written: no template around it


async def test_completions_plain_stream_and_several_prompts(
    start: Start, hub_config, tiny_llama: Path
) -> None:
    live = await start(hub_config([lm("m", tiny_llama, default=True)]))
    client = oai(live.url)
    bias = {"logit_bias": text_only_logit_bias(tiny_llama)}
    whole = await client.completions.create(
        model="m", prompt="The hub keeps", max_tokens=5, temperature=0, extra_body=bias
    )
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.prompt_tokens > 0 and whole.usage.total_tokens == whole.usage.prompt_tokens + 5
    chunks = [
        c
        async for c in await client.completions.create(
            model="m",
            prompt="The hub keeps",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=bias,
        )
    ]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5
    both = await client.completions.create(
        model="m", prompt=["The hub keeps", "Hello world"], max_tokens=3, temperature=0, extra_body=bias
    )
    assert [c.index for c in both.choices] == [0, 1] and both.usage.completion_tokens == 6
    stop = a_stop_inside(whole.choices[0].text)
    cut = await client.completions.create(
        model="m", prompt="The hub keeps", max_tokens=5, temperature=0, stop=[stop], extra_body=bias
    )
    assert cut.choices[0].text == whole.choices[0].text[: whole.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="m", prompt="x", n=2)
    assert "n and best_of" in info.value.response.json()["error"]["message"]


async def test_the_gate_treats_messages_like_chat(
    start: Start, hub_config, tiny_llama: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    models = [
        lm("jit", tiny_llama, default=True, jit_enabled=True, group="g"),
        lm("other", tiny_qwen, default=True, jit_enabled=True, group="g"),
        lm("missing", tmp_path / "missing", default=True, jit_enabled=True),
    ]
    doc = hub_config(models, api_keys=["sekret"], groups=[{"name": "g", "max_loaded": 1}])
    live = await start(doc)
    assert meta(live.hub, "jit")["memory_state"] == "unloaded"
    client = claude(live.url, "sekret")  # the SDK sends x-api-key
    reply = await client.messages.create(
        model="jit", max_tokens=3, messages=HELLO, **greedy(tiny_llama, keep_alive=0)
    )
    assert reply.content[0].text  # loaded on demand for it ...
    await eventually(lambda: meta(live.hub, "jit")["memory_state"] == "unloaded")  # ... and keep_alive 0 held
    await client.messages.create(model="other", max_tokens=2, messages=HELLO)
    assert meta(live.hub, "other")["memory_state"] == "loaded"
    completion = await oai(port_url(live, "jit"), "sekret").completions.create(
        model="jit", prompt="Hi", max_tokens=2
    )
    assert completion.usage.completion_tokens <= 2
    # The group holds one: loading "jit" for completions made room by unloading "other".
    assert (meta(live.hub, "jit")["memory_state"], meta(live.hub, "other")["memory_state"]) == (
        "loaded",
        "unloaded",
    )

    with pytest.raises(anthropic.InternalServerError) as failed:  # a load failure, in Anthropic's envelope
        await client.messages.create(model="missing", max_tokens=2, messages=HELLO)
    assert failed.value.status_code == 503 and failed.value.body["type"] == "error"
    assert failed.value.body["error"]["type"] == "api_error"
    assert "does not exist" in failed.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as elsewhere:  # a port asked for another model
        await claude(port_url(live, "jit"), "sekret").messages.create(
            model="other", max_tokens=2, messages=HELLO
        )
    assert elsewhere.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await claude(live.url, "wrong").messages.create(model="jit", max_tokens=3, messages=HELLO)
    assert refused.value.body["type"] == "error"
    assert refused.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        await claude(port_url(live, "jit"), "wrong").messages.create(
            model="jit", max_tokens=3, messages=HELLO
        )
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await client.messages.create(model="nope", max_tokens=3, messages=HELLO)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    assert "'nope' not found" in unknown.value.body["error"]["message"]
    async with httpx.AsyncClient(headers={"x-api-key": "sekret"}) as http:
        missing = await http.post(f"{live.url}/v1/messages", json={"model": "jit", "messages": HELLO})
        assert missing.status_code == 400
        assert missing.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
        }
        bad_keep_alive = await http.post(
            f"{live.url}/v1/messages",
            json={"model": "jit", "max_tokens": 2, "messages": HELLO, "keep_alive": "soon"},
        )
        assert bad_keep_alive.status_code == 400 and bad_keep_alive.json()["type"] == "error"
        metrics = (await http.get(f"{live.url}/metrics", headers={"Authorization": "Bearer sekret"})).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("mlx_hub_requests_total", model="jit", route="/v1/messages", status="200") == 1
    assert value("mlx_hub_requests_total", model="jit", route="/v1/messages", status="400") == 2
    assert value("mlx_hub_requests_total", model="jit", route="/v1/completions", status="200") == 1
    assert value("mlx_hub_loads_total", model="jit") == 2
    assert value("mlx_hub_unloads_total", model="other", reason="group") == 1
    assert value("mlx_hub_generated_tokens_total", model="jit") >= 3  # Anthropic's output_tokens counted


async def test_litellm_anthropic_provider_reaches_the_hub(
    start: Start, hub_config, phrase_model: Path
) -> None:
    litellm = pytest.importorskip("litellm")
    live = await start(hub_config([lm("m", phrase_model, default=True)]))
    bias = text_only_logit_bias(phrase_model)
    direct = await claude(live.url).messages.create(
        model="m", max_tokens=4, messages=HELLO, **greedy(phrase_model)
    )
    reply = await litellm.acompletion(
        model="anthropic/m",
        api_base=live.url,
        api_key="unused",
        messages=HELLO,
        max_tokens=4,
        temperature=0,
        extra_body={"logit_bias": bias},
    )
    assert reply.choices[0].message.content == direct.content[0].text
    assert reply.usage.completion_tokens == 4


BAD_MESSAGES = [
    b"{not json",
    b"[1, 2]",
    b'{"max_tokens": 4, "messages": "hi"}',
    b'{"max_tokens": 4, "messages": [5]}',
    b'{"max_tokens": 4, "messages": [{"role": "user"}]}',
    b'{"max_tokens": 4, "messages": [{"role": "user", "content": [7, {"type": "text", "text": "x"}]}]}',
    b'{"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}',
    b'{"max_tokens": "4", "messages": [{"role": "user", "content": "x"}]}',
    b'{"max_tokens": 4, "system": 5, "messages": [{"role": "user", "content": "x"}]}',
    b'{"max_tokens": 4, "tools": [{"name": "f", "input_schema": 3}], "messages": [{"role": "user", "content": "x"}]}',
    b'{"max_tokens": 4, "tool_choice": "auto", "messages": [{"role": "user", "content": "x"}]}',
    b'{"max_tokens": 4, "top_k": -1, "messages": [{"role": "user", "content": "x"}]}',
]
BAD_COMPLETIONS = [
    b'{"prompt": 5}',
    b'{"prompt": "x", "max_tokens": -1}',
    b'{"prompt": "x", "stop": [1]}',
    b'{"prompt": "x", "temperature": "hot"}',
    b'{"prompt": ["x", 3]}',
]


async def test_bad_bodies_get_400_in_their_apis_envelope(start: Start, hub_config, tiny_llama: Path) -> None:
    live = await start(hub_config([lm("m", tiny_llama, default=True)]))

    def named(body: bytes) -> bytes:
        return body.replace(b"{", b'{"model": "m", ', 1)

    async with httpx.AsyncClient(headers={"content-type": "application/json"}) as http:
        for url in (port_url(live, "m"), live.url):
            for body in BAD_MESSAGES:
                for path in ("/v1/messages", "/v1/messages/count_tokens"):
                    answer = await http.post(f"{url}{path}", content=named(body))
                    unroutable = url == live.url and body in BAD_MESSAGES[:2]  # no model to route by
                    assert answer.status_code == (404 if unroutable else 400), (path, body, answer.text)
                    assert answer.json()["type"] == "error", body
                    kind = "not_found_error" if unroutable else "invalid_request_error"
                    assert answer.json()["error"]["type"] == kind
            for body in BAD_COMPLETIONS:
                answer = await http.post(f"{url}/v1/completions", content=named(body))
                assert answer.status_code == 400, (body, answer.text)
                assert answer.json()["error"]["message"], body
        assert (await http.get(f"{port_url(live, 'm')}/health")).json()["model_status"] == "loaded"


async def test_the_entrys_sampling_defaults_apply_as_for_chat(
    start: Start, hub_config, phrase_model: Path
) -> None:
    entry = lm("m", phrase_model, default=True, default_temperature=0.0, default_max_tokens=4)
    live = await start(hub_config([entry]))
    bias = text_only_logit_bias(phrase_model)
    chat = oai(live.url)
    said = await chat.chat.completions.create(model="m", messages=HELLO, logit_bias=bias)  # greedy, 4 tokens
    assert said.usage.completion_tokens == 4
    # No temperature: the entry's default (0) makes Messages as greedy as chat.
    message = await claude(live.url).messages.create(
        model="m", max_tokens=4, messages=HELLO, extra_body={"logit_bias": bias}
    )
    assert message.content[0].text == said.choices[0].message.content
    # No max_tokens: the entry's default_max_tokens, as chat had it, not OpenAI's 16.
    completion = await chat.completions.create(
        model="m", prompt=HELLO_RENDERED, extra_body={"logit_bias": bias}
    )
    assert completion.usage.completion_tokens == 4 and completion.choices[0].finish_reason == "length"
    assert completion.choices[0].text == said.choices[0].message.content


async def test_a_model_that_does_not_chat_says_so(start: Start, hub_config, tiny_embedder: Path) -> None:
    entry = {"name": "embed", "model_path": str(tiny_embedder), "model_type": "embeddings", "default": True}
    live = await start(hub_config([entry]))
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude(live.url).messages.create(model="embed", max_tokens=2, messages=HELLO)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "only lm and multimodal models chat" in info.value.body["error"]["message"]
    plain = oai(port_url(live, "embed"))
    with pytest.raises(openai.BadRequestError):
        await plain.completions.create(model="embed", prompt="x", max_tokens=2)


async def test_a_failing_template_answers_in_the_envelope(
    start: Start, hub_config, tiny_llama: Path, tmp_path: Path
) -> None:
    template = tmp_path / "broken.jinja"
    template.write_text("{{ raise_exception('this template refuses every prompt') }}")
    live = await start(hub_config([lm("m", tiny_llama, default=True, chat_template_file=str(template))]))
    async with httpx.AsyncClient() as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            answer = await http.post(
                f"{live.url}{path}", json={"model": "m", "max_tokens": 2, "messages": HELLO}
            )
            assert answer.status_code in (400, 500), answer.text
            assert answer.json()["type"] == "error"
            assert "refuses every prompt" in answer.json()["error"]["message"]
        # Completions skip the template, so they still answer.
        done = await http.post(
            f"{live.url}/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2}
        )
        assert done.status_code == 200 and done.json()["usage"]["prompt_tokens"] > 0


async def test_an_assistant_prefill_continues_like_the_raw_prompt(
    start: Start, hub_config, phrase_model: Path
) -> None:
    live = await start(hub_config([lm("m", phrase_model, default=True)]))
    prefill = [*HELLO, {"role": "assistant", "content": "keeps"}]
    message = await claude(live.url).messages.create(
        model="m", max_tokens=3, messages=prefill, **greedy(phrase_model)
    )
    counted = await claude(live.url).messages.count_tokens(model="m", messages=prefill)
    completion = await oai(live.url).completions.create(
        model="m",
        prompt=HELLO_RENDERED + "keeps",  # the template continues the assistant's turn: no end-of-turn token
        max_tokens=3,
        temperature=0,
        extra_body={"logit_bias": text_only_logit_bias(phrase_model)},
    )
    assert message.content[0].text == completion.choices[0].text
    assert counted.input_tokens == completion.usage.prompt_tokens == prompt_of(message.usage)
