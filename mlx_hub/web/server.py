"""Serving one ASGI app on one port as a task in the hub's event loop (the hub's ``ServeFactory``).

Every model port and the controller port are one of these. The socket is
bound before uvicorn sees it, so a taken port is a ``PortError`` naming the
port rather than uvicorn's ``sys.exit`` inside the shared loop, and uvicorn
installs no signal handlers: the hub owns shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import uvicorn

from mlx_hub.core.ports import bind_socket, release_socket

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class AppServer:
    """Start with ``start``; ``stop`` lets open requests finish for a bounded time."""

    def __init__(self, app: Any, host: str, port: int, *, name: str):
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = bind_socket(self.host, self.port)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # uvicorn must not reconfigure the hub's logging per port
            access_log=False,
            timeout_graceful_shutdown=10,
            timeout_keep_alive=30,
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name=f"serve:{self.name}")
        while not server.started:
            if self._task.done():
                sock.close()
                release_socket(self.host, self.port)
                raise OSError(
                    f"the server for {self.name} stopped while starting: {self._task.exception()!r}"
                )
            await asyncio.sleep(0.005)

    async def stop(self, timeout: float = 15.0) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            server.force_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        except Exception:
            log.exception("%s: its server ended with an error", self.name)
        finally:
            release_socket(self.host, self.port)
