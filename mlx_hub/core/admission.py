"""Admission: who may load, and who may run. A load takes a place in its group and under the
memory budget, or waits, or is refused; a request waits for its model's weights (starting a JIT load).

The rules themselves are pure (``policy.group_admission``, ``policy.budget_admission``);
this is the loop that applies them across the hub's models: evict what they
name, wait for a change, and give up after the model's ``queue_timeout`` with
the error a client should see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from mlx_hub.config import GroupConfig, HubConfig, is_budget_word, memory_bytes
from mlx_hub.core import logs, policy, prompt_caches
from mlx_hub.core.errors import (
    BudgetError,
    CapacityError,
    ModelLoadError,
    NotLoadedError,
    NotRunningError,
    RequestTooLargeError,
)
from mlx_hub.core.metrics import HubMetrics
from mlx_hub.core.slot import NO_RESERVATION, ModelSlot, Reservation
from mlx_hub.core.states import MemoryState, PortState
from mlx_hub.engine.base import Engine, EngineError, PromptCacheStore


class AdmissionHost(Protocol):
    """What admission reads and asks of the hub (``core.hub.Hub`` is one): the models, the budget, the
    engine, and the loop's plumbing (a background task, a wait for the next change, a wake-up)."""

    config: HubConfig
    slots: Mapping[str, ModelSlot]
    engine: Engine
    metrics: HubMetrics
    budget: int | None
    reap_interval: float
    memory_lock: asyncio.Lock
    prompt_store: PromptCacheStore | None

    async def wait_change(self, timeout: float | None = None) -> bool: ...
    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]: ...
    def notify(self) -> None: ...


log = logging.getLogger("mlx_hub.hub")


async def admit(hub: AdmissionHost, slot: ModelSlot) -> None:
    """Take a place in the slot's group and under the memory budget.

    Evicts idle, unpinned models as the rules allow, else waits up to the
    model's ``queue_timeout``: then ``CapacityError`` (429) if the group
    was full, ``BudgetError`` (503) if memory was.
    """
    group = hub.config.group(slot.entry.group)
    slot.estimate = hub.engine.estimate(slot.entry)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + slot.entry.queue_timeout
    while True:
        blocker, decision = first_refusal(hub, slot, group)
        if decision.admit:
            slot.move_memory(MemoryState.LOADING)
            return
        if decision.impossible:
            raise BudgetError(
                f"model '{slot.name}' needs about {slot.estimate / 1e9:.2f} GB, more than the whole "
                f"max_memory budget ({(hub.budget or 0) / 1e9:.2f} GB)",
                model=slot.name,
            )
        if decision.evict is not None:
            log.info("%s: unloading '%s' for '%s'", blocker, decision.evict, slot.name)
            reason = "group" if blocker.startswith("group") else "budget"
            await unload_slot(hub, hub.slots[decision.evict], reason=reason)
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            if blocker.startswith("group"):
                raise CapacityError(
                    f"{blocker} is at max_loaded ({group.max_loaded}) and every loaded member is busy; "
                    f"model '{slot.name}' waited {slot.entry.queue_timeout:g} s. Retry later.",
                    model=slot.name,
                )
            raise BudgetError(
                f"the memory budget ({(hub.budget or 0) / 1e9:.2f} GB) is full and every loaded model is "
                f"busy or pinned; model '{slot.name}' waited {slot.entry.queue_timeout:g} s. Retry later.",
                model=slot.name,
            )
        # Wake on any change, and at least every reap_interval: idle-time
        # eligibility (idle_unload_trigger_min) changes with the clock alone.
        await hub.wait_change(min(remaining, hub.reap_interval))


def first_refusal(
    hub: AdmissionHost, slot: ModelSlot, group: GroupConfig | None
) -> tuple[str, policy.Admission]:
    """The first rule that does not admit ``slot`` now (group, then budget), and its decision."""
    if group is not None and group.max_loaded is not None:
        trigger = group.idle_unload_trigger_min
        decision = policy.group_admission(
            slot.name,
            [s.candidate() for s in hub.slots.values() if s.entry.group == group.name],
            max_loaded=group.max_loaded,
            now=time.monotonic(),
            min_idle_seconds=None if trigger is None else trigger * 60.0,
        )
        if not decision.admit:
            return f"group '{group.name}'", decision
    decision = policy.budget_admission(
        slot.name, slot.estimate, [s.candidate() for s in hub.slots.values()], budget=hub.budget
    )
    return "memory budget", decision


