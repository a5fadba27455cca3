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

from mlx_hub.web.asgi import header, seen
from mlx_hub.web.responses import error_json
from mlx_hub.web.routes import Api, App, route_of


def key_accepted(scope: Scope, keys: frozenset[str]) -> bool:
    """Whether the request names one of ``keys`` (either header); True when there are none.

    Checked once per request: a yes is kept on the scope with the keys it was
    checked against, so the next guard (the model's app behind /v1, the guard
    behind a restoring hub's gate) reads it instead of comparing again.
    """
    state = seen(scope)
    if state.keys is keys:
        return True
    if keys and not _names_one(scope, keys):
        return False
    state.keys = keys
    return True


def _names_one(scope: Scope, keys: frozenset[str]) -> bool:
    scheme, _, token = header(scope, b"authorization").partition(" ")
    offered = [token.strip()] if scheme.lower() == "bearer" else []
    offered.append(header(scope, b"x-api-key").strip())
    return any(t and hmac.compare_digest(t.encode(), k.encode()) for t in offered for k in keys)


class ApiKeyGuard:
    """401 unless ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` names a configured key.

    ``x-api-key`` is how Anthropic's clients send their key; either header is accepted on every route.
    Routes the table marks open (``Route.keyed``) need none. A request /v1 hands to a model's
    app meets this guard twice; the second reads the first's verdict (``key_accepted``).
    """

    def __init__(self, app: ASGIApp, keys: Callable[[], frozenset[str]], served_by: App):
        self.app = app
        self.keys = keys
        self.served_by = served_by

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self._passes(scope):
            await self.app(scope, receive, send)
            return
        message = (
            "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            " (one of hub.yaml api_keys)"
        )
        await error_json(
            401, message, "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )(scope, receive, send)

    def _passes(self, scope: Scope) -> bool:
        return not route_of(scope["path"], self.served_by).keyed or key_accepted(scope, self.keys())


class SameOriginGuard:
    """403 for state-changing requests to ``/hub/*`` that a page on another site sent."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] not in ("GET", "HEAD", "OPTIONS")
            and route_of(scope["path"], App.CONTROLLER).api is Api.HUB
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
