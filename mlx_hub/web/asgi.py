"""Small ASGI helpers: read a request body once, hand it on, answer with an error.

Routing by ``model`` and per-request options (``keep_alive``) need to read the
body before the upstream route does; the body is then replayed to the route
exactly once, and later ``receive`` calls (a client disconnect) pass through.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Receive, Scope

JSON_TYPES = ("application/json",)


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
