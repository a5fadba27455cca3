"""Memory over time: a sample of the hub's memory figures every few seconds, for the last hour.

Each sample holds what the dashboard's chart draws: the loaded models'
weights, their prompt caches, the KV cache and prefill memory requests in
flight reserve, MLX's active memory and the budget, and per model its bytes
and the decode speed of the requests that finished since the last sample.
Kept in memory (a ring buffer), so it starts afresh with the hub.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from typing import Any

from mlx_hub.core.status import HubStatus

SPAN_SECONDS = 3600.0


@dataclasses.dataclass
class MemorySample:
    t: float  # epoch seconds
    active_bytes: int
    budget_bytes: int | None
    weights_bytes: int
    prompt_cache_bytes: int
    kv_reserved_bytes: int
    models: dict[str, dict[str, Any]]  # name -> {"bytes": int, "tokens_per_s": float | None}


def sample_of(status: HubStatus, speeds: dict[str, float]) -> MemorySample:
    """One sample from a status document and the decode speeds (tokens/s) measured since the last."""
    loaded = [row for row in status.models if row.metadata.memory_state == "loaded"]
    cache = sum(row.metadata.prompt_cache_bytes for row in loaded)
    return MemorySample(
        t=status.timestamp,
        active_bytes=status.memory.active_bytes,
        budget_bytes=status.memory.budget_bytes,
        weights_bytes=max(0, status.memory.models_bytes - cache),
        prompt_cache_bytes=cache,
        kv_reserved_bytes=status.memory.reserved_bytes,
        models={
            row.id: {"bytes": row.metadata.memory_bytes, "tokens_per_s": speeds.get(row.id)}
            for row in status.models
            if row.metadata.memory_state != "unloaded" or row.id in speeds
        },
    )


class MemoryHistory:
    """The last ``span`` seconds of samples, one every ``interval`` seconds."""

    def __init__(self, interval: float, span: float = SPAN_SECONDS):
        self.interval = interval
        self.span = span
        self._samples: deque[MemorySample] = deque(maxlen=math.ceil(span / interval) + 1)
        self._speeds: dict[str, list[float]] = {}

    def speed(self, model: str, tokens_per_s: float | None) -> None:
        """Note one finished request's decode speed; the next sample averages them per model."""
        if tokens_per_s:
            self._speeds.setdefault(model, []).append(tokens_per_s)

    def add(self, status: HubStatus) -> MemorySample:
        speeds = {name: round(sum(v) / len(v), 2) for name, v in self._speeds.items()}
        self._speeds = {}
        sample = sample_of(status, speeds)
        self._samples.append(sample)
        return sample

    def samples(self, since: float | None = None) -> list[MemorySample]:
        cutoff = max(since or 0.0, time.time() - self.span)
        return [s for s in self._samples if s.t >= cutoff]
