"""The ``/hub/status`` document as types: what the hub reports, and what every reader reads.

The reference hub's keys (``process_state``, ``memory_state``, ``pid``, ...) come
first in each model's ``metadata``; the hub's own figures follow. The controller
declares ``HubStatus`` as its response model, and metrics, the CLI views and the
benchmarks read its fields rather than string keys. The JSON shape is the one
the dashboard and the reference clients already read. Types only: the CLI
imports this module without the hub.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
    memory_bytes: int
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

    def model(self, name: str) -> ModelMetadata:
        """One model's metadata by entry name; ``KeyError`` if the hub has no such model."""
        for row in self.models:
            if row.id == name:
                return row.metadata
        raise KeyError(name)
