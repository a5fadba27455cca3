"""The states a model's port and its memory move through, and the moves each allows.

model_port.py and slot.py make the moves, checked against these tables; policy.py reads the states.
"""

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

#: The moves each state machine allows. Anything else is a bug in the caller, not a state.
PORT_MOVES: dict[PortState, frozenset[PortState]] = {
    PortState.INACTIVE: frozenset({PortState.STARTING}),
    PortState.STARTING: frozenset({PortState.RUNNING, PortState.FAILED, PortState.STOPPING}),
    PortState.RUNNING: frozenset({PortState.STOPPING}),
    PortState.FAILED: frozenset({PortState.STARTING, PortState.STOPPING}),
    PortState.STOPPING: frozenset({PortState.INACTIVE}),
}
MEMORY_MOVES: dict[MemoryState, frozenset[MemoryState]] = {
    # UNLOADED -> FAILED: a model held back after crashing the hub is failed without a load.
    MemoryState.UNLOADED: frozenset({MemoryState.LOADING, MemoryState.FAILED}),
    MemoryState.LOADING: frozenset({MemoryState.LOADED, MemoryState.FAILED, MemoryState.UNLOADED}),
    MemoryState.LOADED: frozenset({MemoryState.UNLOADING}),
    MemoryState.UNLOADING: frozenset({MemoryState.UNLOADED}),
    MemoryState.FAILED: frozenset({MemoryState.LOADING, MemoryState.UNLOADED}),
}


class StateError(RuntimeError):
    """A transition the slot's state machine does not allow."""
