"""What the core asks of whoever serves a model's app: a server for one ``host:port``, given to it.

The core decides when a model's port opens and closes; it does not know how. The
web layer hands the hub a ``ServeFactory`` (uvicorn in this process, ``web/server.py``)
as it hands it the app factory, so a slot needs no HTTP server to exist and a model
served some other way (its ranks in child processes, a proxy) is a slot like any other.
"""

from __future__ import annotations

from typing import Any, Protocol


class PortServer(Protocol):
    """One app served on one port: ``start`` returns once it listens (``PortError`` if it cannot)."""

    async def start(self) -> None: ...

    async def stop(self, timeout: float = 15.0) -> None: ...


class ServeFactory(Protocol):
    """Builds the server for ``app`` on ``host:port``; ``name`` is what its errors call it."""

    def __call__(self, app: Any, host: str, port: int, *, name: str) -> PortServer: ...
