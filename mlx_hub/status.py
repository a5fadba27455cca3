"""The ``/hub/status`` document: its types, the states it names, and how a hub fills it in.

The reference hub's keys (``process_state``, ``memory_state``, ``pid``, ...) come
first in each model's ``metadata``; the hub's own figures follow. The controller
declares ``HubStatus`` as its response model, and metrics, the CLI views and the
benchmarks read its fields rather than string keys. The JSON shape is the one
the dashboard and the reference clients already read. It imports only
pydantic, so the CLI reads the document without loading the hub.
"""

from __future__ import annotations

import os
import time
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .hub import Hub


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


class _Document(BaseModel):
    # extra="allow": a newer hub's additions reach an older CLI intact.
    model_config = ConfigDict(extra="allow")


class ModelMetadata(_Document):
    process_state: str  # the model's port: inactive, starting, running, stopping, failed
    memory_state: str  # unloaded, loading, loaded, unloading, failed
    pid: int | None
    port: int
    host: str
    group: str | None
    default: bool
    jit_enabled: bool
    model_type: str
    model_path: str
    served_model_name: str
    auto_unload_minutes: float | None
    memory_last_transition_at: float | None
    memory_last_error: str | None
    process_last_error: str | None
    exit_code: int | None
    memory_bytes: int  # its own bytes, plus the weights copies it carries (each copy counted once)
    kv_reserved_bytes: int = 0  # what its requests in flight reserve: KV cache and prefill working memory
    memory_peak_bytes: int = 0  # the most it accounted for at once (memory_bytes + kv_reserved_bytes)
    prompt_cache_bytes: int = 0  # of memory_bytes, upstream's prompt cache kept between requests
    shared_bytes: int = 0  # weights it holds together with other entries
    shared_with: list[str] = []  # those entries
    in_flight: int
    waiting: int
    idle_seconds_left: float | None
    load_seconds: float | None
    load_count: int
    freed_bytes: int | None
    pinned: bool
    keep_alive_seconds: float | None  # -1: kept forever
    started_at: float | None
    log_file: str | None
    # Its prompt caches kept on disk (prompt_cache_path): lookups since the hub started, and bytes now.
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0
    prompt_cache_tokens_reused: int = 0
    prompt_cache_disk_bytes: int = 0


class ModelStatus(_Document):
    id: str
    metadata: ModelMetadata


class Counts(_Document):
    registered: int
    started: int
    loaded: int


class MemoryStatus(_Document):
    active_bytes: int
    cache_bytes: int
    models_bytes: int
    system_total_bytes: int | None
    budget_bytes: int | None
    reserved_bytes: int = 0  # what every request in flight reserves, summed over models
    peak_bytes: int = 0  # MLX's peak memory since the hub started (mx.get_peak_memory)
    budget_source: str | None = None  # how max_memory was set: a size, a fraction, auto, or none


class PromptCacheStatus(_Document):
    enabled: bool  # false: prompt_cache_disk_size is 0, upstream's temporary caches only
    path: str | None
    disk_bytes: int  # every model's prompt caches on disk
    cap_bytes: int  # prompt_cache_disk_size
    bytes_written: int = 0  # by this hub since it started


class GroupStatus(_Document):
    name: str
    max_loaded: int | None
    idle_unload_trigger_min: float | None
    loaded: int
    models: list[str]


class HubStatus(_Document):
    status: str  # ok, or degraded while a model failed
    timestamp: float
    host: str
    port: int
    controller_available: bool
    ready: bool
    pid: int
    started_at: float | None
    upstream_version: str | None
    counts: Counts
    memory: MemoryStatus
    warnings: list[str]
    groups: list[GroupStatus]
    models: list[ModelStatus]
    prompt_cache: PromptCacheStatus | None = None

    def model(self, name: str) -> ModelMetadata:
        """One model's metadata by entry name; ``KeyError`` if the hub has no such model."""
        for row in self.models:
            if row.id == name:
                return row.metadata
        raise KeyError(name)


def build_status(hub: Hub) -> HubStatus:
    """The document for ``hub``, read in one pass with no awaits, so it is one consistent instant."""
    now = time.monotonic()
    slots = list(hub.slots.values())
    loaded = [s for s in slots if s.memory_state is MemoryState.LOADED]
    groups, warnings = [], []
    for group in hub.config.groups:
        members = [s for s in slots if s.entry.group == group.name]
        held = sum(1 for s in members if s.memory_state in OCCUPYING)
        groups.append(
            GroupStatus(
                name=group.name,
                max_loaded=group.max_loaded,
                idle_unload_trigger_min=group.idle_unload_trigger_min,
                loaded=held,
                models=[s.name for s in members],
            )
        )
        if group.max_loaded is not None and held >= group.max_loaded:
            warnings.append(f"Group '{group.name}' is at max_loaded ({group.max_loaded})")
    for slot in slots:
        if slot.port_state is PortState.FAILED:
            warnings.append(f"Model '{slot.name}' could not start: {slot.port_error}")
        elif slot.memory_state is MemoryState.FAILED:
            warnings.append(f"Model '{slot.name}' failed to load: {slot.memory_error}")
    failed = any(s.port_state is PortState.FAILED or s.memory_state is MemoryState.FAILED for s in slots)
    return HubStatus(
        status="degraded" if failed else "ok",
        timestamp=time.time(),
        host=hub.config.host,
        port=hub.config.port,
        controller_available=True,
        ready=hub.ready,
        pid=os.getpid(),
        started_at=hub.started_at,
        upstream_version=hub.engine.upstream_version(),
        counts=Counts(
            registered=len(slots),
            started=sum(1 for s in slots if s.port_state is PortState.RUNNING),
            loaded=len(loaded),
        ),
        memory=MemoryStatus(
            active_bytes=hub.engine.active_memory(),
            cache_bytes=hub.engine.cache_memory(),
            models_bytes=sum(s.held_bytes for s in loaded),
            system_total_bytes=hub.engine.system_memory(),
            budget_bytes=hub.budget,
            reserved_bytes=sum(s.reserved_bytes for s in slots),
            peak_bytes=hub.engine.peak_memory(),
            budget_source=hub.budget_source,
        ),
        warnings=warnings,
        groups=groups,
        models=[_with_prompt_cache(s.status(now, hub.log_file(s)), hub) for s in slots],
        prompt_cache=_prompt_cache(hub),
    )


def _with_prompt_cache(row: ModelStatus, hub: Hub) -> ModelStatus:
    """A model's row with its prompt-cache lookups and disk bytes, where caches persist."""
    store = hub.prompt_store
    if store is not None:
        counters, meta = store.counters(row.id), row.metadata
        meta.prompt_cache_hits, meta.prompt_cache_misses = counters.hits, counters.misses
        meta.prompt_cache_tokens_reused = counters.tokens_reused
        meta.prompt_cache_disk_bytes = store.model_bytes(row.id)
    return row


def _prompt_cache(hub: Hub) -> PromptCacheStatus:
    store = hub.prompt_store
    if store is None:
        return PromptCacheStatus(enabled=False, path=None, disk_bytes=0, cap_bytes=0)
    return PromptCacheStatus(
        enabled=True,
        path=str(store.root),
        disk_bytes=store.total_bytes(),
        cap_bytes=store.cap,
        bytes_written=store.bytes_written,
    )
