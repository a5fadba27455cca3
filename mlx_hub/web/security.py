"""Who may call the hub: API keys on every port, and no cross-site control requests.

Keys come from hub.yaml's ``api_keys`` and the ``MLX_HUB_API_KEY`` variable
(several separated by commas). Without keys the hub is open, as a local
server usually is, but a web page on another site still cannot make the
user's browser press the controller's buttons: control POSTs whose Origin is
not the controller itself are refused.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_hub.web.asgi import header
from mlx_hub.web.responses import error_json


def key_accepted(scope: Scope, keys: frozenset[str]) -> bool:
    """Whether the request names one of ``keys`` (either header); True when there are none."""
    if not keys:
        return True
    scheme, _, token = header(scope, b"authorization").partition(" ")
    offered = [token.strip()] if scheme.lower() == "bearer" else []
    offered.append(header(scope, b"x-api-key").strip())
    return any(t and hmac.compare_digest(t.encode(), k.encode()) for t in offered for k in keys)


class ApiKeyGuard:
    """401 unless ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` names a configured key.

    ``x-api-key`` is how Anthropic's clients send their key; either header is accepted on every route.
    """

    def __init__(self, app: ASGIApp, keys: Callable[[], frozenset[str]], open_paths: Callable[[str], bool]):
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or self.open_paths(scope["path"])
            or key_accepted(scope, self.keys())
        ):
            await self.app(scope, receive, send)
            return
        message = (
            "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            " (one of hub.yaml api_keys)"
        )
        await error_json(
            401, message, "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )(scope, receive, send)


class SameOriginGuard:
    """403 for state-changing requests to ``/hub/*`` that a page on another site sent."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] not in ("GET", "HEAD", "OPTIONS")
            and scope["path"].startswith("/hub")
        ):
            reason = self._cross_site(scope)
            if reason:
                await error_json(
                    403,
                    f"cross-site control request refused: {reason}",
                    "invalid_request_error",
                    "cross_site",
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _cross_site(scope: Scope) -> str | None:
        if header(scope, b"sec-fetch-site").lower() == "cross-site":
            return "the browser marked it cross-site"
        origin = header(scope, b"origin")
        if not origin:
            return None  # curl, the CLI, scripts: not a browser page
        host = header(scope, b"host")
        if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
            return f"Origin {origin} is not this hub ({host})"
        return None
