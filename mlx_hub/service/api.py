"""The hub as a library user gets it: ``mlx_hub.Hub``, the whole hub from Python.

The core ``hub.Hub`` is told which app to serve on each model port, so it never
imports the web layer; this top-layer subclass supplies the one the daemon uses,
and can serve the controller (dashboard, control API, ``/v1``, ``/metrics``) on
the config's ``host:port`` or hand it over as an ASGI app to mount elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.types import ASGIApp

from mlx_hub.config import HubConfig
from mlx_hub.core.hub import Hub as CoreHub
from mlx_hub.engine.mlx import MLXEngine
from mlx_hub.web.controller import build_controller_app
from mlx_hub.web.model_app import build_model_app
from mlx_hub.web.server import AppServer


class Hub(CoreHub):
    """A ``hub.Hub`` whose model ports serve upstream's routes (``web.model_app``).

    ``controller=True``: ``start()`` also opens the controller on hub.yaml's
    ``host:port``, as the daemon does, and ``shutdown()`` closes it.
    ``hub.asgi`` is that controller as an ASGI app, for a FastAPI or Starlette
    app of your own to mount (``app.mount("/", hub.asgi)``).
    """

    default_engine = MLXEngine

    def __init__(
        self,
        config: HubConfig,
        *,
        controller: bool = False,
        request_shutdown: Callable[[], None] | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("app_factory", build_model_app)
        kwargs.setdefault("serve", AppServer)
        super().__init__(config, **kwargs)
        self.controller = controller
        self.request_shutdown = request_shutdown or self._shutdown_soon  # what POST /hub/shutdown does
        self._asgi: ASGIApp | None = None
        self._controller_server: AppServer | None = None

    @property
    def asgi(self) -> ASGIApp:
        """The controller app (built once): ``/hub/`` dashboard, ``/hub/*``, ``/v1``, ``/metrics``, ``/health``."""
        if self._asgi is None:
            self._asgi = build_controller_app(self, request_shutdown=self.request_shutdown)
        return self._asgi

    def wrap_controller(self, layer: Callable[[ASGIApp], ASGIApp]) -> None:
        """Put ``layer`` around the controller app (before it serves): the supervisor's restore gate."""
        self._asgi = layer(self.asgi)

    async def open_controller(self) -> None:
        """Serve the controller on hub.yaml's ``host:port``; a taken port is a PortError naming it."""
        if self._controller_server is None:
            server = AppServer(self.asgi, self.config.host, self.config.port, name="controller")
            await server.start()
            self._controller_server = server

    async def start(
        self,
        names: Iterable[str] | None = None,
        *,
        before_ready: Callable[[CoreHub], Awaitable[None]] | None = None,
    ) -> list[str]:
        if self.controller:
            await self.open_controller()  # before any model loads
        return await super().start(names, before_ready=before_ready)

    async def shutdown(self, *, drain_timeout: float | None = None) -> None:
        self.activity.close_streams()  # an open dashboard's event stream must not hold the controller
        server, self._controller_server = self._controller_server, None
        if server is not None:
            await server.stop(timeout=2.0)
        await super().shutdown(drain_timeout=drain_timeout)

    def _shutdown_soon(self) -> None:
        """``POST /hub/shutdown``: answer first, then stop everything."""
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, lambda: self.spawn(self.shutdown(), "hub:shutdown"))
