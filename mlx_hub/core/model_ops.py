"""Start, stop, load and unload one model, as the hub's verbs do them.

``Hub.start_model``, ``stop_model``, ``load`` and ``unload`` (and their batch
forms) are these functions, given the hub (``ModelHost``). Each says the
reference hub's status word. A stop turns new requests away, waits out or
cancels a pending load, lets running requests finish for ``drain_timeout``
seconds, cancels the rest, unloads and closes the port. Admission (admission.py)
decides who may load; the slot (slot.py) and its port (model_port.py) make
each checked move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mlx_hub.core import admission, logs
from mlx_hub.core.admission import AdmissionHost
from mlx_hub.core.errors import HubError, NotRunningError, PortStartError, UnknownModelError
from mlx_hub.core.ports import PortError
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.states import OCCUPYING, MemoryState, PortState

# The names these lines had before they moved here, so hub.log reads as it did.
log = logging.getLogger("mlx_hub.core.hub")
drain_log = logging.getLogger("mlx_hub.core.slot")

#: How long cancelled requests get to unwind before a stop frees their model regardless.
CANCEL_GRACE_SECONDS = 5.0


class ModelHost(AdmissionHost, Protocol):
    """What the verbs read and call on the hub (``core.hub.Hub`` is one)."""

    model_logs: bool
    ready: bool
    app_factory: Callable[[Any, ModelSlot], Any]

    async def load(self, name: str) -> str: ...
    async def unload(self, name: str, *, wait_for_requests: bool = True) -> str: ...
    async def start_model(self, name: str) -> str: ...
    async def stop_model(self, name: str, *, drain_timeout: float | None = None) -> str: ...


async def start_model(hub: ModelHost, slot: ModelSlot) -> str:
    """Open the model's port; load it now unless it is JIT (``Hub.start_model``)."""
    async with slot.op_lock:
        if slot.port_state is PortState.RUNNING:
            return "already_running"
        if hub.model_logs:
            logs.attach_model(slot.entry, hub.config)
        try:
            await slot.model_port.start(hub.app_factory(hub, slot))
        except PortError as exc:
            raise PortStartError(f"model '{slot.name}': {exc}", model=slot.name) from None
        log.info("model '%s' serving on http://%s:%d", slot.name, slot.host, slot.port)
    if not slot.entry.jit_enabled and not slot.held_back:
        await hub.load(slot.name)
    return "started"


async def stop_model(hub: ModelHost, slot: ModelSlot, drain_timeout: float | None) -> str:
    """Stop accepting, drain (for hub.yaml's ``drain_timeout`` unless given), unload, close (``Hub.stop_model``)."""
    if drain_timeout is None:
        drain_timeout = hub.config.drain_timeout
    async with slot.op_lock:
        if slot.port_state not in (PortState.RUNNING, PortState.STARTING, PortState.FAILED):
            return "not_running"
        was_running = await stop_port(slot, drain_timeout, hub.wait_change)
        if slot.memory_state in OCCUPYING:
            await hub.unload(slot.name, wait_for_requests=False)
        if hub.model_logs:
            logs.detach_model(slot.name)
        slot.stopped()
        log.info("model '%s' stopped", slot.name)
    return "stopped" if was_running else "not_running"


async def load(hub: ModelHost, slot: ModelSlot) -> str:
    """Load the weights now, opening the port first if it is closed (``Hub.load``)."""
    name = slot.name
    if slot.port_state is PortState.STOPPING:
        raise NotRunningError(f"model '{name}' is stopping; load it once it has stopped", model=name)
    slot.held_back = None  # an explicit load is the one way a model held back after a crash loads again
    if slot.port_state is not PortState.RUNNING and slot.port_state is not PortState.STARTING:
        await hub.start_model(name)  # loads a non-JIT model as well
        if slot.memory_state is MemoryState.LOADED:
            return "loaded"
    if slot.memory_state is MemoryState.LOADED:
        return "already_loaded"
    if slot.memory_state is MemoryState.UNLOADING:
        await admission.unload_slot(hub, slot)
    task = admission.load_task(hub, slot)
    slot.load_for_requests = False  # asked for by name: it loads whoever leaves
    await asyncio.shield(task)
    return "loaded"


