"""A model's port: whether something serves its app on ``host:port``, and the server that does.

The port is one of a slot's two state machines (the reference hub's
"process"); the memory is the other (slot.py). The core decides when a port
opens and closes and checks each move against ``PORT_MOVES``; how the app is
served is the ``ServeFactory``'s business (serving.py), which the web layer
hands the hub. A slot built without one has no port to open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mlx_hub.core.ports import PortError
from mlx_hub.core.serving import PortServer, ServeFactory
from mlx_hub.core.states import PORT_MOVES, PortState, StateError


class ModelPort:
    """The port of model ``name``: its state, its last error, the app it serves and that app's server."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        on_change: Callable[[], None],
        serve: ServeFactory | None = None,
    ):
        self.name = name
        self.host = host
        self.port = port
        self.on_change = on_change  # every move calls it: the hub wakes its waiters
        self.state = PortState.INACTIVE
        self.error: str | None = None
        self.changed_at: float | None = None  # wall clock, for people
        self.app: Any = None
        self._serve = serve  # builds the server for the port (the web layer's); None: no port
        self._server: PortServer | None = None

    def move(self, state: PortState, error: str | None = None) -> None:
        """Change the port's state; ``StateError`` if the move is not one ``PORT_MOVES`` allows."""
        if state not in PORT_MOVES[self.state]:
            raise StateError(f"model '{self.name}': port cannot go from {self.state} to {state}")
        self.state = state
        self.error = error
        self.changed_at = time.time()
        self.on_change()

    async def start(self, app: Any) -> None:
        """INACTIVE/FAILED -> STARTING -> RUNNING, serving ``app``; FAILED (and ``PortError``) if it cannot listen."""
        self.move(PortState.STARTING)
        try:
            await self.open(app)
        except (PortError, OSError) as exc:
            self.move(PortState.FAILED, str(exc))
            raise PortError(str(exc)) from None
        self.move(PortState.RUNNING)

    async def open(self, app: Any) -> None:
        """Serve ``app`` on this port; raises ``PortError`` if the port is taken."""
        if self._serve is None:
            raise PortError(f"model '{self.name}': this hub was built without a server for model ports")
        server = self._serve(app, self.host, self.port, name=f"model '{self.name}'")
        await server.start()
        self.app = app
        self._server = server

    async def close(self, timeout: float = 15.0) -> None:
        """Stop accepting, let open requests finish for up to ``timeout`` s, then close."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(timeout)
        self.serve_handler(None)
        self.app = None

    def serve_handler(self, handler: Any) -> None:
        """Make ``handler`` the one the app's upstream routes use (None while no weights are loaded)."""
        if self.app is not None:
            self.app.state.handler = handler
