"""The hub's two pieces of loop plumbing: a "something changed" signal, and its background tasks.

Waiters (admission, stops, drains) sleep on ``Changes`` instead of polling;
every state move calls ``notify``. Loads, unloads and keep_alive unloads run as
``Background`` tasks so a client that goes away never cancels a load others wait for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("mlx_hub.hub")


class Changes:
    """One event per change: ``notify`` wakes every current waiter and arms a fresh event."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the next change; False if ``timeout`` passed first."""
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Background:
    """Tasks the hub started and nobody may cancel by leaving; a failure nobody awaits is logged."""

    #: Name prefixes of tasks nobody awaits (loads and unloads are awaited by their callers).
    UNAWAITED = ("keep-alive:",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # retrieved, so asyncio does not warn about it
        if error is not None and task.get_name().startswith(self.UNAWAITED):
            log.error("%s failed: %s", task.get_name(), error, exc_info=error)