async def unload(hub: ModelHost, slot: ModelSlot, wait_for_requests: bool) -> str:
    """Free the weights, keeping the port open (``Hub.unload``)."""
    if slot.load_task is not None and not slot.load_task.done():
        with contextlib.suppress(Exception):
            await asyncio.shield(slot.load_task)
    if slot.memory_state not in (MemoryState.LOADED, MemoryState.UNLOADING):
        return "not_loaded"
    await admission.unload_slot(
        hub, slot, reason="manual" if wait_for_requests else "stop", patient=wait_for_requests
    )
    return "unloaded"


async def start_each(hub: ModelHost, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Start each model in turn; one failing does not stop the rest. Returns those started, and why
    each of the others failed (name: error)."""
    started, failed = [], {}
    for name in names:
        try:
            await hub.start_model(name)
            started.append(name)
        except HubError as exc:
            log.error("model '%s' did not start: %s", name, exc)
            failed[name] = exc.message
    return started, failed


async def start_then_ready(
    hub: ModelHost, names: list[str], before_ready: Callable[[Any], Awaitable[None]] | None
) -> list[str]:
    """``Hub.start``'s models, each in turn (unknown names fail first); those that started.

    ``before_ready`` runs after them (a supervised hub restores what a crash
    took there), and ``hub.ready`` turns true only once it ended, whatever
    failed: a CLI waiting for ``ready`` never reads a half-restored table.
    """
    try:
        if unknown := [n for n in names if n not in hub.slots]:
            raise UnknownModelError.among(unknown[0], hub.slots)
        return (await start_each(hub, names))[0]
    finally:
        try:
            if before_ready is not None:
                await before_ready(hub)
        finally:
            hub.ready = True


async def start_defaults(hub: ModelHost) -> tuple[list[str], dict[str, str]]:
    """Start the startup set's models that are not running (``start`` on a running hub, the Start button)."""
    names = [
        n
        for n in hub.config.startup_models()
        if n in hub.slots and hub.slots[n].port_state not in (PortState.RUNNING, PortState.STARTING)
    ]
    return await start_each(hub, names)


async def stop_all(hub: ModelHost, drain_timeout: float | None) -> list[str]:
    """Stop every model at once; one failing to stop is logged by name and keeps no other running."""
    names = list(hub.slots)
    results = await asyncio.gather(
        *(hub.stop_model(n, drain_timeout=drain_timeout) for n in names), return_exceptions=True
    )
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.error("model '%s' did not stop cleanly: %s", name, result, exc_info=result)
    return [n for n, r in zip(names, results, strict=True) if r == "stopped"]


async def stop_port(
    slot: ModelSlot, drain_timeout: float, wait_change: Callable[[float], Awaitable[bool]]
) -> bool:
    """Start stopping: turn new requests away, wait out (or cancel) a pending load, drain, close.

    Returns whether the port was serving. The caller unloads the weights
    and then calls ``slot.stopped``.
    """
    was_running = slot.port_state is not PortState.FAILED
    slot.model_port.move(PortState.STOPPING)  # the gate now turns new requests away
    task = slot.load_task
    if task is not None and not task.done():
        if slot.memory_state is MemoryState.UNLOADED:
            task.cancel()  # still waiting for a group place: nothing to undo
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(task)
    await drain(slot, drain_timeout, wait_change)
    await slot.model_port.close(timeout=1.0)
    return was_running


async def drain(slot: ModelSlot, timeout: float, wait_change: Callable[[float], Awaitable[bool]]) -> None:
    """Let running requests finish for ``timeout`` s, then cancel what is left (a stop's drain).

    A cancelled stream is cut where it is; a request not yet answered gets
    503 from the gate. What does not end within ``CANCEL_GRACE_SECONDS`` of
    its cancellation is logged, and the stop goes on regardless.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while slot.active > 0 and loop.time() < deadline:
        await wait_change(deadline - loop.time())
    if slot.active == 0:
        return
    drain_log.warning(
        "model '%s': %d request(s) still running after %g s; cancelling them", slot.name, slot.active, timeout
    )
    for task in list(slot.requests):
        task.cancel()
    deadline = loop.time() + CANCEL_GRACE_SECONDS
    while slot.active > 0 and loop.time() < deadline:
        await wait_change(deadline - loop.time())
    if slot.active > 0:
        drain_log.error(
            "model '%s': %d request(s) did not end when cancelled; freeing the model anyway",
            slot.name,
            slot.active,
        )
