"""The two APIs upstream lacks, on every lm and multimodal port: Anthropic Messages and completions.

Each route is a thin driver around :mod:`.translate`: it builds upstream's
``ChatCompletionRequest`` from the translated body, fills the entry's
sampling defaults with upstream's own ``refine_chat_completion_request`` (what
the chat route does), and iterates the same handler stream the chat route
iterates (``generate_text_stream`` or ``generate_multimodal_stream``). So
parsers, defaults, batching and the prompt cache behave exactly as for chat.

The routes sit on the model app behind its gate (every POST under ``/v1/``),
so JIT loads, groups, the memory budget, keep_alive, in-flight counts and
/metrics apply unchanged, and the controller's ``/v1`` forwards them by
``model`` like chat.

``/v1/completions`` sends the prompt as written: the model's
``create_input_prompt`` (the one place both handlers render a template) is
wrapped once per handler to return the prompt a completions request carries
instead of rendering messages (engine/patches/mlx_openai_server.py). Everything
after it, tokenizing included, is the chat path's.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mlx_hub.engine.generation_watch import watching
from mlx_hub.engine.patches.mlx_openai_server import accept_raw_prompts, count_prompt_tokens
from mlx_hub.engine.patches.mlx_openai_server import raw_prompt as raw_prompt_for
from mlx_hub.web import translate as tr
from mlx_hub.web.asgi import parsed_json
from mlx_hub.web.model_cards import names_another
from mlx_hub.web.responses import error_json
from mlx_hub.web.routes import COMPLETIONS, COUNT_TOKENS, MESSAGES
from mlx_hub.web.stopping import StopEnding

if TYPE_CHECKING:
    from mlx_hub.core.slot import ModelSlot

log = logging.getLogger(__name__)

#: Model types whose handlers stream chat.
TEXT_TYPES = ("lm", "multimodal")

_SSE_HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}


class RouteError(Exception):
    """A refusal with its status; each route writes it in its own API's envelope."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def refusal(status: int, message: str) -> Response:
    """The hub's one error writer: OpenAI's envelope, or Anthropic's on the Messages paths."""
    return error_json(status, message, "invalid_request_error" if status < 500 else "server_error", status)


def _detail_message(exc: HTTPException) -> str:
    detail = exc.detail
    if isinstance(detail, dict):
        inner = detail.get("error", detail)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(detail)


async def _body(raw: Request) -> Any:
    """The request's JSON, as the gate parsed (and perhaps rewrote) it; parsed here only where the gate
    did not (a body not sent as JSON), so that an unreadable one is refused in the route's envelope."""
    try:
        return await parsed_json(raw)
    except ValueError as exc:
        raise RouteError(400, f"the request body is not valid JSON: {exc}") from exc


class Driver:
    """What the three routes share: the slot's handler, the request it takes, its stream."""

    def __init__(self, slot: ModelSlot):
        self.slot = slot

    def model_name(self, body: Any) -> str:
        requested = body.get("model") if isinstance(body, dict) else None
        if names_another(requested, self.slot.entry):
            served = self.slot.entry.served_name
            raise RouteError(404, f"model '{requested}' not found; this port serves '{served}'")
        return requested if isinstance(requested, str) and requested else self.slot.entry.served_name

    def handler(self) -> Any:
        handler = self.slot.handler
        if handler is None:
            raise RouteError(503, f"model '{self.slot.name}' is not loaded")
        if getattr(handler, "handler_type", "") not in TEXT_TYPES:
            kind = self.slot.entry.model_type
            raise RouteError(
                400, f"model '{self.slot.name}' is a {kind} model: only lm and multimodal models chat"
            )
        return handler

    def request(self, handler: Any, chat: dict[str, Any]) -> Any:
        """Upstream's request object with the entry's sampling defaults, as the chat route fills them."""
        from app.api import endpoints
        from app.schemas.openai import ChatCompletionRequest
        from pydantic import ValidationError

        chat = {k: v for k, v in chat.items() if k != "model"}
        try:
            request = ChatCompletionRequest(**chat)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise RouteError(400, f"{where}: {first.get('msg')}") from exc
        refine: Callable[..., Any] | None = getattr(endpoints, "refine_chat_completion_request", None)
        if refine is None:
            return request
        # 1.8.x reads the handler's sampling defaults; 1.6.x takes the request alone (env defaults).
        takes_handler = len(inspect.signature(refine).parameters) > 1
        return refine(request, handler) if takes_handler else refine(request)

    @staticmethod
    def stream(handler: Any, request: Any) -> AsyncIterator[Any]:
        if getattr(handler, "handler_type", "") == "multimodal":
            return handler.generate_multimodal_stream(request)
        return handler.generate_text_stream(request)

    async def primed(
        self, handler: Any, request: Any, ending: StopEnding, raw_prompt: str | None = None
    ) -> AsyncIterator[Any]:
        """The handler's stream with its first chunk already read, so early refusals keep their status.

        The handler renders and tokenizes the prompt before its first chunk, so
        a ``raw_prompt`` set around that first read is the prompt it uses; the
        generation it starts there reports its steps to ``ending``.
        """
        source = self.stream(handler, request)
        try:
            with raw_prompt_for(raw_prompt), watching(ending.watch):
                first = await source.__anext__()
        except StopAsyncIteration:
            first = None
        except HTTPException as exc:
            raise RouteError(exc.status_code, _detail_message(exc)) from exc

        async def chunks() -> AsyncIterator[Any]:
            try:
                if first is not None:
                    yield first
                async for chunk in source:
                    yield chunk
            finally:
                with contextlib.suppress(Exception):
                    await source.aclose()  # a client gone mid-stream ends generation

        return chunks()


