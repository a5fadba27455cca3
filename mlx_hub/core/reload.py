"""Reload: apply a new hub.yaml to a running hub, model by model, as ``policy.reload_plan`` decides.

Unchanged models keep their slot (a loaded model stays loaded); removed and
changed ones stop first; then the new defaults and the changed models that were
running start. New entries keep hub.yaml's order, which dashboards show.
``adopt`` is what taking a config means, at construction and at each reload:
the prompt store, the memory budget, the API keys and the group timers follow it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from mlx_hub.config import ConfigSource, HubConfig, ModelConfig, read_config
from mlx_hub.core import admission, policy, prompt_caches
from mlx_hub.core.errors import NoConfigFileError
from mlx_hub.core.ports import PortBook
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.states import PortState
from mlx_hub.engine.base import Engine, PromptCacheStore


class ReloadHost(Protocol):
    """What a reload changes on the hub (``core.hub.Hub`` is one)."""

    config: HubConfig
    config_path: Path | None
    slots: dict[str, ModelSlot]
    engine: Engine
    prompt_store: PromptCacheStore | None
    budget: int | None
    budget_source: str | None
    api_keys: frozenset[str]

    def new_slot(self, entry: ModelConfig, port: int, host: str) -> ModelSlot: ...
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
    adopt(hub, new)
    started, failed = await hub.start_each(plan.start)
    hub.notify()
    return {"started": started, "stopped": stopped, "unchanged": plan.keep, "failed": failed}


def register(hub: ReloadHost) -> None:
    """The first start's slots: a port for each entry (``ports.json`` kept), one slot each, groups linked."""
    ports = PortBook.for_config(hub.config).assign(hub.config)
    hub.slots = {m.name: hub.new_slot(m, ports[m.name], hub.config.host_of(m)) for m in hub.config.models}
    link_groups(hub)


def read(hub: ReloadHost, source: ConfigSource | None) -> tuple[HubConfig, Path | None]:
    """The config a reload applies (``source``, else the file the hub came from), and its path.

    A config that does not validate, or an unusable ``prompt_cache_path``,
    raises ``ConfigError`` here, before anything changes.
    """
    if source is None:
        if hub.config_path is None:
            raise NoConfigFileError(
                "this hub was started from an in-memory config, so there is no hub.yaml to re-read; "
                "pass the new config to reload()"
            )
        source = hub.config_path
    new, path = read_config(source, hub.engine.option_choices())
    hub.prompt_store = prompt_caches.store_for(new, hub.engine, hub.prompt_store)
    return new, path


def adopt(hub: ReloadHost, config: HubConfig) -> None:
    """Take ``config`` as the running one: the memory budget, API keys and group timers follow it."""
    hub.prompt_store = prompt_caches.store_for(config, hub.engine, hub.prompt_store)
    hub.config = config
    link_groups(hub)
    hub.budget, hub.budget_source = admission.resolve_budget(config.max_memory, hub.engine)
    hub.engine.set_memory_limit(hub.budget)
    for slot in hub.slots.values():  # a new budget bounds the prompt caches already held
        if slot.handler is not None:
            hub.engine.bound_prompt_cache(slot.handler, hub.budget)
    hub.api_keys = config.keys


def link_groups(hub: ReloadHost) -> None:
    """Give each slot its group's ``idle_unload_trigger_min`` (its idle timer where it sets none)."""
    for slot in hub.slots.values():
        group = hub.config.group(slot.entry.group)
        slot.group_idle_minutes = group.idle_unload_trigger_min if group is not None else None
