"""Reload: apply a new hub.yaml to a running hub, model by model, as ``policy.reload_plan`` decides.

Unchanged models keep their slot (a loaded model stays loaded); removed and
changed ones stop first; then the new defaults and the changed models that were
running start. New entries keep hub.yaml's order, which dashboards show.
"""

from __future__ import annotations

from typing import Any, Protocol

from mlx_hub.config import HubConfig, ModelConfig
from mlx_hub.core import policy
from mlx_hub.core.ports import PortBook
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.states import PortState


class ReloadHost(Protocol):
    """What a reload changes on the hub (``core.hub.Hub`` is one)."""

    config: HubConfig
    slots: dict[str, ModelSlot]

    def new_slot(self, entry: ModelConfig, port: int, host: str) -> ModelSlot: ...
    def adopt(self, config: HubConfig) -> None: ...
    def notify(self) -> None: ...
    async def stop_model(self, name: str, *, drain_timeout: float | None = None) -> str: ...
    async def start_each(self, names: list[str]) -> tuple[list[str], dict[str, str]]: ...


async def apply(hub: ReloadHost, new: HubConfig) -> dict[str, Any]:
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
        m.name: kept.get(m.name) or hub.new_slot(m, ports[m.name], new.host_of(m)) for m in new.models
    }
    hub.adopt(new)
    started, failed = await hub.start_each(plan.start)
    hub.notify()
    return {"started": started, "stopped": stopped, "unchanged": plan.keep, "failed": failed}
