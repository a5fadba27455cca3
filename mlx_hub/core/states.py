"""The states a model's port and its memory move through; slot.py makes the moves, policy.py reads them."""

from __future__ import annotations

from enum import StrEnum


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
