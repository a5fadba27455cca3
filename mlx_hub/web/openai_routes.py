"""``/v1`` on the controller port: one OpenAI endpoint for every model.

The request's ``model`` (an entry's name, served_model_name or model_path) picks the model,
and the request is handed to that model's own app in this process: no HTTP
hop, streams pass straight through, and the model's gate applies JIT loading,
group rules and keep_alive exactly as on its own port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_hub.core.errors import HubError, NotRunningError, UnknownModelError
from mlx_hub.web.asgi import header, replay, request_body
from mlx_hub.web.model_cards import model_card, unknown_model
from mlx_hub.web.responses import error_json, error_response
from mlx_hub.web.routes import MODELS, Api, App, model_posts, route_of

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub
    from mlx_hub.core.slot import ModelSlot


class OpenAIRoutes:
    def __init__(self, app: ASGIApp, hub: Hub):
        self.app = app
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or route_of(scope["path"], App.CONTROLLER).api not in (Api.OPENAI, Api.ANTHROPIC)
        ):
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD"):
            path = scope["path"].rstrip("/")
            if path == MODELS:
                await JSONResponse(self.models())(scope, receive, send)
            elif path.startswith(MODELS + "/"):
                await self.model(path[len(MODELS) + 1 :])(scope, receive, send)
            else:
                await self.app(scope, receive, send)  # 404 in the OpenAI envelope
            return
        if scope["path"] not in model_posts():
            message = (
                f"no route {scope['method']} {scope['path']}; see GET /v1/models and the OpenAI API paths"
            )
            await error_json(404, message, "invalid_request_error", "not_found")(scope, receive, send)
            return
        if (await request_body(scope, receive)).gone:
            return
        try:
            slot = await self._target(scope, receive)
        except HubError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await slot.app(scope, receive, send)  # the body is on the scope: the model's app reads it there

    def models(self) -> dict[str, Any]:
        """Every configured model, loaded or not, with the hub's view of it."""
        data = [model_card(slot, slot.name, "mlx-openai-server-hub") for slot in self.hub.slots.values()]
        return {"object": "list", "data": data}

    def model(self, requested: str) -> Response:
        """One card, for any name the model answers to (``models.retrieve``); loads nothing."""
        slot = self.hub.find(requested)
        if slot is None:
            return unknown_model(requested, ", ".join(self.hub.slots) or "none")
        return JSONResponse(model_card(slot, slot.name, "mlx-openai-server-hub"))

    async def _target(self, scope: Scope, receive: Receive) -> ModelSlot:
        requested = await self._requested_model(scope, receive)
        available = ", ".join(self.hub.slots) or "none"
        if not requested:
            raise UnknownModelError(f"the request names no 'model'; this endpoint serves: {available}")
        slot = self.hub.find(requested)
        if slot is None:
            raise UnknownModelError(
                f"model '{requested}' not found; available models: {available}", model=requested
            )
        if slot.app is None:
            if not slot.entry.jit_enabled:
                raise NotRunningError(
                    f"model '{slot.name}' is not started; start it with "
                    f"`mlx-openai-server-hub start-model {slot.name}`",
                    model=slot.name,
                )
            await self.hub.start_model(slot.name)  # JIT: the first request starts and loads it
        return slot

    @staticmethod
    async def _requested_model(scope: Scope, receive: Receive) -> str | None:
        body = await request_body(scope, receive)
        if body.data is not None:
            value = body.data.get("model")
        elif header(scope, b"content-type").startswith("multipart/form-data"):  # audio, image edits
            async with Request(scope, replay(body.raw, receive)).form() as form:
                value = form.get("model")
        else:
            return None
        return value if isinstance(value, str) else None
