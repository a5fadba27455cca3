"""Without API keys, only this machine may change the hub's state.

hub.yaml's default ``host: 0.0.0.0`` puts the controller on the network. With
no ``api_keys`` anyone who can reach it could stop, load, reload or shut the
hub down: browsers are stopped by the Origin check (``security.SameOriginGuard``),
but curl on another machine is not. So while no key is set, requests that
change state (``/hub/*`` with a method other than GET, HEAD or OPTIONS) are
accepted only from this machine: a loopback address, or the very address the
client reached the hub on (a connection from one of our own addresses to
another of them never leaves the host). So are the reads that show what was
asked and answered: the request log (which keeps prompts and answers with
``request_log_bodies``), the log files and the event stream. Other reads
(status, metrics, history, the dashboard) and the inference routes keep the
reference hub's open default. With keys, the key decides and this guard steps aside.

A reverse proxy on this machine makes every client look local; put keys on a
hub behind one.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .hosts import is_loopback
from .responses import error_json
from .routes import Api, App, route_of

READ_METHODS = ("GET", "HEAD", "OPTIONS")


def is_local_client(scope: Scope) -> bool:
    """Whether the request came from this machine: loopback, or the address it was sent to.

    A scope with no client address (a Unix socket, an in-process call) is local.
    """
    client = scope.get("client")
    if not client:
        return True
    host = str(client[0])
    server = scope.get("server")
    if server and str(server[0]) == host:
        return True
    return is_loopback(host)


def changes_state(scope: Scope) -> bool:
    """A control request that changes the hub: ``/hub/*`` with a writing method."""
    return (
        scope["type"] == "http"
        and scope["method"] not in READ_METHODS
        and route_of(scope["path"], App.CONTROLLER).api is Api.HUB
    )


def reads_private(scope: Scope) -> bool:
    """A request for the request log, a log file or the event stream."""
    return scope["type"] == "http" and route_of(scope["path"], App.CONTROLLER).private


class LocalControlGuard:
    """403 for control requests and private reads from another machine while the hub has no API keys."""

    def __init__(self, app: ASGIApp, keys: Callable[[], frozenset[str]]):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writes = changes_state(scope)
        if (writes or reads_private(scope)) and not self.keys() and not is_local_client(scope):
            client = scope["client"][0]
            what, may = (
                ("control request", "start, stop, load, unload, reload or shut it down")
                if writes
                else (
                    scope["path"],
                    "read its request log, logs and events (they can hold prompts and answers)",
                )
            )
            message = (
                f"{what} from {client} refused: this hub has no api_keys, so only this machine may {may}. "
                "Add api_keys to hub.yaml (or set MLX_HUB_API_KEY) and send the key to do this from elsewhere"
            )
            await error_json(403, message, "permission_error", "api_keys_required")(scope, receive, send)
            return
        await self.app(scope, receive, send)
