"""The controller port: health, status and the control API that the CLI and dashboard use.

Every answer is JSON; every error, including FastAPI's own 404 and 422, uses
the OpenAI error envelope, so one client-side reader handles them all.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from mlx_hub.config import ConfigError
from mlx_hub.core.errors import HubError
from mlx_hub.core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mlx_hub.core.status import HubStatus
from mlx_hub.version import __version__
from mlx_hub.web.activity import activity_router
from mlx_hub.web.dashboard import ASSETS, asset
from mlx_hub.web.hosts import HostGuard
from mlx_hub.web.local_control import LocalControlGuard
from mlx_hub.web.openai_routes import OpenAIRoutes
from mlx_hub.web.prompt_cache_routes import prompt_cache_router
from mlx_hub.web.responses import error_json, error_response
from mlx_hub.web.routes import App
from mlx_hub.web.security import ApiKeyGuard, SameOriginGuard

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub

log = logging.getLogger(__name__)


class ModelAction(StrEnum):
    start = "start"
    stop = "stop"
    load = "load"
    unload = "unload"


class ServiceAction(StrEnum):
    start = "start"
    stop = "stop"
    reload = "reload"


class ActionResult(BaseModel):
    status: str
    name: str


class ReloadResult(BaseModel):
    started: list[str]
    stopped: list[str]
    unchanged: list[str]
    failed: dict[str, str] = {}  # models that should have started and did not: name -> why


class ServiceResult(BaseModel):
    status: str
    models: list[str] = []
    failed: dict[str, str] = {}  # start: models that did not start, name -> why
    reload: ReloadResult | None = None


class Health(BaseModel):
    status: str
    pid: int
    version: str
    ready: bool
    uptime_seconds: float
    supervisor_pid: int | None = None  # the parent that restarts the hub after a crash
    restarts: int = 0


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope, "description": text}
    for code, text in (
        (400, "hub.yaml does not validate"),
        (404, "unknown model"),
        (409, "model not started, or its port is taken"),
        (429, "the model's group is at max_loaded and every member is busy"),
        (503, "the model failed to load"),
    )
}


def build_controller_app(hub: Hub, *, request_shutdown: Callable[[], None]) -> ASGIApp:
    """The app on the hub's own ``host:port``; ``request_shutdown`` ends the daemon.

    Layers, outside in: the Host check, API keys, this machine only for control
    and the request log without keys, the cross-site check, ``/v1`` routing by
    model, then the control API below.
    """
    app = _control_app(hub, request_shutdown)
    app.include_router(activity_router(hub))  # /hub/requests, /hub/events, /hub/history, /hub/logs
    routed = OpenAIRoutes(app, hub)
    local = LocalControlGuard(SameOriginGuard(routed), keys=lambda: hub.api_keys)
    keyed = ApiKeyGuard(local, keys=lambda: hub.api_keys, served_by=App.CONTROLLER)
    return HostGuard(keyed, hosts=lambda: (hub.config.host, *hub.config.allowed_hosts))


def _control_app(hub: Hub, request_shutdown: Callable[[], None]) -> FastAPI:
    app = FastAPI(
        title="mlx-openai-server-hub",
        version=__version__,
        description="Control API of an mlx-openai-server-hub: status, model start/stop/load/unload, reload.",
    )
    _answer_errors(app)
    app.include_router(_page_router(hub))
    app.include_router(_control_router(hub, request_shutdown))
    app.include_router(prompt_cache_router(hub, ERRORS))
    return app


def _answer_errors(app: FastAPI) -> None:
    """Every failure answers in OpenAI's error envelope, with a status that says whose fault it was."""

    @app.exception_handler(HubError)
    async def hub_error(_: Request, exc: HubError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, exc: ConfigError) -> JSONResponse:
        message = "hub.yaml was not applied; the running config keeps serving:\n" + "\n".join(exc.problems)
        return error_json(400, message, "invalid_request_error", "config_invalid")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("controller request failed")
        return error_json(500, f"{type(exc).__name__}: {exc}", "server_error", "internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_json(exc.status_code, str(exc.detail), "invalid_request_error", exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_json(422, f"{where}: {first['msg']}", "invalid_request_error", "invalid_request")


def _page_router(hub: Hub) -> APIRouter:
    """What a browser or a probe reads: /health, the dashboard and its assets, /metrics."""
    router = APIRouter()
    started = time.monotonic()

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(
            status="ok",
            pid=os.getpid(),
            version=__version__,
            ready=hub.ready,
            uptime_seconds=round(time.monotonic() - started, 1),
            supervisor_pid=hub.supervision.supervisor_pid if hub.supervision is not None else None,
            restarts=hub.supervision.restarts if hub.supervision is not None else 0,
        )

    @router.get("/hub", include_in_schema=False)
    @router.get("/hub/", include_in_schema=False)
    async def dashboard() -> Response:
        if not hub.config.enable_status_page:
            return error_json(
                404, "the status page is disabled (enable_status_page: false)", "invalid_request_error", 404
            )
        return Response(
            asset("index.html"), media_type=ASSETS["index.html"], headers={"Cache-Control": "no-cache"}
        )

    @router.get("/hub/assets/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        if not hub.config.enable_status_page or name not in ASSETS or name == "index.html":
            return error_json(404, f"no asset named {name!r}", "invalid_request_error", 404)
        return Response(asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @router.get("/metrics", include_in_schema=True, response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format: states, memory, requests, loads, unloads, tokens."""
        return Response(hub.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return router


def _control_router(hub: Hub, request_shutdown: Callable[[], None]) -> APIRouter:
    """The control API: status, reload, shutdown, and the per-model and service actions."""
    router = APIRouter()

    @router.get("/hub/status", response_model=HubStatus)
    async def status() -> HubStatus:
        return hub.status_document()

    @router.post("/hub/reload", response_model=ReloadResult, responses=ERRORS)
    async def reload() -> dict[str, Any]:
        return await hub.reload()

    @router.post("/hub/shutdown")
    async def shutdown() -> dict[str, str]:
        request_shutdown()
        return {"status": "shutting_down"}

    @router.post("/hub/models/{name}/{action}", response_model=ActionResult, responses=ERRORS)
    async def model_action(name: str, action: ModelAction) -> ActionResult:
        method = {
            ModelAction.start: hub.start_model,
            ModelAction.stop: hub.stop_model,
            ModelAction.load: hub.load,
            ModelAction.unload: hub.unload,
        }[action]
        return ActionResult(status=await method(name), name=name)

    @router.post("/hub/service/{action}", response_model=ServiceResult, responses=ERRORS)
    async def service_action(action: ServiceAction) -> ServiceResult:
        """The dashboard's buttons: start the startup models not running, stop every model, or reload."""
        if action is ServiceAction.start:
            started, failed = await hub.start_defaults()
            return ServiceResult(status="started", models=started, failed=failed)
        if action is ServiceAction.stop:
            return ServiceResult(status="stopped", models=await hub.stop_all())
        return ServiceResult(status="reloaded", reload=ReloadResult(**await hub.reload()))

    return router