async def _anthropic_events(
    chunks: AsyncIterator[Any], stream: tr.MessageStream, ending: StopEnding
) -> AsyncIterator[tr.Event]:
    for event in stream.start():
        yield event
    try:
        async for chunk in chunks:
            for piece in tr.pieces(chunk):
                for event in stream.feed(piece):
                    yield event
            if stream.stopped:
                break  # a stop sequence: closing the handler's stream ends the generation now
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    stream.feed(ending.settle(stream.scanner, stream.usage))
    for event in stream.finish():
        yield event


async def _anthropic_sse(events: AsyncIterator[tr.Event]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield tr.sse(event)
    except HTTPException as exc:
        yield tr.sse(("error", tr.error_body(exc.status_code, _detail_message(exc))))
    except Exception as exc:  # the stream has started: the error travels as Anthropic's error event
        yield tr.sse(("error", tr.error_body(500, f"{type(exc).__name__}: {exc}")))


def add_peer_routes(app: FastAPI, slot: ModelSlot) -> None:
    """Register /v1/messages, /v1/messages/count_tokens and /v1/completions on a model app.

    Every port gets them, so a model that does not chat (embeddings, whisper,
    images) answers 400 in the caller's envelope, as upstream's chat route does,
    rather than a bare 404.
    """
    driver = Driver(slot)
    for path, route in (
        (MESSAGES, _messages),
        (COUNT_TOKENS, _count_tokens),
        (COMPLETIONS, _completions),
    ):
        app.add_api_route(path, _bound(route, driver), methods=["POST"], response_model=None)


def _bound(route: Callable[[Driver, Request], Awaitable[Response]], driver: Driver) -> Callable[..., Any]:
    """``route`` as an endpoint of one model's app (FastAPI reads its one parameter, the request)."""

    async def endpoint(raw: Request) -> Response:
        return await route(driver, raw)

    endpoint.__name__ = route.__name__.lstrip("_")
    return endpoint


async def _messages(driver: Driver, raw: Request) -> Response:
    try:
        body = await _body(raw)
        chat = tr.to_chat_request(body)
        model = driver.model_name(body)
        handler = driver.handler()
        request = driver.request(handler, chat)
        stops = tr.stop_sequences(body, "stop_sequences")
        stream = tr.MessageStream(model=model, max_tokens=chat["max_tokens"], stops=stops)
        ending = StopEnding(handler, stops)
        events = _anthropic_events(await driver.primed(handler, request, ending), stream, ending)
        if body.get("stream"):
            return StreamingResponse(
                _anthropic_sse(events), media_type="text/event-stream", headers=_SSE_HEADERS
            )
        return JSONResponse(tr.collect([event async for event in events]))
    except Exception as exc:
        return _refused("messages", exc)


async def _count_tokens(driver: Driver, raw: Request) -> Response:
    try:
        body = await _body(raw)
        chat = tr.to_chat_request(body, count_only=True)
        driver.model_name(body)
        handler = driver.handler()
        request = driver.request(handler, chat)
        return JSONResponse({"input_tokens": await count_prompt_tokens(handler, request)})
    except Exception as exc:
        return _refused("count_tokens", exc)


async def _completions(driver: Driver, raw: Request) -> Response:
    try:
        body = await _body(raw)
        chats = tr.to_completion_requests(body)
        model = driver.model_name(body)
        handler = driver.handler()
        accept_raw_prompts(handler)
        requests = [_with_a_limit(driver.request(handler, chat)) for chat in chats]
        stops = tr.stop_sequences(body, "stop")
        ending = StopEnding(handler, stops)
        first = await driver.primed(handler, requests[0], ending, _prompt(chats[0]))
    except Exception as exc:
        return _refused("completions", exc)
    run = _Completion(driver, handler, requests, stops, model, (first, ending))
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(run.sse(include_usage), media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        return JSONResponse(await run.whole())
    except Exception as exc:
        return _refused("completions", exc)


def _refused(route: str, exc: Exception) -> Response:
    """The answer for what stopped a route: its own refusal, upstream's HTTP error, else a 500 that says what failed."""
    if isinstance(exc, tr.RequestError | RouteError):
        return refusal(exc.status, exc.message)
    if isinstance(exc, HTTPException):
        return refusal(exc.status_code, _detail_message(exc))
    log.exception("%s failed", route)
    return refusal(500, f"{type(exc).__name__}: {exc}")


def _with_a_limit(request: Any) -> Any:
    """Completions always have a token limit: the request's, the entry's default, else OpenAI's 16."""
    if request.max_tokens is None and request.max_completion_tokens is None:
        request.max_tokens = tr.OPENAI_MAX_TOKENS
    return request


def _sse_error(message: str, status: int) -> str:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return f"data: {json.dumps({'error': {'message': message, 'type': error_type, 'code': status}})}\n\n"


def _prompt(chat: dict[str, Any]) -> str:
    return str(chat["messages"][0]["content"])


class _Completion:
    """One completions request: its prompts in turn, each as choice ``index``."""

    def __init__(
        self,
        driver: Driver,
        handler: Any,
        requests: list[Any],
        stops: list[str],
        model: str,
        first: tuple[Any, StopEnding],
    ):
        self.driver, self.handler, self.requests = driver, handler, requests
        self.stops, self.model, self.first = stops, model, first
        self.id = tr.completion_id()
        self.prompt_tokens = self.completion_tokens = 0

    async def choices(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(index, text, None) as text arrives, then (index, '', finish_reason) per prompt."""
        for index, request in enumerate(self.requests):
            if index == 0:
                chunks, ending = self.first
            else:
                ending = StopEnding(self.handler, self.stops)
                chunks = await self.driver.primed(self.handler, request, ending, request.messages[0].content)
            scanner = tr.StopScanner(self.stops)
            usage = tr.Usage(0, 0)
            try:
                async for chunk in chunks:
                    for piece in tr.pieces(chunk):
                        if isinstance(piece, tr.Usage):
                            usage = piece
                        elif isinstance(piece, tr.Text | tr.Thinking):
                            text = scanner.feed(piece.text)
                            if text:
                                yield index, text, None
                    if scanner.matched is not None:
                        break  # closing the handler's stream ends the generation now
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
            usage = ending.settle(scanner, usage)
            tail = scanner.flush()
            if tail:
                yield index, tail, None
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens
            stopped = scanner.matched is not None
            limit = request.max_tokens or request.max_completion_tokens
            yield index, "", tr.finish_reason(usage.completion_tokens, limit, stopped)

    async def whole(self) -> dict[str, Any]:
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        async for index, text, reason in self.choices():
            texts.setdefault(index, []).append(text)
            if reason:
                finish[index] = reason
        choices = [
            {"text": "".join(texts[i]), "index": i, "logprobs": None, "finish_reason": finish.get(i)}
            for i in sorted(texts)
        ]
        return {
            "id": self.id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": tr.usage_dict(self.prompt_tokens, self.completion_tokens),
        }

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            async for index, text, reason in self.choices():
                yield f"data: {json.dumps(tr.completion_chunk(self.id, self.model, index, text, reason))}\n\n"
            if include_usage:
                chunk = tr.completion_chunk(self.id, self.model, 0, "", None)
                chunk["choices"] = []
                chunk["usage"] = tr.usage_dict(self.prompt_tokens, self.completion_tokens)
                yield f"data: {json.dumps(chunk)}\n\n"
        except HTTPException as exc:
            yield _sse_error(_detail_message(exc), exc.status_code)
        except Exception as exc:  # the stream has started: the error travels as a chunk
            yield _sse_error(f"{type(exc).__name__}: {exc}", 500)
        yield "data: [DONE]\n\n"
