"""Small ASGI helpers, and what the hub's layers learn of a request, worked out once and kept on its scope.

A request passes several of the hub's layers (the key guard, ``/v1`` routing,
the load gate, the finish-reason writer, the hub's own routes). What one of
them works out, the others read from the scope (:class:`Seen`) instead of
working it out again: the body, read and JSON-parsed by whichever layer needs
it first (:func:`request_body`), and the API keys the request was accepted
against. Once read, the body is no longer in ``receive``: the layers hand on a
``receive`` past the body, and :class:`BodyReplay`, the innermost layer of a
model's app, gives it back to the route, which reads it as from the client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

JSON_TYPES = ("application/json",)
#: The scope key of a request's :class:`Seen`.
SEEN = "mlx_hub.seen"


@dataclass(frozen=True)
class Body:
    """A request's whole body, as the client sent it or as the gate rewrote it."""

    raw: bytes
    data: dict[str, Any] | None  # the JSON object, for a JSON request whose body is one
    gone: bool = False  # the client went away while sending it


@dataclass
class Seen:
    """What the hub's layers have worked out about one request; shared by every copy of its scope."""

    body: Body | None = None
    keys: frozenset[str] | None = None  # the API keys it was accepted against


def seen(scope: Scope) -> Seen:
    """The request's :class:`Seen`, made on first use."""
    state = scope.get(SEEN)
    if state is None:
        state = scope[SEEN] = Seen()
    return state


async def request_body(scope: Scope, receive: Receive) -> Body:
    """The request's body: read from ``receive`` and parsed on the first call for this request, then kept.

    Only the first call reads ``receive``; so after any call, the ``receive`` a
    layer hands on is past the body, and ``BodyReplay`` gives the route its body.
    """
    state = seen(scope)
    if state.body is None:
        raw, gone = await read_body(receive)
        state.body = Body(raw, json_object(raw) if is_json(scope) and not gone else None, gone)
    return state.body


async def parsed_json(request: Any) -> Any:
    """A route's JSON body: what the gate parsed (and perhaps rewrote), else parsed here.

    ``request`` is a starlette ``Request``. Raises ``ValueError`` for a body that is not JSON,
    so each route refuses it in its own API's envelope.
    """
    body = seen(request.scope).body
    if body is not None and body.data is not None:
        return body.data
    return json.loads(await request.body() or b"null")


def rewrite_body(scope: Scope, data: dict[str, Any]) -> Scope:
    """Make ``data`` the request's body from here in: encoded once, with a scope whose length matches."""
    raw = json.dumps(data).encode()
    seen(scope).body = Body(raw, data)
    return with_length(scope, len(raw))


class BodyReplay:
    """ASGI middleware, innermost in a model's app: the route reads the body a layer before it has read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get(SEEN)
        if state is not None and state.body is not None:
            receive = replay(state.body.raw, receive)
        await self.app(scope, receive, send)


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole body, and whether the client went away while sending it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that first gives ``body`` whole, then passes through (a client disconnect)."""
    sent = False

    async def once() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return once


def header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def with_length(scope: Scope, length: int) -> Scope:
    """A copy of ``scope`` whose content-length matches a rewritten body."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


def is_json(scope: Scope) -> bool:
    return header(scope, b"content-type").split(";")[0].strip().lower() in JSON_TYPES


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
