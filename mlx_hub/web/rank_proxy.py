"""A sharded model's routes: its port forwards to rank 0's server, and says which rank failed.

Rank 0 of the group runs mlx-lm's server, which speaks OpenAI chat and
completions. The entry's own port (and /v1 through it) keeps the hub's gate in
front (JIT, groups, keys, counting) and forwards those two routes as they are;
Anthropic Messages are translated to chat and back with the same state
machine the in-process models use (``translate``). When the group fails while
a request is in flight, its connection to rank 0 drops and the client gets the
group's reason, which names the rank and host, instead of a bare 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mlx_hub.web import translate as tr
from mlx_hub.web.asgi import parsed_json
from mlx_hub.web.rank_tokens import NoTokenizer, count_prompt
from mlx_hub.web.responses import error_json
from mlx_hub.web.routes import CHAT, COMPLETIONS, COUNT_TOKENS, MESSAGES, TABLE

if TYPE_CHECKING:
    from mlx_hub.core.slot import ModelSlot

log = logging.getLogger(__name__)

FORWARDED = (CHAT, COMPLETIONS)
#: Every inference route a sharded entry answers (``sharded`` in the route table); other POSTs are
#: refused before anything loads.
SERVED = frozenset(path for path, route in TABLE.items() if route.sharded)
RANK_MODEL = "default_model"  # the name mlx-lm's server gives the model it was started with
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: No read timeout: a long prefill is silent, and a stuck group is ended by its own watchdog.
#: How long a dropped request waits for the group's watchdog to say which rank failed.
NAMING_SECONDS = 3.0
_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=30.0, pool=10.0)


class GroupGone(RuntimeError):
    """Rank 0 could not be reached or dropped the request."""


def _group(slot: ModelSlot) -> Any:
    group = slot.handler
    if group is None or getattr(group, "url", None) is None:
        raise GroupGone(f"model '{slot.name}' is not loaded")
    return group


async def _reason(slot: ModelSlot, group: Any, exc: Exception) -> str:
    """Why rank 0 dropped a request: the group's failure, once its watchdog has named the rank that caused it."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(group.ended), NAMING_SECONDS)
    failure = getattr(group, "failure", None)
    return (
        failure
        or f"model '{slot.name}': rank 0 ({group.url}) dropped the request: {type(exc).__name__}: {exc}"
    )


async def _upstream(slot: ModelSlot, path: str, body: bytes) -> tuple[Any, httpx.AsyncClient, httpx.Response]:
    group = _group(slot)
    client = httpx.AsyncClient(timeout=_TIMEOUT)
    try:
        request = client.build_request(
            "POST", group.url + path, content=body, headers={"content-type": "application/json"}
        )
        return group, client, await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        raise GroupGone(await _reason(slot, group, exc)) from None


#: Entry sampling defaults mlx-lm's server has no flag for, and the request field each fills in.
BODY_DEFAULTS: dict[str, str] = {
    "default_repetition_penalty": "repetition_penalty",
    "default_repetition_context_size": "repetition_context_size",
    "default_presence_penalty": "presence_penalty",
    "default_xtc_probability": "xtc_probability",
    "default_xtc_threshold": "xtc_threshold",
    "default_seed": "seed",
}
#: Request fields mlx-lm's server would ignore without a word: refused, so no client trusts an unmet contract.
UNSERVED: dict[str, str] = {
    "response_format": "structured output (response_format) is not supported by a distributed entry: "
    "mlx-lm's sharded server has no constrained decoding; serve the model unsharded for it",
}


def unserved(body: dict[str, Any]) -> tuple[str, str] | None:
    """The field rank 0 cannot honour and why, or None (it would answer a JSON-mode request with free text)."""
    for field, why in UNSERVED.items():
        value = body.get(field)
        if value is not None and not (isinstance(value, dict) and value.get("type") == "text"):
            return field, why
    return None


