"""Every route the hub's apps serve, once, with what the layers in front of it need to know.

The layers (the key guard, the local-control guard, ``/v1`` routing, the load
gate, the waiting room, the error writer) used to recognise routes by their
own path strings. They now ask :func:`route_of` and read a property: which API
the route speaks (and so which error envelope and stream events it uses),
whether a request to it runs on the model (the gate admits it, loading a JIT
model), whether ``stream: true`` answers server-sent events, whether it needs
an API key, and whether it may show prompts. A test keeps the table equal to
the routes the apps really have.

Upstream's routes are named here for their properties, but whether one exists
is still upstream's router's say (:func:`model_posts`): an older
mlx-openai-server without ``/v1/responses`` forwards no such request.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum


class Api(StrEnum):
    """Which API a route speaks: it picks the error envelope and the stream's error events."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    HUB = "hub"  # the control API and dashboard, under /hub
    PROBE = "probe"  # health, metrics, the API docs: reads outside /hub


class App(StrEnum):
    """Which app serves a route: the controller port, a model's own port, or both."""

    CONTROLLER = "controller"
    MODEL = "model"


BOTH = frozenset(App)
MODEL = frozenset({App.MODEL})
CONTROLLER = frozenset({App.CONTROLLER})
GET = frozenset({"GET"})
POST = frozenset({"POST"})

HEALTH = "/health"
MODELS = "/v1/models"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
TRANSCRIPTIONS = "/v1/audio/transcriptions"


@dataclass(frozen=True)
class Route:
    """One route and what the layers in front of it do with a request to it."""

    path: str  # as the app declares it, ``{name}`` parameters included
    methods: frozenset[str]
    api: Api
    apps: frozenset[App] = BOTH
    loads: bool = False  # runs on the model: the gate admits it (a JIT model loads), /v1 forwards it
    streams: bool = False  # ``stream: true`` answers server-sent events (the waiting room may open them)
    named_events: bool = (
        False  # its stream's events are named (``event: error``), not ``data:`` ... ``[DONE]``
    )
    keyed: bool = True  # needs one of the hub's API keys, where it has any
    private: bool = False  # a read that may show prompts and answers: this machine only, without keys
    upstream: bool = False  # mlx-openai-server's: exists where the installed version has it
    sharded: bool = False  # a sharded entry answers it too (web/rank_proxy.py); others get a 404 unloaded

    def admits(self, method: str) -> bool:
        """A request with ``method`` to this route goes through the gate: it needs the model loaded."""
        return self.loads and method in self.methods


def _inference(path: str, api: Api = Api.OPENAI, **properties: bool) -> Route:
    return Route(path, POST, api, MODEL, loads=True, **properties)


def _control(path: str, methods: frozenset[str] = GET, **properties: bool) -> Route:
    return Route(path, methods, Api.HUB, CONTROLLER, **properties)


TABLE: dict[str, Route] = {
    r.path: r
    for r in (
        Route(HEALTH, GET, Api.PROBE, keyed=False),
        Route(MODELS, GET, Api.OPENAI),
        Route(MODELS + "/{model_id:path}", GET, Api.OPENAI),
        Route("/v1/queue/stats", GET, Api.OPENAI, MODEL, upstream=True),
        _inference(CHAT, streams=True, upstream=True, sharded=True),
        _inference(RESPONSES, streams=True, named_events=True, upstream=True),
        _inference("/v1/embeddings", upstream=True),
        _inference("/v1/images/generations", upstream=True),
        _inference("/v1/images/edits", upstream=True),
        _inference(TRANSCRIPTIONS, upstream=True),
        _inference(COMPLETIONS, streams=True, sharded=True),
        _inference(MESSAGES, Api.ANTHROPIC, streams=True, named_events=True, sharded=True),
        _inference(COUNT_TOKENS, Api.ANTHROPIC, sharded=True),
        Route("/metrics", GET, Api.PROBE, CONTROLLER),
        Route("/openapi.json", GET, Api.PROBE),
        Route("/docs", GET, Api.PROBE),
        Route("/docs/oauth2-redirect", GET, Api.PROBE),
        Route("/redoc", GET, Api.PROBE),
        _control("/hub", keyed=False),  # the dashboard page asks for the key itself
        _control("/hub/", keyed=False),
        _control("/hub/assets/{name}", keyed=False),
        _control("/hub/status"),
        _control("/hub/history"),
        _control("/hub/requests", private=True),
        _control("/hub/events", private=True),
        _control("/hub/logs", private=True),
        _control("/hub/prompt-cache"),
        _control("/hub/prompt-cache/clear", POST),
        _control("/hub/reload", POST),
        _control("/hub/shutdown", POST),
        _control("/hub/models/{name}/{action}", POST),
        _control("/hub/service/{action}", POST),
    )
}
#: The routes with parameters, by the fixed part before the first one.
_PREFIXES = tuple((path.partition("{")[0], route) for path, route in TABLE.items() if "{" in path)


def _unlisted(path: str) -> Route:
    """A path no app serves (a 404 or 405 follows): guarded as its neighbours are, so the answer
    is the same as before the table, and an inference POST the installed upstream added still loads."""
    if path.startswith("/v1/"):
        return Route(path, POST, Api.OPENAI, MODEL, loads=True)
    if path == "/v1":
        return Route(path, frozenset(), Api.OPENAI)
    if path.startswith("/hub"):
        return Route(path, frozenset(), Api.HUB, CONTROLLER)
    return Route(path, frozenset(), Api.PROBE)


def route_of(path: str, app: App = App.MODEL) -> Route:
    """The route a request's path names on ``app`` (a trailing slash aside); one for any path.

    A dictionary lookup for the inference routes: it runs in several layers of every request.
    """
    route = TABLE.get(path) or TABLE.get(path.rstrip("/") or "/")
    if route is None:
        route = next((r for prefix, r in _PREFIXES if path.startswith(prefix)), None)
    if route is None or app not in route.apps:
        return _unlisted(path)
    return route


def api_of(path: str) -> Api:
    """The API a path speaks, on whichever app serves it."""
    return route_of(path, App.CONTROLLER if path.startswith("/hub") else App.MODEL).api


@functools.cache
def model_posts() -> frozenset[str]:
    """The POST paths a model port serves, which the controller's ``/v1`` forwards by ``model``:
    the hub's own, and upstream's as its router has them (imported on the first call: slow)."""
    from app.api.endpoints import router

    upstream = {r.path for r in router.routes if "POST" in getattr(r, "methods", ())}
    return frozenset(upstream) | {r.path for r in TABLE.values() if r.loads and not r.upstream}
