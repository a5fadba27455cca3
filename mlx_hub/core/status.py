"""The ``/hub/status`` document: its types (report.py fills it in from a running hub).

The reference hub's keys (``process_state``, ``memory_state``, ``pid``, ...) come
first in each model's ``metadata``; the hub's own figures follow. The controller
declares ``HubStatus`` as its response model, and metrics, the CLI views and the
benchmarks read its fields rather than string keys. The JSON shape is the one
the dashboard and the reference clients already read. It imports only
pydantic, so the CLI reads the document without loading the hub.
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
    memory_bytes: int  # its own bytes, plus the weights copies it carries (each copy counted once)
    kv_reserved_bytes: int = 0  # what its requests in flight reserve: KV cache and prefill working memory
    memory_peak_bytes: int = 0  # the most it accounted for at once (memory_bytes + kv_reserved_bytes)
    prompt_cache_bytes: int = 0  # of memory_bytes, upstream's prompt cache held in memory between requests
    shared_bytes: int = 0  # weights it holds together with other entries
    shared_with: list[str] = []  # those entries
    in_flight: int
    waiting: int
    cancelled_waiting: int = 0  # requests whose client left while they waited (for a load, a place, memory)
    cancelled_generating: int = 0  # ... while they were served
    idle_seconds_left: float | None
    load_seconds: float | None
    load_count: int
    freed_bytes: int | None
    pinned: bool
    keep_alive_seconds: float | None  # -1: kept forever
    started_at: float | None
    log_file: str | None
    # A sharded model's ranks: one {rank, host, pid, state, memory_bytes} each (None: not sharded).
    ranks: list[dict[str, object]] | None = None
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


class CrashReport(_Document):
    """The hub's last death, as its supervisor saw it."""

    at: float
    pid: int
    exit_code: int | None  # set when it exited
    signal: str | None  # set when a signal ended it: SIGKILL, SIGSEGV, SIGABRT ...
    cause: str  # "killed by SIGSEGV while coder loading"
    loading: list[str]
    generating: list[str]
    blamed: dict[str, str]  # model: "loading" | "generating"
    held_back: dict[str, str]  # models not loaded again after it, and why
    log_tail: list[str]  # the last lines of hub.log
    uptime_seconds: float


class Supervision(_Document):
    """What the supervisor tells the hub it restarted."""

    supervisor_pid: int
    restarts: int = 0
    last_crash: CrashReport | None = None


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
    supervisor_pid: int | None = None  # the parent that restarts the hub after a crash
    restarts: int = 0  # times it did
    last_crash: CrashReport | None = None
    prompt_cache: PromptCacheStatus | None = None

    def model(self, name: str) -> ModelMetadata:
        """One model's metadata by entry name; ``KeyError`` if the hub has no such model."""
        for row in self.models:
            if row.id == name:
                return row.metadata
        raise KeyError(name)
