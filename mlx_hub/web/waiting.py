"""A request that must wait (for a load, a group place or memory): it may leave, and a stream hears at once.

* **Leaving.** While the gate waits in ``admission.acquire`` it also listens for
  the client's disconnect. A client that leaves gives up its place there and
  then: the wait is cancelled (so it never evicts anything or starts a load;
  ``admission`` drops a load nobody waits for any more), and the hub counts
  the request as cancelled by its client.
* **A stream answers at once.** A streaming request (chat, completions,
  responses, messages) that has to wait gets its 200 and SSE headers at once,
  then an SSE comment (``: loading <model>``, ``: queued <position>``) every
  second until the route starts, so proxies and SDKs do not time out. A failure
  after that ends the stream with the same error object the status code would
  have carried, as an error event in the request's API. ``loading_progress``
  (per model, else hub-wide) also puts one readable line per stage in the
  stream's reasoning field (``progress``). Non-streaming requests are unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import Message, Receive, Scope, Send

from mlx_hub.core import admission
from mlx_hub.core.errors import HubError
from mlx_hub.core.states import MemoryState
from mlx_hub.web.progress import progress_for
from mlx_hub.web.responses import error_response
from mlx_hub.web.routes import Route, route_of

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub
    from mlx_hub.core.slot import ModelSlot, Reservation

#: Seconds between SSE comments while a stream waits (the promise to clients is "at least every 2 s").
HEARTBEAT_SECONDS = 1.0
#: A loaded model admits a request in milliseconds; waiting longer than this opens the stream.
OPEN_AFTER_SECONDS = 0.5
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

#: The requests waiting for each slot, oldest first (a request's queue position).
_QUEUES: weakref.WeakKeyDictionary[Any, list[object]] = weakref.WeakKeyDictionary()


def streams(route: Route, data: dict[str, Any] | None) -> bool:
    """The request asks for server-sent events on a route that sends them."""
    return bool(route.streams and data and data.get("stream") is True)


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def client_left(hub: Hub, slot: ModelSlot, stage: str) -> None:
    """Count a request its client abandoned, ``waiting`` or ``generating``, in status and /metrics."""
    slot.cancelled_by_client[stage] = slot.cancelled_by_client.get(stage, 0) + 1
    hub.metrics.client_left(slot.name, stage)


class Listening:
    """Wraps the route's ``receive`` to note whether the client went away while the route ran."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self.left = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.left = True
        return message


class WaitingRoom:
    """One request's wait in the gate: its place, its early stream, and the ``send`` the route then uses."""

    def __init__(self, hub: Hub, slot: ModelSlot, scope: Scope, send: Send, streaming: bool):
        self.hub, self.slot, self.scope = hub, slot, scope
        self._send = send
        self.streaming = streaming
        self.opened = False  # the 200 and SSE headers have gone out
        self.forwarded = False  # the route's own answer has begun to go out
        self._said: str | None = None
        self._held: Message | None = None  # the route's error start, once the stream is open
        entry, config = slot.entry, hub.config
        progress = entry.loading_progress if entry.loading_progress is not None else config.loading_progress
        self.progress = progress_for(scope["path"], entry.served_name) if progress else None

    async def acquire(self, body: dict[str, Any] | None, receive: Receive | None) -> Reservation | None:
        """Wait for a place; None when the client left or the refusal has been answered."""
        me = object()
        queue = _QUEUES.setdefault(self.slot, [])
        queue.append(me)
        waiting = asyncio.ensure_future(admission.acquire(self.hub, self.slot, body))
        gone = asyncio.ensure_future(_disconnect(receive)) if receive is not None else None
        try:
            return await self._wait(waiting, gone, lambda: queue.index(me) + 1)
        except HubError as exc:
            await self.refuse(exc)
            return None
        finally:
            with contextlib.suppress(ValueError):
                queue.remove(me)
            if gone is not None:
                gone.cancel()

    async def _wait(
        self, waiting: asyncio.Future[Any], gone: asyncio.Future[Any] | None, place: Callable[[], int]
    ) -> Any:
        loop = asyncio.get_running_loop()
        must_wait = self.slot.memory_state is not MemoryState.LOADED or self.slot.load_in_progress()
        next_beat = loop.time() + (0 if must_wait else OPEN_AFTER_SECONDS)
        watched = {waiting} if gone is None else {waiting, gone}
        while True:
            timeout = max(next_beat - loop.time(), 0) if self.streaming else None
            done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if waiting in done:
                return waiting.result()
            if gone is not None and gone in done:
                await self._leave(waiting)
                return None
            await self.heartbeat(place())
            next_beat = loop.time() + HEARTBEAT_SECONDS

    async def _leave(self, waiting: asyncio.Future[Any]) -> None:
        """The client went away: give the place up now, and hand back a place taken meanwhile."""
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, HubError):
            reservation = await waiting
            admission.release(self.hub, self.slot, reserved=reservation)  # admitted as it left
        client_left(self.hub, self.slot, "waiting")

    # ------------------------------------------------------------------ the early stream

    def stage(self, place: int) -> tuple[str, str]:
        """What the request waits for: an SSE comment, and a line for people."""
        slot = self.slot
        if slot.memory_state is MemoryState.LOADING:
            size = f" ({slot.estimate / 1e9:.1f} GB)" if slot.estimate else ""
            return f"loading {slot.name}", f"loading {slot.name}{size}..."
        group = f" for a place in group '{slot.entry.group}'" if slot.entry.group else ""
        if slot.memory_state is MemoryState.LOADED:
            group = " for memory"
        return f"queued {place}", f"waiting{group} to run {slot.name} (position {place})..."

    async def heartbeat(self, place: int) -> None:
        text = b""
        if not self.opened:
            self.opened = True
            await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            text = self.progress.opening() if self.progress else b""
        comment, line = self.stage(place)
        text += f": {comment}\n\n".encode()
        if self.progress and line != self._said:
            self._said = line
            text += self.progress.line(line)
        await self._send({"type": "http.response.body", "body": text, "more_body": True})

    async def refuse(self, exc: HubError) -> None:
        """A refusal: its status and body before the stream opened, the same body as an error event after."""
        await self.send_error(error_response(exc))

    async def send_error(self, app: Any) -> None:
        if not self.opened:
            await app(self.scope, _no_receive, self._send)
            return
        captured: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.body":
                captured.append(message.get("body", b""))

        await app(self.scope, _no_receive, capture)
        await self._error_event(b"".join(captured))

    async def _error_event(self, body: bytes) -> None:
        if route_of(self.scope["path"]).named_events:
            text = b"event: error\ndata: " + body + b"\n\n"
        else:
            text = b"data: " + body + b"\n\ndata: [DONE]\n\n"
        await self._send({"type": "http.response.body", "body": text, "more_body": False})

    async def send(self, message: Message) -> None:
        """The route's ``send`` once the stream is open: its own start is dropped, an error becomes an event."""
        if not self.opened:
            self.forwarded = True
            await self._send(message)
            return
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                self._held = {**message, "body": b""}
            return
        if self._held is not None and message["type"] == "http.response.body":
            self._held["body"] += message.get("body", b"")
            if not message.get("more_body", False):
                await self._error_event(self._held["body"])
            return
        self.forwarded = True
        if self.progress is not None and message["type"] == "http.response.body":
            last = not message.get("more_body", False)
            message = {**message, "body": self.progress.route(message.get("body", b""), last)}
        await self._send(message)

    def answered(self, started: bool) -> bool:
        """The route's answer has begun (``started``: something went out, perhaps only the early stream)."""
        return self.forwarded if self.opened else started


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
