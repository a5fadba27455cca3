"""What the hub is doing, for the dashboard and ``/hub/events``: finished requests, state changes, memory.

``Activity`` belongs to the hub (``hub.activity``). The model ports' gate
traces each request (``web/tracing.py``) and hands the finished request here as
a plain ``RequestRecord`` (``finished``); it goes to the request log
(``requestlog``), to the live feed (``feed``) and into the next memory sample's
decode speeds (``history``). One task watches the hub: after each state change
(gathered for a moment, so a burst is one update) it publishes the models
whose port or memory state moved and, to listeners, the whole status
document; every ``sample_interval`` seconds it takes a memory sample.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Protocol

from mlx_hub.config import HubConfig
from mlx_hub.core import logs
from mlx_hub.core.feed import EventFeed
from mlx_hub.core.history import MemoryHistory
from mlx_hub.core.requestlog import RequestLog, RequestRecord, db_path
from mlx_hub.core.status import HubStatus

log = logging.getLogger("mlx_hub.hub")

GATHER_SECONDS = 0.1  # a burst of changes within this becomes one update


class ActivityHost(Protocol):
    """What the watcher reads from the hub (``core.hub.Hub`` is one)."""

    config: HubConfig

    def status_document(self) -> HubStatus: ...
    async def wait_change(self, timeout: float | None = None) -> bool: ...


class Activity:
    """The request log, the live feed and the memory history of one hub."""

    sample_interval = 5.0  # seconds between memory samples (and status heartbeats to listeners)

    def __init__(self, config: HubConfig):
        self.config = config
        self.requests = RequestLog(
            db_path(config.log_dir),
            days=config.request_log_days,
            max_rows=config.request_log_max_rows,
            bodies=config.request_log_bodies,
        )
        self.feed = EventFeed()
        self.history = MemoryHistory(self.sample_interval)
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: ActivityHost) -> None:
        """Open the request log (its writer thread) and start watching ``host``."""
        await asyncio.to_thread(self.requests.open)
        self.feed.reopen()
        self.history.interval = self.sample_interval
        self._task = asyncio.create_task(self._watch(host), name="hub:activity")

    async def stop(self) -> None:
        """End the streams, stop watching, commit what the log still holds."""
        self.feed.close()
        task, self._task = self._task, None
        while task is not None and not task.done():
            # Python 3.11's wait_for can swallow a cancel that lands as its wait ends: cancel until it ends.
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        await asyncio.to_thread(self.requests.close)

    def close_streams(self) -> None:
        """End every ``/hub/events`` and ``/hub/logs`` stream now (before the controller stops)."""
        self.feed.close()

    # ------------------------------------------------------------ requests

    def finished(self, record: RequestRecord) -> None:
        """Log a finished request, tell the listeners, count its speed into the memory history."""
        self.requests.write(record)
        self.history.speed(record.model, record.tokens_per_s)
        logs.model_line(record.model, summary(record), "WARNING" if record.status >= 500 else "INFO")
        if self.feed.listeners:
            data = record.public()
            data.pop("request_body"), data.pop("response_text")
            self.feed.publish("request", data)

    # -------------------------------------------------------------- watcher

    def adopt(self, config: HubConfig) -> None:
        """A reloaded hub.yaml: its request-log limits apply from the next prune."""
        self.config = config
        self.requests.configure(
            days=config.request_log_days,
            max_rows=config.request_log_max_rows,
            bodies=config.request_log_bodies,
        )

    async def _watch(self, host: ActivityHost) -> None:
        states: dict[str, tuple[str, str]] = {}
        next_sample = time.monotonic()
        while True:
            try:
                changed = await host.wait_change(max(0.0, next_sample - time.monotonic()))
                if changed:
                    await asyncio.sleep(GATHER_SECONDS)
                if host.config is not self.config:
                    self.adopt(host.config)
                status = host.status_document()
                states = self._publish_moves(status, states)
                sampled = time.monotonic() >= next_sample
                if sampled:
                    next_sample = time.monotonic() + self.sample_interval
                    sample = self.history.add(status)
                    self.feed.publish("memory", dataclasses.asdict(sample))
                if (changed or sampled) and self.feed.listeners:
                    self.feed.publish("status", status.model_dump(mode="json"))
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad reading
                log.exception("the activity watcher failed; retrying")
                await asyncio.sleep(self.sample_interval)

    def _publish_moves(
        self, status: HubStatus, before: dict[str, tuple[str, str]]
    ) -> dict[str, tuple[str, str]]:
        """A ``model`` event for each model whose port or memory state moved since ``before``."""
        now: dict[str, tuple[str, str]] = {}
        for row in status.models:
            state = (row.metadata.process_state, row.metadata.memory_state)
            now[row.id] = state
            old = before.get(row.id)
            if old is not None and old != state:
                self.feed.publish("model", _move(row.id, old, state, row.metadata.memory_last_error))
        return now


def _move(name: str, old: tuple[str, str], new: tuple[str, str], error: str | None) -> dict[str, Any]:
    return {
        "id": name,
        "process_state": new[0],
        "memory_state": new[1],
        "previous_process_state": old[0],
        "previous_memory_state": old[1],
        "memory_last_error": error,
    }


def summary(record: RequestRecord) -> str:
    """The request's line in its model's log: route, status, tokens, timings."""
    parts = [f"{record.route} {record.status}" + (f" {record.error}" if record.error else "")]
    if record.prompt_tokens is not None or record.completion_tokens is not None:
        cached = f" ({record.cached_tokens} cached)" if record.cached_tokens else ""
        parts.append(f"{record.prompt_tokens or 0} prompt{cached} + {record.completion_tokens or 0} tokens")
    if record.wait_s and record.wait_s >= 0.05:
        parts.append(f"waited {record.wait_s:.2f} s")
    if record.ttft_s is not None:
        parts.append(f"first token {record.ttft_s:.2f} s")
    if record.tokens_per_s:
        parts.append(f"{record.tokens_per_s:.1f} tok/s")
    parts.append(f"{record.total_s:.2f} s" + (" · client went away" if record.disconnected else ""))
    return f"request via {record.via}: " + " · ".join(parts)
