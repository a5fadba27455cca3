"""A model's row of ``/hub/status``: the status view of a slot, kept apart from the slot's moves.

The slot (slot.py) and its port (model_port.py) hold the state; this reads
them, with the idle timer policy.py derives, into the ``ModelStatus`` the
status document (report.py), ``/metrics`` and the dashboard show.
"""

from __future__ import annotations

import os

from mlx_hub.core.policy import seconds_until_idle_unload
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.states import PortState
from mlx_hub.core.status import ModelMetadata, ModelStatus


def model_status(slot: ModelSlot, now: float, log_file: str | None) -> ModelStatus:
    """``slot``'s row of ``/hub/status``, read at one instant (``now`` is ``time.monotonic()``)."""
    entry = slot.entry
    running = slot.port_state is PortState.RUNNING
    idle_left = seconds_until_idle_unload(slot.candidate(), now)
    keep_alive = slot.keep_alive
    shared = slot.shared()
    return ModelStatus(
        id=slot.name,
        metadata=ModelMetadata(
            process_state=slot.port_state.value,
            memory_state=slot.memory_state.value,
            pid=os.getpid() if running else None,
            port=slot.port,
            host=slot.host,
            group=entry.group,
            default=entry.default,
            jit_enabled=entry.jit_enabled,
            model_type=entry.model_type,
            model_path=entry.model_path,
            served_model_name=entry.served_name,
            auto_unload_minutes=entry.auto_unload_minutes,
            memory_last_transition_at=slot.memory_changed_at,
            memory_last_error=slot.memory_error,
            process_last_error=slot.port_error,
            exit_code=1 if slot.port_state is PortState.FAILED else None,
            memory_bytes=slot.held_bytes,
            kv_reserved_bytes=slot.reserved_bytes,
            memory_peak_bytes=slot.peak_bytes,
            prompt_cache_bytes=slot.prompt_cache_bytes,
            shared_bytes=sum(g.bytes for g in shared if len(g.holders) > 1),
            shared_with=sorted({h for g in shared for h in g.holders} - {slot.name}),
            in_flight=slot.active,
            waiting=slot.waiting,
            cancelled_waiting=slot.cancelled_by_client.get("waiting", 0),
            cancelled_generating=slot.cancelled_by_client.get("generating", 0),
            idle_seconds_left=None if idle_left is None else round(idle_left, 1),
            load_seconds=None if slot.load_seconds is None else round(slot.load_seconds, 3),
            load_count=slot.load_count,
            freed_bytes=slot.freed_bytes,
            pinned=entry.pinned,
            keep_alive_seconds=None
            if keep_alive is None
            else (-1 if keep_alive == float("inf") else keep_alive),
            started_at=slot.port_changed_at if running else None,
            log_file=log_file,
            ranks=ranks(slot),
        ),
    )


def ranks(slot: ModelSlot) -> list[dict[str, object]] | None:
    """A sharded model's ranks as its group reports them; [] while none runs; None if not sharded."""
    if slot.entry.distributed is None:
        return None
    report = getattr(slot.handler, "ranks_status", None)
    return report() if report is not None else []
