"""The app on a model's own port: upstream's OpenAI routes, unchanged, behind a gate.

Upstream endpoints find their handler in ``app.state.handler``; the hub sets
it on load and clears it on unload. The gate in front makes the routes JIT-
and group-aware without touching them: it waits for (or triggers) the load,
and counts the request as in flight until its last byte is sent, which for a
stream means until the stream ends or the client goes away.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import HubError
from ..logs import current_model
from .responses import error_response

if TYPE_CHECKING:
    from ..hub import Hub
    from ..slot import ModelSlot


def _gated(scope: Scope) -> bool:
    """Inference routes need weights; listings and health checks must not trigger a load."""
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1/")


class LoadGate:
    """ASGI middleware: ensure loaded, count in flight, stamp last use."""

    def __init__(self, app: ASGIApp, hub: Hub, slot: ModelSlot):
        self.app = app
        self.hub = hub
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _gated(scope):
            await self.app(scope, receive, send)
            return
        token = current_model.set(self.slot.name)  # upstream's lines for this request go to its log
        try:
            try:
                await self.hub.acquire(self.slot)
            except HubError as exc:
                await error_response(exc)(scope, receive, send)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self.hub.release(self.slot)
        finally:
            current_model.reset(token)


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
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    return app
