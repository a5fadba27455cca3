"""``loading_progress``: what a waiting stream shows people, in its API's reasoning field.

A chat UI shows ``reasoning_content`` (OpenAI chat) or a ``thinking`` block
(Anthropic Messages) as the model's thoughts; while a request waits for a load
or a place, one short line per stage goes there ("loading qwen3-30b (18.2 GB)...").

For chat the lines are ordinary chunks before the route's own. Anthropic's
stream has a fixed frame (one ``message_start``, numbered content blocks), so
the lines open it and fill block 0; once the route answers, its own
``message_start`` and ``ping`` are dropped and its blocks are numbered on from 1.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mlx_hub.web import translate as tr
from mlx_hub.web.routes import CHAT, MESSAGES, route_of


class ChatProgress:
    """Lines as chat chunks whose delta carries only ``reasoning_content``."""

    def __init__(self, model: str):
        self.model = model

    def opening(self) -> bytes:
        return b""

    def line(self, text: str) -> bytes:
        delta = {"role": "assistant", "content": "", "reasoning_content": text + "\n"}
        chunk = {
            "id": "chatcmpl-hub-waiting",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        return f"data: {json.dumps(chunk)}\n\n".encode()

    def route(self, body: bytes, last: bool) -> bytes:
        return body


class ThinkingProgress:
    """Lines as Anthropic ``thinking`` block 0; the route's stream renumbered behind it."""

    def __init__(self, model: str):
        self.model = model
        self._closed = False
        self._buffer = b""

    def opening(self) -> bytes:
        events = tr.MessageStream(model=self.model, max_tokens=None).start()
        block = {"type": "thinking", "thinking": "", "signature": ""}
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
        )
        return "".join(tr.sse(e) for e in events).encode()

    def line(self, text: str) -> bytes:
        delta = {"type": "thinking_delta", "thinking": text + "\n"}
        return tr.sse(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        ).encode()

    def route(self, body: bytes, last: bool) -> bytes:
        out = b""
        if not self._closed:
            self._closed = True
            out = tr.sse(("content_block_stop", {"type": "content_block_stop", "index": 0})).encode()
        self._buffer += body
        *events, self._buffer = self._buffer.split(b"\n\n")
        if last and self._buffer:
            events, self._buffer = [*events, self._buffer], b""
        return out + b"".join(_shifted(e) for e in events if e)


def _shifted(event: bytes) -> bytes:
    """One SSE event of the route's: its frame events dropped, its block index moved past block 0."""
    name, _, data = event.partition(b"\ndata: ")
    if name in (b"event: message_start", b"event: ping"):
        return b""
    try:
        payload: Any = json.loads(data)
    except ValueError:
        return event + b"\n\n"
    if isinstance(payload, dict) and isinstance(payload.get("index"), int):
        payload["index"] += 1
    return name + b"\ndata: " + json.dumps(payload).encode() + b"\n\n"


def progress_for(path: str, model: str) -> ChatProgress | ThinkingProgress | None:
    """The writer for a route with a reasoning field: chat and Anthropic Messages."""
    route = route_of(path).path
    if route == CHAT:
        return ChatProgress(model)
    if route == MESSAGES:
        return ThinkingProgress(model)
    return None