async def acquire(hub: AdmissionHost, slot: ModelSlot, body: dict[str, Any] | None = None) -> Reservation:
    """Wait until ``slot`` can serve a request and count the request in; returns what it reserved.

    Called by the model app's gate. Loads a JIT model (one load however
    many requests arrive), waits out an unload, then admits the request's own
    memory (``admit_request``), and raises what the client should see
    otherwise. Pair with ``release``, passing back the reservation.
    """
    slot.waiting += 1
    need = None
    left = False
    try:
        while True:
            if slot.port_state not in (PortState.RUNNING, PortState.STARTING):
                raise NotRunningError(f"model '{slot.name}' is stopping", model=slot.name)
            state = slot.memory_state
            if state is MemoryState.LOADED:
                if need is None:  # counted once: the tokenizer is the model's, whatever happens next
                    need = await asyncio.to_thread(hub.engine.estimate_request, slot.entry, body)
                    continue  # the await may have seen the model unloaded
                reservation = await admit_request(hub, slot, need)
                if reservation is not None:
                    slot.begin_request(reservation)  # no await since the decision: it still fits
                    return reservation
                continue
            pending = slot.load_in_progress()
            if slot.held_back and not pending:  # it crashed the hub: only an explicit load retries it
                raise ModelLoadError(f"model '{slot.name}' {slot.held_back}", model=slot.name)
            if state is MemoryState.UNLOADING:
                await hub.wait_change()
            elif state is MemoryState.LOADING or pending or slot.entry.jit_enabled or _relaunches(slot):
                if not pending:
                    slot.load_for_requests = True  # a client that leaves may take it back
                await asyncio.shield(load_task(hub, slot))
            elif state is MemoryState.FAILED:
                raise ModelLoadError(
                    f"model '{slot.name}' failed to load: {slot.memory_error}", model=slot.name
                )
            else:
                raise NotLoadedError(
                    f"model '{slot.name}' is not loaded and jit_enabled is false; load it with "
                    f"`mlx-openai-server-hub load-model {slot.name}`",
                    model=slot.name,
                )
    except asyncio.CancelledError:
        left = True  # the client went away (the gate cancels its wait)
        raise
    finally:
        slot.waiting -= 1
        if left:
            drop_unwanted_load(slot)


def _relaunches(slot: ModelSlot) -> bool:
    """A sharded model whose group failed is launched again by the next request, JIT or not."""
    return slot.memory_state is MemoryState.FAILED and slot.entry.distributed is not None


def drop_unwanted_load(slot: ModelSlot) -> None:
    """Cancel a load that only requests asked for, once none waits for it and it has not begun.

    Still waiting for a group place or memory (the slot is not LOADING yet), it
    has evicted nothing it still needs to; cancelled there, it never loads.
    """
    task = slot.load_task
    if (
        slot.waiting == 0
        and slot.load_for_requests
        and task is not None
        and not task.done()
        and slot.memory_state in (MemoryState.UNLOADED, MemoryState.FAILED)
    ):
        log.info("model '%s': every request waiting for its load left; the load is dropped", slot.name)
        task.cancel()


def _gb(value: int | None) -> str:
    return f"{(value or 0) / 1e9:.3f} GB ({value or 0} bytes)"


async def admit_request(hub: AdmissionHost, slot: ModelSlot, need: Any) -> Reservation | None:
    """Make room for one request's reservation under the budget: the reservation once it fits.

    Evicts idle unpinned models as ``policy.request_admission`` names them,
    else waits up to the model's ``queue_timeout`` (then ``BudgetError``, 503
    with Retry-After). A request that could not fit beside its own model alone
    gets ``RequestTooLargeError`` (400) at once. None: the model left LOADED
    while this waited; the caller starts over. On a model that batches, the
    reservation includes the padding its batch adds (``policy.batch_padding``); whether it
    batches was judged when it loaded (``Loaded.batches``), not here.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + slot.entry.queue_timeout
    while slot.memory_state is MemoryState.LOADED:
        reservation = slot.reservation(need.kv_bytes, need.prefill_bytes, slot.batches)
        decision = policy.request_admission(
            slot.name,
            reservation.bytes,
            [s.candidate() for s in hub.slots.values()],
            budget=hub.budget,
            alone=need.bytes,
        )
        if decision.admit:
            return reservation
        if decision.impossible:
            raise RequestTooLargeError(
                f"this request to model '{slot.name}' can reach {need.tokens} tokens "
                f"({need.prompt_tokens} prompt + {need.max_tokens} max_tokens) and needs about "
                f"{_gb(need.bytes)} for its KV cache and prefill; beside the model's "
                f"{_gb(slot.held_bytes)} that exceeds the whole max_memory budget of {_gb(hub.budget)}. "
                "Send a shorter prompt or a smaller max_tokens.",
                model=slot.name,
            )
        if decision.evict is not None:
            log.info("memory budget: unloading '%s' for a request to '%s'", decision.evict, slot.name)
            await unload_slot(hub, hub.slots[decision.evict], reason="budget")
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise BudgetError(
                f"the memory budget ({_gb(hub.budget)}) is held by loaded models and requests in flight "
                f"({_gb(reserved_bytes(hub))} reserved); this request to '{slot.name}' needs "
                f"{_gb(need.bytes)} for {need.tokens} tokens and waited {slot.entry.queue_timeout:g} s. "
                "Retry later.",
                model=slot.name,
            )
        await hub.wait_change(min(remaining, hub.reap_interval))
    return None


def release(
    hub: AdmissionHost,
    slot: ModelSlot,
    keep_alive: float | None = None,
    reserved: Reservation = NO_RESERVATION,
) -> None:
    """Count a request out, giving back its ``reserved`` bytes. ``keep_alive`` (seconds; inf = never)
    overrides a JIT model's idle timer."""
    slot.end_request(reserved)
    if keep_alive is not None and slot.entry.jit_enabled:
        slot.keep_alive = keep_alive
        if keep_alive == 0 and not slot.busy and slot.memory_state is MemoryState.LOADED:
            hub.spawn(unload_slot(hub, slot, reason="keep_alive"), f"keep-alive:{slot.name}")
    hub.notify()


