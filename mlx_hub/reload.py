"""Reload: apply a new hub.yaml to a running hub, model by model, as ``policy.reload_plan`` decides.

Unchanged models keep their slot (a loaded model stays loaded); removed and
changed ones stop first; then the new defaults and the changed models that were
running start. New entries keep hub.yaml's order, which dashboards show.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import policy
from .config import HubConfig
from .ports import PortBook
from .slot import ModelSlot, PortState

if TYPE_CHECKING:
    from .hub import Hub


async def apply(hub: Hub, new: HubConfig) -> dict[str, Any]:
    """Reconcile ``hub`` with ``new``.

    Answers the reference hub's ``{"started", "stopped", "unchanged"}`` plus
    ``failed``: each model that should have started and did not, with why.
    """
    running = {n for n, s in hub.slots.items() if s.port_state is PortState.RUNNING}
    startup = set(new.startup_models())
    ports = PortBook.for_config(new).assign(new, held={n: hub.slots[n].port for n in running})
    plan = policy.reload_plan(
        [policy.Placement(n, s.entry.model_dump(), s.port, s.host) for n, s in hub.slots.items()],
        running,
        [
            policy.Placement(m.name, m.model_dump(), ports[m.name], new.host_of(m), m.name in startup)
            for m in new.models
        ],
    )
    stopped = [
        n for n in plan.remove + plan.replace if n in hub.slots and await hub.stop_model(n) == "stopped"
    ]
    kept = {n: hub.slots[n] for n in plan.keep}
    hub.slots = {
        m.name: kept.get(m.name)
        or ModelSlot(
            m, ports[m.name], new.host_of(m), hub.notify, hub.engine.shared, hub.engine.prompt_cache_bytes
        )
        for m in new.models
    }
    hub.adopt(new)
    started, failed = await hub.start_each(plan.start)
    hub.notify()
    return {"started": started, "stopped": stopped, "unchanged": plan.keep, "failed": failed}
