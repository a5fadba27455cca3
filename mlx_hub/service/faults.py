"""Test-only faults: make the hub die the way a Metal abort, a bad allocation or the OS would.

Off unless the hub's environment sets ``MLX_HUB_TEST_FAULTS=1`` (the crash
tests do; nothing else should). Then:

- a request carrying ``x-mlx-hub-test-fault: abort | segv | kill`` on a model
  port (or through ``/v1``) ends the process with SIGABRT, SIGSEGV or SIGKILL
  before its answer;
- ``MLX_HUB_TEST_CRASH_ON_LOAD=name[,name]`` aborts the process whenever one
  of those models starts loading its weights (a model that crashes the hub
  on every load);
- ``MLX_HUB_TEST_SHUTDOWN_FAULT=raise | hang | kill`` makes the hub's
  shutdown raise, hang for good, or end the process with SIGKILL, once it
  has begun;
- ``MLX_HUB_TEST_HOLD_LOADS=path`` makes every load wait while that file
  exists: a test holds a restarted hub's restore, and releases it by
  removing the file.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub

ENV = "MLX_HUB_TEST_FAULTS"
CRASH_ON_LOAD_ENV = "MLX_HUB_TEST_CRASH_ON_LOAD"
SHUTDOWN_FAULT_ENV = "MLX_HUB_TEST_SHUTDOWN_FAULT"
HOLD_LOADS_ENV = "MLX_HUB_TEST_HOLD_LOADS"
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
    """Arm the faults on ``hub`` (its model apps, its engine's load, its shutdown)."""
    build = hub.app_factory

    def with_faults(owner: Hub, slot: Any) -> Any:
        app = build(owner, slot)
        app.add_middleware(FaultOnRequest)
        return app

    hub.app_factory = with_faults
    _on_load(hub)
    shutdown_fault = os.environ.get(SHUTDOWN_FAULT_ENV, "").strip().lower()
    if shutdown_fault:
        _on_shutdown(hub, shutdown_fault)


def _on_load(hub: Hub) -> None:
    """Loads that crash (``CRASH_ON_LOAD_ENV``) or wait (``HOLD_LOADS_ENV``)."""
    doomed = {n.strip() for n in os.environ.get(CRASH_ON_LOAD_ENV, "").split(",") if n.strip()}
    hold = os.environ.get(HOLD_LOADS_ENV, "")
    if not doomed and not hold:
        return
    load = hub.engine.load

    async def faulty_load(entry: Any, **kwargs: Any) -> Any:
        if entry.name in doomed:
            crash("abort")
        while hold and os.path.exists(hold):
            await asyncio.sleep(0.1)
        return await load(entry, **kwargs)

    hub.engine.load = faulty_load  # type: ignore[method-assign]


def _on_shutdown(hub: Hub, kind: str) -> None:
    """A shutdown that raises, hangs or is killed once it has begun (the hub's ``stopping`` is sent)."""

    async def faulty_shutdown(**_: Any) -> None:
        if kind == "raise":
            raise RuntimeError("test fault: the shutdown failed")
        if kind == "hang":
            await asyncio.Event().wait()  # nothing ever sets it
        crash(kind)

    hub.shutdown = faulty_shutdown  # type: ignore[method-assign]