async def reap_idle(hub: AdmissionHost) -> list[str]:
    """Unload every JIT model whose idle timer ran out; one failing does not stop the rest."""
    candidates = [s.candidate() for s in hub.slots.values() if s.memory_state is MemoryState.LOADED]
    expired = policy.idle_expired(candidates, time.monotonic())
    for name in expired:
        slot = hub.slots.get(name)
        if slot is not None:
            try:
                await unload_slot(hub, slot, reason="idle")
            except Exception:
                log.exception("model '%s': idle unload failed", name)
    return expired


def resolve_budget(value: int | float | str | None, engine: Engine) -> tuple[int | None, str]:
    """``max_memory`` in bytes and where it came from: ``auto`` (the engine's working set), ``none``, or
    ``max_memory`` (a size or a fraction of physical memory)."""
    if value is None or (is_budget_word(value) and str(value).strip().lower() == "none"):
        return None, "none"
    if is_budget_word(value):
        return engine.working_set(), "auto"
    return memory_bytes(value, engine.system_memory()), "max_memory"


def reserved_bytes(hub: AdmissionHost) -> int:
    """What the requests in flight reserve, over every model."""
    return sum(s.reserved_bytes for s in hub.slots.values())


def allocation_failed(hub: AdmissionHost, slot: ModelSlot) -> None:
    """MLX could not allocate inside one of ``slot``'s requests: free what that request left behind.

    Its KV cache and activations are garbage once upstream's generator has
    unwound; collecting them and emptying MLX's buffer cache gives the
    memory back before the next request is admitted.
    """
    log.warning("model '%s': a request ran out of memory; freeing its KV state", slot.name)
    hub.engine.free_memory()
    hub.metrics.allocation_failed(slot.name)
    hub.notify()


# ------------------------------------------------------------------ load / unload


def load_task(hub: AdmissionHost, slot: ModelSlot) -> asyncio.Task[None]:
    """The one load in progress for ``slot``, started if there is none (single flight).

    A background task, so a client that leaves never cancels a load others wait for.
    """
    return slot.single_load(lambda: hub.spawn(_load_flow(hub, slot), f"load:{slot.name}"))


async def _load_flow(hub: AdmissionHost, slot: ModelSlot) -> None:
    logs.current_model.set(slot.name)  # this task's context: upstream's load lines go to its log
    await admit(hub, slot)  # returns with slot LOADING, or raises
    try:
        loaded = await slot.load(hub.engine, hub.memory_lock)
        hub.engine.bound_prompt_cache(loaded.handler, hub.budget)
        prompt_caches.attach(
            hub.prompt_store, hub.engine, slot, loaded.handler
        )  # no await since: no request yet
    except EngineError as exc:
        log.error("model '%s' failed to load: %s", slot.name, exc)
        raise ModelLoadError(f"model '{slot.name}' failed to load: {exc}", model=slot.name) from None
    hub.metrics.loaded(slot.name, loaded.load_seconds)
    if loaded.ended is not None:
        hub.spawn(_fail_when_ended(hub, slot, loaded.ended), f"watch:{slot.name}")
    log.info(
        "model '%s' loaded in %.2f s (%.1f MB)", slot.name, loaded.load_seconds, loaded.memory_bytes / 1e6
    )


async def _fail_when_ended(hub: AdmissionHost, slot: ModelSlot, ended: asyncio.Future[str | None]) -> None:
    """A model whose serving processes ended on their own: free it and show it failed, with why.

    Its requests in flight have already lost their connection; the next request
    (or ``start-model``/``load-model``) launches it again.
    """
    reason = await ended
    if reason is None:
        return  # the hub unloaded it
    log.error("%s", reason)
    if slot.memory_state is MemoryState.LOADED:
        await unload_slot(hub, slot, "its processes ended", patient=False)
    if slot.memory_state is MemoryState.UNLOADED:
        slot.move_memory(MemoryState.FAILED, reason)


async def unload_slot(
    hub: AdmissionHost, slot: ModelSlot, reason: str = "manual", *, patient: bool = True
) -> None:
    """Unload ``slot`` (single flight); ``patient``: wait for its requests to finish first."""
    task = slot.single_unload(
        lambda: hub.spawn(_unload_flow(hub, slot, reason, patient), f"unload:{slot.name}")
    )
    await asyncio.shield(task)


async def _unload_flow(hub: AdmissionHost, slot: ModelSlot, reason: str, patient: bool = True) -> None:
    if slot.memory_state is not MemoryState.LOADED:
        return
    await slot.unload(hub.engine, hub.memory_lock, patient=patient)
    hub.metrics.unloaded(slot.name, reason)
    log.info("model '%s' unloaded (%s), %.1f MB freed", slot.name, reason, (slot.freed_bytes or 0) / 1e6)
