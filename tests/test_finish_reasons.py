"""``finish_reason`` says ``"length"`` when an answer ends at its token limit, as OpenAI's does.

Measured before the fix: upstream's chat route answered ``"stop"`` for an
answer cut at ``max_tokens``, streamed or not, so a client could not tell it
from a finished one. Checked on both of upstream's generation paths (batched,
its default, and one request at a time), for chat and /v1/completions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from .helpers import text_only
from .test_hub import lm
from .test_peer_apis import HELLO, close_clients, oai  # noqa: F401

LIMIT = 6


async def chat_finish(client: Any, path: Path, stream: bool, **extra: Any) -> tuple[str | None, str]:
    """The final finish_reason of a greedy chat answer, and its text."""
    request = {"model": "m", "messages": HELLO, "temperature": 0, "extra_body": text_only(path), **extra}
    if not stream:
        reply = await client.chat.completions.create(max_tokens=LIMIT, **request)
        assert reply.usage.completion_tokens <= LIMIT
        return reply.choices[0].finish_reason, reply.choices[0].message.content or ""
    finish, text = None, ""
    async for chunk in await client.chat.completions.create(max_tokens=LIMIT, stream=True, **request):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return finish, text


async def completion_finish(client: Any, path: Path, stream: bool) -> str | None:
    request = {"model": "m", "prompt": "The hub keeps", "max_tokens": LIMIT, "temperature": 0}
    if not stream:
        reply = await client.completions.create(extra_body=text_only(path), **request)
        return reply.choices[0].finish_reason
    finishes = [
        c.choices[0].finish_reason
        async for c in await client.completions.create(stream=True, extra_body=text_only(path), **request)
        if c.choices
    ]
    return [f for f in finishes if f][-1]


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "single-request"])
async def test_an_answer_cut_at_max_tokens_finishes_with_length(
    start, hub_config, tiny_qwen: Path, batching: bool
) -> None:
    live = await start(hub_config([lm("m", tiny_qwen, default=True, disable_batching=not batching)]))
    for url in (f"http://127.0.0.1:{live.hub.slots['m'].port}", live.url):  # its port, the controller's /v1
        client = oai(url)
        for stream in (False, True):
            finish, text = await chat_finish(client, tiny_qwen, stream)
            assert (finish, bool(text)) == ("length", True), (stream, text)
            assert await completion_finish(client, tiny_qwen, stream) == "length", stream

    # Upstream's batched path (where the installed mlx-lm allows it) ends on a chat ``stop``:
    # that answer finished, it was not cut.
    if batching and getattr(sys.modules.get("app.core.batch_scheduler"), "BATCHING_AVAILABLE", False):
        _, text = await chat_finish(client, tiny_qwen, False)
        stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text.index(text[i : i + 2]) > 0)
        for stream in (False, True):
            finish, cut = await chat_finish(client, tiny_qwen, stream, stop=[stop])
            assert finish == "stop" and stop not in cut, (stream, cut)
