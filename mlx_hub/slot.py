"""One model's place in the hub: its port, its weights, and who is using it.

A slot has two independent state machines. The *port* (the reference hub's
"process") is whether its uvicorn server listens; the *memory* is whether the
weights are resident. A JIT model's port runs with no weights, and a request
loads them. Counters of running and waiting requests are what keep a model
from being unloaded under a client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum
from typing import Any

from .config import ModelConfig
from .engine import Loaded
from .policy import Candidate
from .server import AppServer

log = logging.getLogger(__name__)


class PortState(StrEnum):
    INACTIVE = "inactive"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


class MemoryState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


#: Memory states in which a model holds (or is about to hold) a place in its group.
OCCUPYING = (MemoryState.LOADING, MemoryState.LOADED, MemoryState.UNLOADING)


class ModelSlot:
    """State and serving machinery for one hub.yaml entry."""

    def __init__(self, entry: ModelConfig, port: int, host: str):
        self.entry = entry
        self.port = port
        self.host = host
        self.port_state = PortState.INACTIVE
        self.memory_state = MemoryState.UNLOADED
        self.port_error: str | None = None
        self.memory_error: str | None = None
        self.memory_changed_at: float | None = None  # wall clock, for people
        self.port_changed_at: float | None = None
        self.handler: Any = None
        self.app: Any = None
        self.active = 0  # requests the handler is serving now
        self.waiting = 0  # requests waiting for a load or a group place
        self.requests: set[asyncio.Task[Any]] = set()  # tasks serving the active requests, for a forced stop
        self.last_used = time.monotonic()
        self.memory_bytes = 0
        self.estimate = 0  # bytes a load is expected to add, from the weight files
        self.keep_alive: float | None = None  # a request's keep_alive, for this residency
        self.load_seconds: float | None = None
        self.freed_bytes: int | None = None
        self.load_count = 0
        self.load_task: asyncio.Task[None] | None = None
        self.unload_task: asyncio.Task[None] | None = None
        self.op_lock = asyncio.Lock()  # start/stop of this one model, one at a time
        self._server: AppServer | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    # ------------------------------------------------------------------ state

    def set_memory(self, state: MemoryState, error: str | None = None) -> None:
        self.memory_state = state
        self.memory_error = error if state is MemoryState.FAILED else self.memory_error
        self.memory_changed_at = time.time()

    def set_port(self, state: PortState, error: str | None = None) -> None:
        self.port_state = state
        self.port_error = error
        self.port_changed_at = time.time()

    @property
    def busy(self) -> bool:
        """In use or mid-transition: not a candidate for eviction or idle unload."""
        return (
            self.active > 0
            or self.waiting > 0
            or self.memory_state in (MemoryState.LOADING, MemoryState.UNLOADING)
        )

    @property
    def idle_timeout(self) -> float | None:
        """Seconds idle before unloading: a request's keep_alive wins over the config."""
        if self.keep_alive is not None:
            return None if self.keep_alive == float("inf") else self.keep_alive
        minutes = self.entry.auto_unload_minutes
        return None if minutes is None else minutes * 60.0

    def candidate(self) -> Candidate:
        return Candidate(
            name=self.name,
            loaded=self.memory_state in OCCUPYING,
            busy=self.busy,
            last_used=self.last_used,
            group=self.entry.group,
            jit=self.entry.jit_enabled,
            auto_unload_seconds=self.idle_timeout,
            size=self.memory_bytes if self.memory_state is MemoryState.LOADED else self.estimate,
            pinned=self.entry.pinned,
        )

    def touch(self) -> None:
        self.last_used = time.monotonic()

    # ---------------------------------------------------------------- weights

    def attach(self, loaded: Loaded) -> None:
        """Make a freshly loaded handler the one the upstream routes use."""
        self.handler = loaded.handler
        if self.app is not None:
            self.app.state.handler = loaded.handler
        self.memory_bytes = loaded.memory_bytes
        self.load_seconds = loaded.load_seconds
        self.load_count += 1
        self.memory_error = None
        self.touch()
        self.set_memory(MemoryState.LOADED)

    def detach(self) -> Any:
        """Drop every reference the hub holds to the handler and hand it over for cleanup."""
        handler, self.handler = self.handler, None
        if self.app is not None:
            self.app.state.handler = None
        return handler

    # ------------------------------------------------------------------- port

    async def open_port(self, app: Any) -> None:
        """Serve ``app`` on this slot's port; raises ``PortError`` if the port is taken."""
        server = AppServer(app, self.host, self.port, name=f"model '{self.name}'")
        await server.start()
        self.app = app
        self._server = server

    async def close_port(self, timeout: float = 15.0) -> None:
        """Stop accepting, let open requests finish for up to ``timeout`` s, then close."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(timeout)
        if self.app is not None:
            self.app.state.handler = None
        self.app = None
