"""One request's trace: when it arrived, was admitted, first answered and ended, and what it reported.

The model port's gate makes one per inference request (``request_trace``),
lets it watch ``receive`` (a client that goes away) and ``send`` (through
``response_watch.ResponseWatch``), marks the moment admission let it in, and
calls ``finish`` in its ``finally``, which turns the trace into a ``RequestRecord``
and hands it to the core (``Activity.finished``): the core gets a plain record
and never sees ASGI. All of it is arithmetic on the loop; writing the record is
the log's thread's job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from mlx_hub.core.activity import Activity
from mlx_hub.core.requestlog import BODY_LIMIT, RequestRecord
from mlx_hub.web.response_watch import ResponseWatch
from mlx_hub.web.routes import api_of

#: What a client that closed the connection before any answer gets in the log (nginx's convention).
CLIENT_CLOSED = 499


def request_trace(activity: Activity, model: str, port: int, scope: Scope) -> RequestTrace:
    """A trace for one request to ``model`` (served on ``port``); ``finish`` hands its record to ``activity``."""
    return RequestTrace(model, port, scope, activity.finished, bodies=activity.requests.bodies)


class RequestTrace:
    """Timestamps and figures of one request; ``finish`` hands its record to ``sink`` once."""

    def __init__(
        self, model: str, port: int, scope: Scope, sink: Callable[[RequestRecord], None], *, bodies: bool
    ):
        self.model = model
        self.route = scope.get("path", "")
        server = scope.get("server") or (None, None)
        self.via = "port" if server[1] in (None, port) else "v1"  # /v1 hands the scope over unchanged
        self.started = time.monotonic()
        self.admitted_at: float | None = None
        self.disconnected = False
        self.watch: ResponseWatch | None = None
        self._sink = sink
        self._bodies = bodies
        self._request = bytearray()
        self._done = False

    def receive(self, receive: Receive) -> Receive:
        """``receive`` that notes a client going away before the answer's last byte (and keeps the body)."""

        async def watched() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not (self.watch and self.watch.complete):
                self.disconnected = True
            elif message["type"] == "http.request":
                self.keep_body(message.get("body", b""))
            return message

        return watched

    def keep_body(self, chunk: bytes) -> None:
        """Keep (the start of) the request body for the log: one read before ``receive`` was watched."""
        if self._bodies and len(self._request) < BODY_LIMIT:
            self._request += chunk[: BODY_LIMIT - len(self._request)]

    def send(self, send: Send) -> ResponseWatch:
        """The watcher the gate sends through (status, usage, first text, error code)."""
        self.watch = ResponseWatch(send, keep=BODY_LIMIT if self._bodies else 0)
        return self.watch

    def admitted(self) -> None:
        """Admission let the request in: the model is loaded and its memory reserved."""
        self.admitted_at = time.monotonic()

    def finish(self) -> None:
        """Hand the record to the sink, once (the gate's ``finally`` may run after an early return)."""
        if self._done:
            return
        self._done = True
        self._sink(self.record(time.time(), time.monotonic()))

    def record(self, wall: float, now: float) -> RequestRecord:
        """The finished request as the core logs it: times from the trace, figures from the watch."""
        watch = self.watch or ResponseWatch(_nowhere)
        status = watch.status if watch.started else (CLIENT_CLOSED if self.disconnected else watch.status)
        tokens = watch.tokens or None
        first = watch.first_text_at if watch.stream else None
        began = first if first is not None else self.admitted_at  # when generating started, as seen here
        counted = (tokens or 0) - (1 if first is not None else 0)  # a stream's first token opened the window
        speed = counted / (now - began) if began is not None and counted > 0 and now > began else None
        return RequestRecord(
            ts=wall,
            model=self.model,
            route=self.route,
            api=str(api_of(self.route)),
            via=self.via,
            status=status,
            total_s=round(now - self.started, 4),
            error=watch.error_code or (str(status) if status >= 400 else None),
            stream=watch.stream,
            prompt_tokens=watch.prompt_tokens,
            cached_tokens=watch.cached_tokens,
            completion_tokens=tokens,
            wait_s=round((self.admitted_at or now) - self.started, 4),
            ttft_s=None if first is None else round(first - self.started, 4),
            tokens_per_s=None if speed is None else round(speed, 2),
            disconnected=self.disconnected,
            request_body=self._request.decode("utf-8", "replace") if self._bodies else None,
            response_text=answer_text(bytes(watch.kept), watch.stream) if self._bodies else None,
        )


async def _nowhere(message: dict[str, Any]) -> None:
    return None


def answer_text(body: bytes, stream: bool) -> str:
    """What was answered: a JSON body as it is; a stream's generated text joined from its events."""
    text = body.decode("utf-8", "replace")
    if not stream:
        return text
    pieces = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[5:].strip())
        except ValueError:
            continue
        pieces.append(_event_text(event))
    return "".join(pieces) or text


def _event_text(event: Any) -> str:
    """The generated text one stream event carries, in any of the APIs' shapes."""
    if not isinstance(event, dict):
        return ""
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        return str(delta.get("content") or delta.get("reasoning_content") or choice.get("text") or "")
    delta = event.get("delta")
    if isinstance(delta, dict):
        return str(delta.get("text") or "")  # Anthropic content_block_delta
    return delta if isinstance(delta, str) else ""  # responses: response.output_text.delta
