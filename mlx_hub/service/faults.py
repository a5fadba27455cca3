"""Test-only faults: make the hub die the way a Metal abort, a bad allocation or the OS would.

Off unless the hub's environment sets ``MLX_HUB_TEST_FAULTS=1`` (the crash
tests do; nothing else should). Then:

- a request carrying ``x-mlx-hub-test-fault: abort | segv | kill`` on a model
  port (or through ``/v1``) ends the process with SIGABRT, SIGSEGV or SIGKILL
  before its answer;
- ``MLX_HUB_TEST_CRASH_ON_LOAD=name[,name]`` aborts the process whenever one
  of those models starts loading its weights (a model that crashes the hub
  on every load).
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub

ENV = "MLX_HUB_TEST_FAULTS"
CRASH_ON_LOAD_ENV = "MLX_HUB_TEST_CRASH_ON_LOAD"
HEADER = b"x-mlx-hub-test-fault"
SIGNALS = {"abort": signal.SIGABRT, "segv": signal.SIGSEGV, "kill": signal.SIGKILL}


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def crash(kind: str) -> None:
    """End this process as ``kind`` would (abort, segv, kill), with no cleanup."""
    sig = SIGNALS.get(kind, signal.SIGABRT)
    if sig is signal.SIGABRT:
        os.abort()
    os.kill(os.getpid(), sig)


class FaultOnRequest:
    """Crash on a request that asks for it with the ``x-mlx-hub-test-fault`` header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for key, value in scope.get("headers", []):
                if key.lower() == HEADER:
                    crash(value.decode("latin-1").strip().lower())
        await self.app(scope, receive, send)


def install(hub: Hub) -> None:
    """Arm the faults on ``hub`` (its model apps and its engine's load)."""
    build = hub.app_factory

    def with_faults(owner: Hub, slot: Any) -> Any:
        app = build(owner, slot)
        app.add_middleware(FaultOnRequest)
        return app

    hub.app_factory = with_faults
    doomed = {n.strip() for n in os.environ.get(CRASH_ON_LOAD_ENV, "").split(",") if n.strip()}
    if not doomed:
        return
    load = hub.engine.load

    async def crashing_load(entry: Any, **kwargs: Any) -> Any:
        if entry.name in doomed:
            crash("abort")
        return await load(entry, **kwargs)

    hub.engine.load = crashing_load  # type: ignore[method-assign]
