"""Fill in the ``/hub/status`` document from a running hub, in one pass with no awaits.

Declares what it reads (``Reportable``) instead of importing the hub, so the
hub depends on this module and not the other way round.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Protocol

from mlx_hub.config import HubConfig
from mlx_hub.core import prompt_caches
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.slot_status import model_status
from mlx_hub.core.states import OCCUPYING, MemoryState, PortState
from mlx_hub.core.status import (
    Counts,
    GroupStatus,
    HubStatus,
    MemoryStatus,
    Supervision,
)
from mlx_hub.engine.base import Engine, PromptCacheStore


class Reportable(Protocol):
    """What the status document is read from (``core.hub.Hub`` is one)."""

    config: HubConfig
    slots: Mapping[str, ModelSlot]
    engine: Engine
    ready: bool
    started_at: float | None
    budget: int | None
    budget_source: str | None
    supervision: Supervision | None
    prompt_store: PromptCacheStore | None

    def log_file(self, slot: ModelSlot) -> str | None: ...


def build_status(hub: Reportable) -> HubStatus:
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
    warnings.extend(_restart_warning(hub.supervision))
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
        models=[
            prompt_caches.model_row(model_status(s, now, hub.log_file(s)), hub.prompt_store) for s in slots
        ],
        prompt_cache=prompt_caches.status(hub.prompt_store),
        **(hub.supervision.model_dump() if hub.supervision is not None else {}),
    )


def _restart_warning(supervision: Supervision | None) -> list[str]:
    """A line for the last crash the supervisor brought the hub back from, if any."""
    crash = supervision.last_crash if supervision is not None else None
    if supervision is None or crash is None:
        return []
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(crash.at))
    return [
        f"The hub restarted after a crash ({supervision.restarts} restart(s)); last: {crash.cause} at {when}"
    ]
