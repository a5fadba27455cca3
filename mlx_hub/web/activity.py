"""The controller's view of what the hub is doing: ``/hub/requests``, ``/hub/events``, ``/hub/history``, ``/hub/logs``.

A router of its own, included by the controller: the request log, a
server-sent event stream of state changes, finished requests and memory
samples, the memory history behind the dashboard's chart, and the log files
the hub writes, read back or followed as they grow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query
from starlette.responses import JSONResponse, Response, StreamingResponse

from mlx_hub.core import logs, logtail
from mlx_hub.core.errors import UnknownModelError
from mlx_hub.core.history import sample_of
from mlx_hub.core.requestlog import PAGE_LIMIT, parse_since, query
from mlx_hub.web.responses import error_json

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub

KEEPALIVE_SECONDS = 15.0
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def activity_router(hub: Hub) -> APIRouter:
    router = APIRouter(tags=["activity"])
    _record_routes(router, hub)
    _stream_routes(router, hub)
    return router


def _record_routes(router: APIRouter, hub: Hub) -> None:
    """What the hub has recorded: the request log and the memory history."""

    @router.get("/hub/requests")
    async def requests(
        model: str | None = None,
        since: str | None = Query(
            None, description="epoch seconds, a duration back (15m, 2h, 7d) or an ISO time"
        ),
        before: int | None = Query(
            None, ge=1, le=2**63 - 1, description="only rows with a smaller id: the next page"
        ),
        limit: int = Query(100, ge=1, description=f"rows in this page, at most {PAGE_LIMIT}"),
    ) -> Response:
        """The request log, newest first: one row per finished request on any port or /v1."""
        if limit > PAGE_LIMIT:  # rows may hold 128 KB of bodies each: one answer stays bounded
            message = (
                f"limit={limit} is more than {PAGE_LIMIT} rows; ask for the next page with "
                "before=<the id of the last row received>"
            )
            return error_json(400, message, "invalid_request_error", "limit_too_large", param="limit")
        try:
            after = parse_since(since)
        except ValueError as exc:
            return error_json(400, str(exc), "invalid_request_error", "invalid_since")
        activity = hub.activity
        await asyncio.to_thread(activity.requests.flush, 1.0)  # what has just finished is in the answer
        rows = await asyncio.to_thread(
            query, activity.requests.path, model=model or None, since=after, before_id=before, limit=limit
        )
        return JSONResponse(
            {
                "object": "list",
                "data": [r.public() for r in rows],
                "enabled": activity.requests.enabled,
                "path": str(activity.requests.path),
            }
        )

    @router.get("/hub/history")
    async def history() -> dict[str, Any]:
        """Memory and decode speed over the last hour, oldest first, ending with a sample of now."""
        activity = hub.activity
        now = sample_of(hub.status_document(), {})
        samples = [dataclasses.asdict(s) for s in activity.history.samples()] + [dataclasses.asdict(now)]
        return {"interval": activity.history.interval, "span": activity.history.span, "samples": samples}


def _stream_routes(router: APIRouter, hub: Hub) -> None:
    """What stays open: the event stream and a followed log."""

    @router.get("/hub/events")
    async def events() -> StreamingResponse:
        """Server-sent events: ``status`` (the whole document, on each change and every few seconds),
        ``model`` (a port or memory state moved), ``request`` (one finished), ``memory`` (a sample)."""
        return StreamingResponse(_event_stream(hub), media_type="text/event-stream", headers=STREAM_HEADERS)

    @router.get("/hub/logs")
    async def log_lines(
        model: str | None = Query(None, description="a model's own log; none: the hub's log"),
        follow: bool = Query(
            False, description="keep the answer open and send new lines as they are written"
        ),
        lines: int = Query(200, ge=0, le=10_000, description="how many of the last lines to send first"),
        contains: str | None = Query(None, description="only lines holding this text (any case)"),
    ) -> Response:
        """The hub's log or one model's, as plain text lines (``tail -n``; ``follow=1`` as ``tail -F``)."""
        path = _log_path(hub, model)
        stream = _log_stream(hub, path, follow=follow, lines=lines, contains=contains)
        return StreamingResponse(stream, media_type="text/plain; charset=utf-8", headers=STREAM_HEADERS)


def _log_path(hub: Hub, model: str | None) -> Path:
    if not model or model == "hub":
        return hub.config.log_dir / logs.HUB_LOG
    slot = hub.slots.get(model)
    if slot is None:
        raise UnknownModelError.among(model, hub.slots)
    own = hub.log_file(slot)
    if own is None:
        raise UnknownModelError(
            f"model '{model}' has no log file of its own (no_log_file, or this hub writes no per-model "
            "logs); its lines are in the hub's log: /hub/logs",
            model=model,
        )
    return Path(own)


async def _log_stream(
    hub: Hub, path: Path, *, follow: bool, lines: int, contains: str | None
) -> AsyncIterator[bytes]:
    needle = contains.lower() if contains else None

    def chosen(batch: list[str]) -> bytes:
        kept = [line for line in batch if needle is None or needle in line.lower()]
        return "".join(f"{line}\n" for line in kept).encode()

    # A filter looks further back, so `lines` counts matching lines where it can.
    first, offset = await asyncio.to_thread(logtail.tail, path, lines * 20 if needle else lines)
    head = chosen(first)
    if needle and lines:
        head = b"".join(line + b"\n" for line in head.splitlines()[-lines:])
    yield head
    if not follow:
        return
    async for batch in logtail.follow(path, offset, lambda: hub.activity.feed.closed):
        data = chosen(batch)
        if data:
            yield data


async def _event_stream(hub: Hub) -> AsyncIterator[str]:
    feed = hub.activity.feed
    with feed.subscribe() as queue:
        yield "retry: 3000\n\n"
        yield _sse("status", hub.status())  # the full picture first; then what changes
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if item is None:
                return
            yield _sse(*item)


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