def for_rank(body: dict[str, Any], entry: Any) -> bytes:
    """The body rank 0 gets: the entry's sampling defaults filled in, ``model`` naming the loaded one.

    mlx-lm's server reads ``model`` as a path to load; "default_model" is the one it started with.
    """
    defaults = {
        field: value
        for option, field in BODY_DEFAULTS.items()
        if (value := getattr(entry, option)) is not None
    }
    return json.dumps({**defaults, **body, "model": RANK_MODEL}).encode()


def _named(line: str, model: str) -> str:
    """One SSE line with rank 0's model name replaced by the one the client asked for."""
    if not line.startswith("data: {"):
        return line
    data = json.loads(line[6:])
    if data.get("model") == RANK_MODEL:
        data["model"] = model
    return "data: " + json.dumps(data)


async def _forward(slot: ModelSlot, raw: Request) -> Response:
    """One OpenAI route, as rank 0 answers it; a failure mid-stream ends the stream with an error event."""
    try:
        body = await parsed_json(raw)
    except ValueError as exc:
        return error_json(400, f"the request body is not valid JSON: {exc}", "invalid_request_error", None)
    if not isinstance(body, dict):
        return error_json(400, "the request body must be a JSON object", "invalid_request_error", None)
    refused = unserved(body)
    if refused is not None:
        field, why = refused
        return error_json(400, why, "invalid_request_error", "unsupported_parameter", param=field)
    model = body.get("model") or slot.entry.served_name
    try:
        group, client, answer = await _upstream(slot, raw.url.path, for_rank(body, slot.entry))
    except GroupGone as exc:
        return error_json(502, str(exc), "server_error", "rank_failed")
    kind = answer.headers.get("content-type", "application/json")
    if not kind.startswith("text/event-stream"):
        try:
            content = await answer.aread()
        except httpx.HTTPError as exc:
            return error_json(502, await _reason(slot, group, exc), "server_error", "rank_failed")
        finally:
            await answer.aclose()
            await client.aclose()
        try:
            data = json.loads(content)
            if isinstance(data, dict) and data.get("model") == RANK_MODEL:
                data["model"] = model
            return JSONResponse(data, status_code=answer.status_code)
        except ValueError:
            return Response(content, status_code=answer.status_code, media_type=kind)

    async def lines() -> AsyncIterator[str]:
        try:
            done = False
            async for line in answer.aiter_lines():
                done = done or line.strip() == "data: [DONE]"
                yield _named(line, model) + "\n"
            if not done:  # HTTP/1.0: a rank that dies closes the stream as if it had ended
                raise httpx.RemoteProtocolError("the stream ended before [DONE]")
        except httpx.HTTPError as exc:
            error = {
                "error": {
                    "message": await _reason(slot, group, exc),
                    "type": "server_error",
                    "code": "rank_failed",
                }
            }
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            await answer.aclose()
            await client.aclose()

    return StreamingResponse(lines(), status_code=answer.status_code, media_type=kind, headers=_SSE_HEADERS)


def _chunk(data: dict[str, Any]) -> list[Any]:
    """An OpenAI chat chunk as the handler-shaped chunks ``translate.pieces`` reads."""
    out: list[Any] = []
    for choice in data.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("reasoning"):
            out.append({"reasoning_content": delta["reasoning"]})
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            out.append(
                {"name": function.get("name"), "arguments": function.get("arguments"), "id": call.get("id")}
            )
        if delta.get("content"):
            out.append(delta["content"])
    if data.get("usage"):
        out.append({"__usage__": data["usage"]})
    return out


async def _chat_chunks(slot: ModelSlot, chat: dict[str, Any]) -> AsyncIterator[Any]:
    chat = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    group, client, answer = await _upstream(slot, CHAT, for_rank(chat, slot.entry))
    try:
        if answer.status_code != 200:
            text = (await answer.aread()).decode(errors="replace")
            raise tr.RequestError(f"rank 0 refused the request: {text[:300]}", answer.status_code)
        done = False
        async for line in answer.aiter_lines():
            done = done or line.strip() == "data: [DONE]"
            if line.startswith("data: {"):
                for chunk in _chunk(json.loads(line[6:])):
                    yield chunk
        if not done:  # HTTP/1.0: a rank that dies closes the stream as if it had ended
            raise httpx.RemoteProtocolError("the stream ended before [DONE]")
    except httpx.HTTPError as exc:
        raise GroupGone(await _reason(slot, group, exc)) from None
    finally:
        await answer.aclose()
        await client.aclose()


