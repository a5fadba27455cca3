"""One way to write an error, used by every app: OpenAI's ``{"error": {...}}`` envelope,
or Anthropic's ``{"type": "error", "error": {...}}`` on the Anthropic routes.

The envelope is picked when the response is sent, from the request's path, so
whatever refuses a request (the key guard, the gate, the controller's router)
answers an Anthropic client in the shape its SDK reads.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from mlx_hub.core.errors import HubError
from mlx_hub.web.routes import Api, api_of
from mlx_hub.web.translate import error_body


class ErrorResponse(JSONResponse):
    """A JSON error that rewrites itself into Anthropic's envelope on an Anthropic path."""

    def __init__(self, body: dict[str, Any], status: int, headers: dict[str, str] | None = None):
        super().__init__(body, status_code=status, headers=headers)
        self.message = str(body["error"]["message"])
        self.code = body["error"].get("code")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http" and api_of(scope.get("path", "")) is Api.ANTHROPIC:
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "content-type")
            }
            anthropic = JSONResponse(
                error_body(self.status_code, self.message, self.code), self.status_code, headers
            )
            await anthropic(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def error_json(
    status: int,
    message: str,
    error_type: str,
    code: str | int | None,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return ErrorResponse(body, status, headers)


def error_response(exc: HubError) -> JSONResponse:
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else None
    return error_json(
        exc.status,
        exc.message,
        exc.error_type,
        exc.code,
        param="model" if exc.model else None,
        headers=headers,
    )
