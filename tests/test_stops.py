"""Stop means stop: Anthropic ``stop_sequences`` and completions' ``stop`` end the generation.

Measured before the fix: ``/v1/messages`` with a stop sequence generated all of
``max_tokens`` and cut the text afterwards, reporting every token. Here a
generation that could run to 300 tokens must end at the stop, and report the
tokens generated up to it, on each of upstream's generation paths: the batched
one (upstream ends it on the stop's tokens, as for chat's ``stop``) and the
single-request one (upstream ignores ``stop``; the hub ends it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlx_hub.testing.tinymodel import text_only_logit_bias

from .helpers import LiveController
from .test_hub import lm
from .test_peer_apis import HELLO, a_stop_inside, claude, close_clients, oai, port_url  # noqa: F401

LONG = 300


def greedy(path: Path) -> dict[str, Any]:
    return {"temperature": 0, "logit_bias": text_only_logit_bias(path)}


async def chat_deltas(live: LiveController, path: Path, **extra: Any) -> tuple[list[str], Any]:
    """The chat route's text deltas (one per generated token here) and its usage."""
    client = oai(live.url)
    stream = await client.chat.completions.create(
        model="m",
        messages=HELLO,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=greedy(path),
        **extra,
    )
    deltas, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content is not None:
            deltas.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    return deltas, usage


def a_token_stop(deltas: list[str]) -> tuple[str, int]:
    """A later delta whose text first appears where it was generated: (stop, tokens up to and with it)."""
    text = "".join(deltas)
    for i in range(2, len(deltas)):
        at = len("".join(deltas[:i]))
        if deltas[i].strip() and text.find(deltas[i]) == at:
            return deltas[i], i + 1
    raise AssertionError(f"no token to stop on in {deltas!r}")


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "single-request"])
async def test_messages_stop_sequences_end_the_generation(
    start, hub_config, tiny_qwen: Path, batching: bool
) -> None:
    live = await start(hub_config([lm("m", tiny_qwen, default=True, disable_batching=not batching)]))
    deltas, _ = await chat_deltas(live, tiny_qwen)
    text = "".join(deltas)
    client = claude(live.url)

    # A stop inside the text: the reply ends there, well before max_tokens.
    stop = a_stop_inside(text)
    cut = await client.messages.create(
        model="m", max_tokens=LONG, messages=HELLO, stop_sequences=[stop], extra_body=greedy(tiny_qwen)
    )
    assert cut.content[0].text == text[: text.index(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    upto = next(i for i in range(1, len(deltas) + 1) if stop in "".join(deltas[:i]))
    assert 1 <= cut.usage.output_tokens <= upto + 1 < LONG  # the tokens up to the stop, not 300
    assert cut.usage.input_tokens + (cut.usage.cache_read_input_tokens or 0) > 0

    # Streamed: the same text, the same reason, the same count.
    async with client.messages.stream(
        model="m", max_tokens=LONG, messages=HELLO, stop_sequences=[stop], extra_body=greedy(tiny_qwen)
    ) as stream:
        streamed = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert streamed == cut.content[0].text and final.stop_reason == "stop_sequence"
    assert final.usage.output_tokens == cut.usage.output_tokens

    # A stop that is one whole generated token: on the batched path upstream ends on it (and drops
    # it); the reply still says stop_sequence, and counts what chat with the same stop counts.
    token_stop, through = a_token_stop(deltas)
    exact = await client.messages.create(
        model="m", max_tokens=LONG, messages=HELLO, stop_sequences=[token_stop], extra_body=greedy(tiny_qwen)
    )
    assert exact.content[0].text == text[: text.index(token_stop)]
    assert (exact.stop_reason, exact.stop_sequence) == ("stop_sequence", token_stop)
    assert exact.usage.output_tokens <= through + 1
    if batching:
        _, chat_usage = await chat_deltas(live, tiny_qwen, stop=[token_stop])
        assert exact.usage.output_tokens == chat_usage.completion_tokens == through


async def test_completions_stop_ends_the_generation(start, hub_config, tiny_qwen: Path) -> None:
    live = await start(hub_config([lm("m", tiny_qwen, default=True)]))
    client = oai(port_url(live, "m"))
    bias = {"logit_bias": text_only_logit_bias(tiny_qwen)}
    whole = await client.completions.create(
        model="m", prompt="The hub keeps", max_tokens=24, temperature=0, extra_body=bias
    )
    text = whole.choices[0].text
    stop = a_stop_inside(text)
    cut = await client.completions.create(
        model="m", prompt="The hub keeps", max_tokens=LONG, temperature=0, stop=[stop], extra_body=bias
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert 1 <= cut.usage.completion_tokens <= 24 and cut.usage.prompt_tokens == whole.usage.prompt_tokens


async def test_without_a_stop_nothing_changes(start, hub_config, tiny_qwen: Path) -> None:
    """No stop sequence: the generation runs to max_tokens and reports it, as before."""
    live = await start(hub_config([lm("m", tiny_qwen, default=True)]))
    reply = await claude(live.url).messages.create(
        model="m", max_tokens=12, messages=HELLO, extra_body=greedy(tiny_qwen)
    )
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 12
