"""The app on a model's own port: upstream's OpenAI routes, unchanged, behind a gate.

Upstream's ``launch`` serves every model through a ``ModelRegistry``: its
endpoints look the request's ``model`` up there (404 ``model_not_found`` for a
name it does not serve) and fall back to ``app.state.handler`` when ``model``
is omitted. The hub attaches a registry of one slot that answers to the same
names plus the entry's own, so the routes resolve, name and refuse exactly as
upstream's do. The gate in front makes the routes JIT-
and group-aware without touching them: it waits for (or triggers) the load,
and counts the request as in flight until its last byte is sent, which for a
stream means until the stream ends or the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_hub.core import admission
from mlx_hub.core.errors import InvalidKeepAliveError, MemoryExhaustedError, StoppedError
from mlx_hub.core.logs import current_model
from mlx_hub.core.policy import parse_keep_alive
from mlx_hub.core.slot import PortState
from mlx_hub.engine.base import ALLOCATION_ERRORS, is_allocation_error
from mlx_hub.web.asgi import BodyReplay, is_json, request_body, rewrite_body, seen
from mlx_hub.web.finish import LengthFinish
from mlx_hub.web.hosts import HostGuard
from mlx_hub.web.model_cards import model_card, names_another, unknown_model
from mlx_hub.web.peer_apis import add_peer_routes
from mlx_hub.web.rank_proxy import add_rank_routes
from mlx_hub.web.response_watch import ResponseWatch
from mlx_hub.web.responses import error_response
from mlx_hub.web.routes import COMPLETIONS, COUNT_TOKENS, App, Route, route_of
from mlx_hub.web.security import ApiKeyGuard
from mlx_hub.web.tracing import request_trace
from mlx_hub.web.transcripts import Transcripts
from mlx_hub.web.waiting import Listening, WaitingRoom, client_left, streams

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub
    from mlx_hub.core.slot import ModelSlot, Reservation


class SlotRegistry:
    """The part of upstream's ``ModelRegistry`` its endpoints call, for one slot.

    Lookups never load anything: the gate has already loaded the model for a
    name this slot answers to, and a name it does not answer to raises the
    ``KeyError`` upstream's registry raises, with the same message.
    """

    def __init__(self, slot: ModelSlot):
        self.slot = slot

    def has_model(self, model_id: str) -> bool:
        return self.slot.entry.answers_to(model_id)

    def get_handler(self, model_id: str) -> Any:
        if not self.has_model(model_id):
            available = ", ".join(self.list_model_ids()) or "(none)"
            raise KeyError(f"Model '{model_id}' not found in registry. Available models: {available}")
        return self.slot.handler

    def list_model_ids(self) -> list[str]:
        return [self.slot.entry.served_name]

    def get_model_count(self) -> int:
        return 0 if self.slot.handler is None else 1

    def list_models(self) -> list[dict[str, Any]]:
        """Upstream's model card (served name, load time, ``local``), plus the hub's view beside it."""
        return [model_card(self.slot, self.slot.entry.served_name, "local")]


def with_request_params(data: dict[str, Any], params: dict[str, Any] | None) -> bool:
    """Fill in the entry's ``request_params`` the request leaves out; True if any was added.

    A request's own value always wins, as with upstream's sampling defaults.
    """
    missing = {k: v for k, v in (params or {}).items() if k not in data}
    data.update(missing)
    return bool(missing)


def reserving(route: Route, data: dict[str, Any] | None, entry: Any) -> dict[str, Any] | None:
    """The body a request's memory is reserved for, as its route will run it.

    Counting tokens generates nothing; a completion without ``max_tokens``
    generates OpenAI's 16 (or the entry's default), not an open-ended answer.
    """
    if data is None or route.path == COUNT_TOKENS:
        return None
    if route.path == COMPLETIONS and not any(data.get(k) for k in ("max_tokens", "max_completion_tokens")):
        from mlx_hub.web.translate import OPENAI_MAX_TOKENS

        return {**data, "max_tokens": entry.default_max_tokens or OPENAI_MAX_TOKENS}
    return data


def _gated(route: Route, method: str, slot: ModelSlot) -> bool:
    """Inference routes need weights; listings, health checks and routes the entry lacks must not load it."""
    return route.admits(method) and (slot.entry.distributed is None or route.sharded)


class LoadGate:
    """ASGI middleware: ensure loaded, count in flight, stamp last use, note the outcome.

    It also takes the hub's own per-request option, ``keep_alive``, out of a
    JSON body before upstream's route (which would reject it) sees the body.
    """

    def __init__(self, app: ASGIApp, hub: Hub, slot: ModelSlot):
        self.app = app
        self.hub = hub
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_of(scope["path"]) if scope["type"] == "http" else None
        if route is None or not _gated(route, scope["method"], self.slot):
            await self.app(scope, receive, send)
            return
        token = current_model.set(self.slot.name)  # upstream's lines for this request go to its log
        trace = request_trace(self.hub.activity, self.slot.name, self.slot.port, scope)  # for the request log
        read = seen(scope).body is not None  # by /v1, which routed it here by its ``model``
        receive, watch = trace.receive(receive), trace.send(send)
        try:
            keep_alive, data = None, None
            if is_json(scope):
                body = await request_body(scope, receive)
                if read:
                    trace.keep_body(body.raw)  # not read through the trace, which keeps what the client sent
                if body.gone:
                    return
                data = body.data
                if data is not None and names_another(data.get("model"), self.slot.entry):
                    await self.app(scope, receive, watch.send)  # upstream's route answers 404, nothing loads
                    return
                try:
                    keep_alive, scope = self._own_options(scope, data)
                except InvalidKeepAliveError as error:
                    await error_response(error)(scope, receive, watch.send)
                    return
            listen = receive if seen(scope).body is not None else None  # past the body: a disconnect
            room = WaitingRoom(self.hub, self.slot, scope, watch.send, streams(route, data))
            reserved = await room.acquire(reserving(route, data, self.slot.entry), listen)
            if reserved is None:
                return  # the client left, or its refusal has been sent
            trace.admitted()
            await self._serve(scope, receive, room, watch, reserved, keep_alive)
        finally:
            current_model.reset(token)
            self.hub.metrics.request(self.slot.name, scope["path"], watch.status, watch.tokens)
            trace.finish()

    def _own_options(self, scope: Scope, data: dict[str, Any] | None) -> tuple[float | None, Scope]:
        """Take ``keep_alive`` out of the body and fill in the entry's ``request_params``: the keep_alive,
        and the scope the route gets (the body re-encoded only where it changed)."""
        if data is None:
            return None, scope
        keep_alive = None
        edited = "keep_alive" in data
        if edited:
            try:
                keep_alive = parse_keep_alive(data.pop("keep_alive"))
            except ValueError as exc:
                raise InvalidKeepAliveError(str(exc), model=self.slot.name) from None
        if with_request_params(data, self.slot.entry.request_params):
            edited = True
        return keep_alive, rewrite_body(scope, data) if edited else scope

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        room: WaitingRoom,
        watch: ResponseWatch,
        reserved: Reservation,
        keep_alive: float | None,
    ) -> None:
        """Run the route for an admitted request, counted in flight until its last byte or its client leaves."""
        task = asyncio.current_task()
        self.slot.requests.add(task)
        guard = AllocationGuard(room.send, self.slot.name, scope)
        heard = Listening(receive)
        try:
            await self.app(scope, heard.receive, guard.send)
        except asyncio.CancelledError:
            # The hub cancels what is still running when a stop's drain time is up.
            if self.slot.port_state is PortState.STOPPING and not room.answered(watch.started):
                stopped = StoppedError(
                    f"model '{self.slot.name}' was stopped before it answered", model=self.slot.name
                )
                with contextlib.suppress(Exception):
                    await room.send_error(error_response(stopped))
            raise
        finally:
            self.slot.requests.discard(task)
            admission.release(self.hub, self.slot, keep_alive=keep_alive, reserved=reserved)
            if heard.left and not watch.complete:
                client_left(self.hub, self.slot, "generating")
            if guard.failed:
                admission.allocation_failed(self.hub, self.slot)


class AllocationGuard:
    """Wraps ``send``: MLX failing to allocate inside a request fails it, as 503, not the hub.

    On a model that batches, upstream fails every request of the batch step
    that failed (one forward pass serves them all); each gets this treatment.

    Upstream answers a generation error with 500 (a JSON body) or, mid-stream,
    with an error event before the stream's end; both carry MLX's message. A
    500 whose body is an allocation error becomes 503 ``memory_exhausted`` with
    Retry-After; a stream keeps its error event (the status line has gone out)
    and ends as upstream ends it. Either way ``failed`` tells the gate to free
    the request's memory.
    """

    def __init__(self, send: Send, model: str, scope: Scope):
        self._send = send
        self.model = model
        self.scope = scope  # the request's: the 503 is written in its API's envelope
        self.failed = False
        self._status: int | None = None
        self._held: dict[str, Any] | None = None  # a 500's start, until its body says what failed

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
            if self._status == 500:
                self._held = message
                return
        if message["type"] == "http.response.body":
            text = message.get("body", b"").decode("utf-8", "replace")
            # Only an error says so: a 500's body or a stream's error event, never generated text.
            if (self._status == 500 or '"error"' in text) and is_allocation_error(text):
                self.failed = True
            if self._held is not None:
                start, self._held = self._held, None
                if self.failed and not message.get("more_body", False):
                    error = MemoryExhaustedError(
                        f"model '{self.model}' ran out of memory during this request ({_first_line(text)}); "
                        "its memory was freed and the hub and its other requests go on. Retry later, "
                        "or send a shorter prompt or smaller max_tokens.",
                        model=self.model,
                    )
                    await error_response(error)(self.scope, _no_receive, self._send)
                    return
                await self._send(start)
        await self._send(message)


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def _first_line(text: str) -> str:
    for marker in ALLOCATION_ERRORS:
        at = text.find(marker)
        if at >= 0:
            return text[at : at + 200].split('"')[0].split("\\n")[0].strip()
    return "allocation failed"


def build_model_app(hub: Hub, slot: ModelSlot) -> FastAPI:
    """A fresh app for one model port."""
    from app.api.endpoints import router  # upstream; imported here because it is slow (~1.5 s)

    app = FastAPI(
        title=f"{slot.name} (mlx-openai-server-hub)",
        description=f"OpenAI-compatible API for model '{slot.name}', served by mlx-openai-server-hub.",
    )
    app.state.handler = slot.handler
    app.state.registry = registry = SlotRegistry(slot)

    # Defined before upstream's router so these win: upstream answers 503 while
    # no handler is attached, but an unloaded JIT model is healthy and listed.
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_id": slot.entry.served_name,
            "model_status": "loaded" if slot.handler is not None else "unloaded",
            "memory_state": slot.memory_state.value,
            "hub_name": slot.name,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": registry.list_models()}

    @app.get("/v1/models/{model_id:path}", response_model=None)
    async def model(model_id: str) -> Any:
        if not registry.has_model(model_id):
            return unknown_model(model_id, slot.entry.served_name)
        return model_card(slot, slot.entry.served_name, "local")

    app.add_middleware(BodyReplay)  # innermost: the route reads the body a layer before it has read
    if slot.entry.distributed is not None:
        add_rank_routes(app, slot)  # its ranks serve it: forwarded to rank 0 (web/rank_proxy.py)
    else:
        add_peer_routes(app, slot)  # Anthropic Messages and /v1/completions, which upstream lacks
        app.include_router(router)
        app.add_middleware(LengthFinish, handler=lambda: slot.handler)  # inside the gate: once admitted
        app.add_middleware(Transcripts, slot=slot)
    app.add_middleware(LoadGate, hub=hub, slot=slot)
    app.add_middleware(ApiKeyGuard, keys=lambda: hub.api_keys, served_by=App.MODEL)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(HostGuard, hosts=lambda: (hub.config.host, slot.host, *hub.config.allowed_hosts))
    return app
