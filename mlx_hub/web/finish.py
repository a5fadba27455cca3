"""``finish_reason: "length"`` when a chat answer ends at its token limit, as OpenAI says it.

Upstream's chat route writes ``"stop"`` into every answer that has no tool
call (``format_final_response`` and ``handle_stream_response`` hard-code it),
so a client cannot tell a cut-off answer from a finished one and does not ask
for the rest. The generation itself knows: mlx-lm's last step says
``"length"``. :class:`LengthFinish` watches the steps of each chat request
(``engine.generation_watch``) and rewrites the final ``"stop"`` to ``"length"``
when the generation ended at ``max_tokens``. Where no step is seen (upstream's
one-at-a-time path without streaming returns the whole answer at once), the
usage decides: as many completion tokens as the limit.

/v1/completions decides the same way in its own route (``translate.finish_reason``).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_hub.engine.generation_watch import GenerationWatch, watching
from mlx_hub.web.asgi import is_json, json_object, request_body
from mlx_hub.web.routes import CHAT, route_of


def ended_at_limit(watch: GenerationWatch, completion_tokens: int | None, limit: int | None) -> bool:
    """Whether the generation stopped because it reached its token limit."""
    if watch.steps:
        return watch.finish_reason == "length"
    return limit is not None and completion_tokens is not None and completion_tokens >= limit


def _limit(data: dict[str, Any] | None, handler: Any) -> int | None:
    """The request's token limit, or the model's default as upstream resolves it."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = (data or {}).get(key)
        if isinstance(value, int):
            return value
    resolve = getattr(getattr(handler, "model", None), "resolve_max_tokens", None)
    try:
        return int(resolve({})) if resolve is not None else None
    except Exception:  # a handler without a default: leave upstream's answer as it is
        return None


class LengthFinish:
    """ASGI middleware for a model port's chat route: ``"stop"`` becomes ``"length"`` where it was the limit."""

    def __init__(self, app: ASGIApp, handler: Any) -> None:
        self.app = app
        self.handler = handler  # a callable: the slot's handler of the moment

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and route_of(scope["path"]).path == CHAT
            and is_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = await request_body(scope, receive)  # the gate's: read and parsed before this
        if body.gone:
            return
        answer = _Answer(send, GenerationWatch(), _limit(body.data, self.handler()))
        with watching(answer.watch):
            await self.app(scope, receive, answer.send)


class _Answer:
    """Wraps ``send``: a JSON answer is held whole and edited; a stream's events are edited one by one."""

    def __init__(self, send: Send, watch: GenerationWatch, limit: int | None) -> None:
        self._send = send
        self.watch = watch
        self.limit = limit
        self._start: Message | None = None
        self._held: list[bytes] = []
        self._stream = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            kind = dict(message.get("headers", [])).get(b"content-type", b"").decode("latin-1")
            self._stream = kind.startswith("text/event-stream")
            if message["status"] == 200 and kind.startswith("application/json"):
                self._start = message
                return
        elif message["type"] == "http.response.body" and self._start is not None:
            self._held.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await self._send_whole(b"".join(self._held))
            return
        elif message["type"] == "http.response.body" and self._stream:
            message = {**message, "body": self._edit_events(message.get("body", b""))}
        await self._send(message)

    async def _send_whole(self, body: bytes) -> None:
        start, self._start = self._start, None
        data = json_object(body)
        if data is not None and self._edit(data):
            body = json.dumps(data).encode()
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    def _edit(self, data: dict[str, Any]) -> bool:
        """Rewrite ``data``'s final ``"stop"`` choices to ``"length"`` where that was the limit; True if any."""
        choices = [
            c for c in data.get("choices") or [] if isinstance(c, dict) and c.get("finish_reason") == "stop"
        ]
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        if not choices or not ended_at_limit(self.watch, usage.get("completion_tokens"), self.limit):
            return False
        for choice in choices:
            choice["finish_reason"] = "length"
        return True

    def _edit_events(self, body: bytes) -> bytes:
        if b'"finish_reason": "stop"' not in body:
            return body
        lines = []
        for line in body.decode("utf-8").split("\n"):
            data = json_object(line[len("data: ") :].encode()) if line.startswith("data: ") else None
            if data is not None and self._edit(data):
                line = f"data: {json.dumps(data)}"
            lines.append(line)
        return "\n".join(lines).encode("utf-8")
