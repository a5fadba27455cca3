"""The hub's live feed: what ``/hub/events`` streams to the dashboard and anyone else listening.

Each listener gets its own bounded queue. A listener that does not keep up
loses its oldest events, never slows the hub, and is told so (a ``resync``
event: fetch the full picture again). ``close`` ends every stream, so a
controller that stops is not held open by a browser tab.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

#: One queued event: its kind (``status``, ``model``, ``request``, ``memory``, ``resync``) and its JSON data.
Event = tuple[str, Any]
QUEUE_SIZE = 500


class EventFeed:
    """Publish on the hub's loop; each ``subscribe`` is one listener's queue (None in it: the feed closed)."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[Event | None]] = set()
        self.closed = False

    @property
    def listeners(self) -> int:
        return len(self._queues)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event | None]]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)
        if self.closed:
            queue.put_nowait(None)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    def publish(self, kind: str, data: Any) -> None:
        for queue in list(self._queues):
            if queue.full():  # a slow listener: drop its backlog and say so
                _drain(queue)
                queue.put_nowait(("resync", {"reason": "events were dropped; fetch the current state"}))
            queue.put_nowait((kind, data))

    def close(self) -> None:
        """End every listener's stream (the controller or the hub is stopping)."""
        self.closed = True
        for queue in list(self._queues):
            if queue.full():
                _drain(queue)
            queue.put_nowait(None)

    def reopen(self) -> None:
        self.closed = False


def _drain(queue: asyncio.Queue[Event | None]) -> None:
    with contextlib.suppress(asyncio.QueueEmpty):
        while True:
            queue.get_nowait()
