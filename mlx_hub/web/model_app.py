"""The app on a model's own port: upstream's OpenAI routes, unchanged, behind a gate.

Upstream endpoints find their handler in ``app.state.handler``; the hub sets
it on load and clears it on unload. The gate in front makes the routes JIT-
and group-aware without touching them: it waits for (or triggers) the load,
and counts the request as in flight until its last byte is sent, which for a
stream means until the stream ends or the client goes away.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import HubError, InvalidKeepAliveError
from ..logs import current_model
from ..metrics import ResponseWatch
from ..policy import parse_keep_alive
from .asgi import is_json, json_object, read_body, replay, with_length
from .responses import error_response
from .security import ApiKeyGuard

if TYPE_CHECKING:
    from ..hub import Hub
    from ..slot import ModelSlot


def _gated(scope: Scope) -> bool:
    """Inference routes need weights; listings and health checks must not trigger a load."""
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1/")


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
        if not _gated(scope):
            await self.app(scope, receive, send)
            return
        token = current_model.set(self.slot.name)  # upstream's lines for this request go to its log
        watch = ResponseWatch(send)
        try:
            keep_alive = None
            if is_json(scope):
                body, gone = await read_body(receive)
                if gone:
                    return
                data = json_object(body)
                if data is not None and "keep_alive" in data:
                    try:
                        keep_alive = parse_keep_alive(data.pop("keep_alive"))
                    except ValueError as exc:
                        error = InvalidKeepAliveError(str(exc), model=self.slot.name)
                        await error_response(error)(scope, receive, watch.send)
                        return
                    body = json.dumps(data).encode()
                    scope = with_length(scope, len(body))
                receive = replay(body, receive)
            try:
                await self.hub.acquire(self.slot)
            except HubError as exc:
                await error_response(exc)(scope, receive, watch.send)
                return
            try:
                await self.app(scope, receive, watch.send)
            finally:
                self.hub.release(self.slot, keep_alive=keep_alive)
        finally:
            current_model.reset(token)
            self.hub.metrics.request(self.slot.name, scope["path"], watch.status, watch.tokens)


def _model_card(slot: ModelSlot) -> dict[str, Any]:
    return {
        "id": slot.entry.model_path,
        "object": "model",
        "created": int(slot.memory_changed_at or time.time()),
        "owned_by": "local",
    }


def build_model_app(hub: Hub, slot: ModelSlot) -> FastAPI:
    """A fresh app for one model port."""
    from app.api.endpoints import router  # upstream; imported here because it is slow (~1.5 s)

    app = FastAPI(
        title=f"{slot.name} (mlx-openai-server-hub)",
        description=f"OpenAI-compatible API for model '{slot.name}', served by mlx-openai-server-hub.",
    )
    app.state.handler = slot.handler

    # Defined before upstream's router so these win: upstream answers 503 while
    # no handler is attached, but an unloaded JIT model is healthy and listed.
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_id": slot.entry.model_path,
            "model_status": "loaded" if slot.handler is not None else "unloaded",
            "memory_state": slot.memory_state.value,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        handler = slot.handler
        if handler is not None and hasattr(handler, "get_models"):
            data = await handler.get_models()
        else:
            data = [_model_card(slot)]
        return {"object": "list", "data": data}

    app.include_router(router)
    app.add_middleware(LoadGate, hub=hub, slot=slot)
    app.add_middleware(ApiKeyGuard, keys=lambda: hub.api_keys, open_paths=lambda path: path == "/health")
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    return app