def _anthropic_error(status: int, message: str) -> JSONResponse:
    return JSONResponse(tr.error_body(status, message), status_code=status)


async def _as_chat(raw: Request, *, count_only: bool = False) -> tuple[Any, dict[str, Any]]:
    """A Messages body and the chat request it becomes; ``RequestError`` for one that is not JSON or not valid."""
    try:
        body = await parsed_json(raw)
    except ValueError as exc:
        raise tr.RequestError(f"the request body is not valid JSON: {exc}") from None
    return body, tr.to_chat_request(body, count_only=count_only)


async def _messages(slot: ModelSlot, raw: Request) -> Response:
    """Anthropic Messages: translated to chat for rank 0, its chunks translated back."""
    try:
        body, chat = await _as_chat(raw)
    except tr.RequestError as exc:
        return _anthropic_error(exc.status, exc.message)
    model = body.get("model") or slot.entry.served_name
    stream = tr.MessageStream(
        model=model, max_tokens=chat["max_tokens"], stops=tr.stop_sequences(body, "stop_sequences")
    )

    async def events() -> AsyncIterator[tr.Event]:
        for event in stream.start():
            yield event
        async for chunk in _chat_chunks(slot, chat):
            for piece in tr.pieces(chunk):
                for event in stream.feed(piece):
                    yield event
            if stream.stopped:
                break
        for event in stream.finish():
            yield event

    if body.get("stream"):
        return StreamingResponse(_sse(events()), media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        return JSONResponse(tr.collect([event async for event in events()]))
    except tr.RequestError as exc:
        return _anthropic_error(exc.status, exc.message)
    except GroupGone as exc:
        return _anthropic_error(502, str(exc))


async def _count_tokens(slot: ModelSlot, raw: Request) -> Response:
    """Anthropic count_tokens, counted here with the model's tokenizer (web/rank_tokens.py)."""
    try:
        _, chat = await _as_chat(raw, count_only=True)
        return JSONResponse({"input_tokens": await count_prompt(_group(slot), slot.entry, chat)})
    except tr.RequestError as exc:
        return _anthropic_error(exc.status, exc.message)
    except NoTokenizer as exc:
        return _anthropic_error(501, str(exc))
    except GroupGone as exc:
        return _anthropic_error(502, str(exc))


async def _sse(events: AsyncIterator[tr.Event]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield tr.sse(event)
    except (GroupGone, tr.RequestError) as exc:
        status = getattr(exc, "status", 502)
        yield tr.sse(("error", tr.error_body(status, getattr(exc, "message", str(exc)))))


def add_rank_routes(app: FastAPI, slot: ModelSlot) -> None:
    """Register the sharded entry's inference routes on its model app."""

    async def forward(raw: Request) -> Response:
        return await _forward(slot, raw)

    async def messages(raw: Request) -> Response:
        return await _messages(slot, raw)

    async def count_tokens(raw: Request) -> Response:
        return await _count_tokens(slot, raw)

    async def unserved_route(raw: Request) -> Response:
        served = ", ".join(sorted(SERVED))
        return error_json(
            404,
            f"model '{slot.name}' is served by a distributed group (mlx-lm's server), which answers "
            f"{served}; {raw.url.path} is not among them",
            "invalid_request_error",
            "unsupported_route",
        )

    for path in FORWARDED:
        app.add_api_route(path, forward, methods=["POST"], response_model=None)
    app.add_api_route(MESSAGES, messages, methods=["POST"], response_model=None)
    app.add_api_route(COUNT_TOKENS, count_tokens, methods=["POST"], response_model=None)
    app.add_api_route("/v1/{rest:path}", unserved_route, methods=["POST"], response_model=None)
