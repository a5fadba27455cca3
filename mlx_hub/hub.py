"""The hub: many models in one process, each on its own port, loaded when needed.

``Hub`` owns one ``ModelSlot`` per hub.yaml entry and every transition between
their states. All of it runs on one asyncio loop; inference runs on the
upstream handlers' own threads, so the loop stays free to serve HTTP, and the
state below needs no locks beyond ordering awaits carefully: a check and the
state change it justifies always happen with no ``await`` between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import engine, logs, policy
from .config import HubConfig, load_config, memory_bytes, parse_config
from .engine import Engine, MLXEngine
from .errors import (
    BudgetError,
    CapacityError,
    HubError,
    ModelLoadError,
    NoConfigFileError,
    NotLoadedError,
    NotRunningError,
    PortStartError,
    UnknownModelError,
)
from .metrics import HubMetrics
from .ports import PortBook, PortError
from .slot import OCCUPYING, MemoryState, ModelSlot, PortState
from .status import HubStatus, build_status

log = logging.getLogger(__name__)

ConfigSource = HubConfig | dict[str, Any] | str | os.PathLike[str]

#: Builds the ASGI app a model's port serves; the web layer supplies it, so the core never imports web.
AppFactory = Callable[["Hub", ModelSlot], Any]


def _as_config(source: ConfigSource) -> tuple[HubConfig, Path | None]:
    if isinstance(source, HubConfig):
        return source, None
    if isinstance(source, dict):
        return parse_config(source, source="<dict>"), None
    path = Path(source).expanduser().resolve()
    return load_config(path), path


class Hub:
    """Serve every model in a hub.yaml from this process.

    Use ``async with Hub.from_config("hub.yaml") as hub:`` or call ``start()``
    and ``shutdown()`` yourself. Every public coroutine returns the reference
    hub's status word (``loaded``, ``already_loaded``, ``started``, ...) and
    raises a ``HubError`` subclass that knows its HTTP status.
    """

    def __init__(
        self,
        config: HubConfig,
        *,
        app_factory: AppFactory,
        engine: Engine | None = None,
        config_path: Path | None = None,
        reap_interval: float = 1.0,
        model_logs: bool = False,
        freeze_gc: bool = False,
    ):
        self.config = config
        self.app_factory = app_factory  # the ASGI app each model port serves (web.model_app)
        self.engine: Engine = engine or MLXEngine()  # what loads, frees and measures models
        self.config_path = config_path
        self.reap_interval = reap_interval
        self.model_logs = model_logs  # per-model log files; the daemon turns this on
        # gc.freeze() after imports: a full collection drops from ~0.2 s to ~0 on
        # every unload. Process-wide, so only the daemon, which owns its process, asks.
        self.freeze_gc = freeze_gc
        self.ready = False  # the first start() has finished (the CLI waits for this)
        self.slots: dict[str, ModelSlot] = {}
        self.started_at: float | None = None
        self._change = asyncio.Event()
        self._memory_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.budget = self._budget(config)
        self._api_keys = config.keys
        self.metrics = HubMetrics(self.status_document)

    def _budget(self, config: HubConfig) -> int | None:
        if config.max_memory is None:
            return None
        return memory_bytes(config.max_memory, self.engine.system_memory())

    @classmethod
    def from_config(cls, source: ConfigSource, **kwargs: Any) -> Hub:
        """Build from a ``HubConfig``, a dict shaped like hub.yaml, or a path to one."""
        config, path = _as_config(source)
        return cls(config, config_path=path, **kwargs)

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ------------------------------------------------------------ lifecycle

    async def start(self, names: Iterable[str] | None = None) -> list[str]:
        """Register every model, then start the ``default: true`` ones (or ``names``).

        A model that fails to start is marked failed and reported in status;
        the others start regardless. Returns the names that started.
        """
        if self.started_at is None:
            ports = PortBook.for_config(self.config).assign(self.config)
            for entry in self.config.models:
                self.slots[entry.name] = ModelSlot(
                    entry, ports[entry.name], self.config.host_of(entry), self._notify
                )
            self._reaper = asyncio.create_task(self._reap_forever(), name="hub:idle-reaper")
            self.started_at = time.time()
            # Import the handler modules now, off the loop, so a JIT model's
            # first request pays for its weights, not for importing mlx-lm.
            await asyncio.to_thread(self.engine.preload, {m.model_type for m in self.config.models})
            if self.freeze_gc:
                # Nothing is loaded yet: only import-time objects are frozen, and
                # every later full collection (one per unload) skips them.
                gc.collect()
                gc.freeze()
        wanted = list(names) if names is not None else [m.name for m in self.config.models if m.default]
        for name in wanted:
            self._slot(name)  # unknown names fail before anything starts
        try:
            return await self.start_many(wanted)
        finally:
            self.ready = True

    async def start_many(self, names: list[str]) -> list[str]:
        """Start each model in turn; one failing does not stop the rest. Returns those started."""
        started = []
        for name in names:
            try:
                await self.start_model(name)
                started.append(name)
            except HubError as exc:
                log.error("model '%s' did not start: %s", name, exc)
        return started

    async def stop_all(self, *, drain_timeout: float | None = None) -> list[str]:
        """Stop every running model, keeping the hub (the CLI's ``stop``). Returns those stopped.

        One model failing to stop does not keep the others running; its error is logged by name.
        """
        names = list(self.slots)
        results = await asyncio.gather(
            *(self.stop_model(n, drain_timeout=drain_timeout) for n in names), return_exceptions=True
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("model '%s' did not stop cleanly: %s", name, result, exc_info=result)
        return [n for n, r in zip(names, results, strict=True) if r == "stopped"]

    async def shutdown(self, *, drain_timeout: float | None = None) -> None:
        """Stop every model (requests get ``drain_timeout`` s to finish), free memory, close every port."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await self.stop_all(drain_timeout=drain_timeout)
        for task in list(self._tasks):
            task.cancel()
        self.started_at = None
        self.ready = False
        self.slots.clear()

    # --------------------------------------------------------------- models

    async def start_model(self, name: str) -> str:
        """Open the model's port; load it now unless it is JIT. ``started`` or ``already_running``.

        A load failure leaves the port open, answering 503 with the error, and
        raises ``ModelLoadError``; a taken port raises ``PortStartError``.
        """
        slot = self._slot(name)
        async with slot.op_lock:
            if slot.port_state is PortState.RUNNING:
                return "already_running"
            if self.model_logs:
                logs.attach_model(slot.entry, self.config)
            try:
                await slot.start_port(self.app_factory(self, slot))
            except PortError as exc:
                raise PortStartError(f"model '{name}': {exc}", model=name) from None
            log.info("model '%s' serving on http://%s:%d", name, slot.host, slot.port)
        if not slot.entry.jit_enabled:
            await self.load(name)
        return "started"

    async def stop_model(self, name: str, *, drain_timeout: float | None = None) -> str:
        """Stop accepting, let in-flight requests finish, unload, close. ``stopped`` or ``not_running``.

        Requests still running after ``drain_timeout`` seconds (hub.yaml's
        ``drain_timeout`` unless given) are cancelled: a stream ends where it
        is, a request not yet answered gets 503 ``model_stopped``. So neither a
        stuck generation nor a client that never reads holds a stop forever.
        """
        slot = self._slot(name)
        if drain_timeout is None:
            drain_timeout = self.config.drain_timeout
        async with slot.op_lock:
            if slot.port_state not in (PortState.RUNNING, PortState.STARTING, PortState.FAILED):
                return "not_running"
            was_running = await slot.stop_port(drain_timeout, self._wait_change)
            if slot.memory_state in OCCUPYING:
                await self.unload(name, wait_for_requests=False)
            if self.model_logs:
                logs.detach_model(name)
            slot.stopped()
            log.info("model '%s' stopped", name)
        return "stopped" if was_running else "not_running"

    async def load(self, name: str) -> str:
        """Load the weights now (the port must be running). ``loaded`` or ``already_loaded``."""
        slot = self._slot(name)
        if slot.port_state not in (PortState.RUNNING, PortState.STARTING):
            raise NotRunningError(f"model '{name}' is not started; start it before loading", model=name)
        if slot.memory_state is MemoryState.LOADED:
            return "already_loaded"
        if slot.memory_state is MemoryState.UNLOADING:
            await self._await_unload(slot)
        await asyncio.shield(self._load_task(slot))
        return "loaded"

    async def unload(self, name: str, *, wait_for_requests: bool = True) -> str:
        """Free the weights, keeping the port open. ``unloaded`` or ``not_loaded``.

        Waits for running requests and streams to finish (unless a stop has
        already drained and cancelled them); requests that arrive meanwhile
        wait, then load the model again if it is JIT.
        """
        slot = self._slot(name)
        if slot.load_task is not None and not slot.load_task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(slot.load_task)
        if slot.memory_state not in (MemoryState.LOADED, MemoryState.UNLOADING):
            return "not_loaded"
        await self._await_unload(
            slot, reason="manual" if wait_for_requests else "stop", patient=wait_for_requests
        )
        return "unloaded"

    # ------------------------------------------------------- request gate

    async def acquire(self, slot: ModelSlot) -> None:
        """Wait until ``slot`` can serve a request and count the request in.

        Called by the model app's gate. Loads a JIT model (one load however
        many requests arrive), waits out an unload, and raises what the
        client should see otherwise. Pair with ``release``.
        """
        slot.waiting += 1
        try:
            while True:
                if slot.port_state not in (PortState.RUNNING, PortState.STARTING):
                    raise NotRunningError(f"model '{slot.name}' is stopping", model=slot.name)
                state = slot.memory_state
                if state is MemoryState.LOADED:
                    slot.begin_request()
                    return
                pending = slot.load_in_progress()
                if state is MemoryState.UNLOADING:
                    await self._wait_change()
                elif state is MemoryState.LOADING or pending or slot.entry.jit_enabled:
                    await asyncio.shield(self._load_task(slot))
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
        finally:
            slot.waiting -= 1

    def release(self, slot: ModelSlot, keep_alive: float | None = None) -> None:
        """Count a request out. ``keep_alive`` (seconds; inf = never) overrides a JIT model's idle timer."""
        slot.end_request()
        if keep_alive is not None and slot.entry.jit_enabled:
            slot.keep_alive = keep_alive
            if keep_alive == 0 and not slot.busy and slot.memory_state is MemoryState.LOADED:
                self._spawn(self._await_unload(slot, reason="keep_alive"), f"keep-alive:{slot.name}")
        self._notify()

    # ------------------------------------------------------ load / unload

    def _load_task(self, slot: ModelSlot) -> asyncio.Task[None]:
        """The one load in progress for ``slot``, started if there is none (single flight)."""
        return slot.single_load(lambda: self._spawn(self._load_flow(slot), f"load:{slot.name}"))

    async def _load_flow(self, slot: ModelSlot) -> None:
        logs.current_model.set(slot.name)  # this task's context: upstream's load lines go to its log
        await self._admit(slot)  # returns with slot LOADING, or raises
        try:
            loaded = await slot.load(self.engine, self._memory_lock)
        except engine.EngineError as exc:
            log.error("model '%s' failed to load: %s", slot.name, exc)
            raise ModelLoadError(f"model '{slot.name}' failed to load: {exc}", model=slot.name) from None
        self.metrics.loaded(slot.name, loaded.load_seconds)
        log.info(
            "model '%s' loaded in %.2f s (%.1f MB)", slot.name, loaded.load_seconds, loaded.memory_bytes / 1e6
        )

    async def _admit(self, slot: ModelSlot) -> None:
        """Take a place in the slot's group and under the memory budget.

        Evicts idle, unpinned models as the rules allow, else waits up to the
        model's ``queue_timeout``: then ``CapacityError`` (429) if the group
        was full, ``BudgetError`` (503) if memory was.
        """
        group = self.config.group(slot.entry.group)
        slot.estimate = self.engine.estimate(slot.entry)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + slot.entry.queue_timeout
        while True:
            blocker, decision = self._admission(slot, group)
            if decision.admit:
                slot.move_memory(MemoryState.LOADING)
                return
            if decision.impossible:
                raise BudgetError(
                    f"model '{slot.name}' needs about {slot.estimate / 1e9:.2f} GB, more than the whole "
                    f"max_memory budget ({(self.budget or 0) / 1e9:.2f} GB)",
                    model=slot.name,
                )
            if decision.evict is not None:
                log.info("%s: unloading '%s' for '%s'", blocker, decision.evict, slot.name)
                reason = "group" if blocker.startswith("group") else "budget"
                await self._await_unload(self.slots[decision.evict], reason=reason)
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
                    f"the memory budget ({(self.budget or 0) / 1e9:.2f} GB) is full and every loaded model is "
                    f"busy or pinned; model '{slot.name}' waited {slot.entry.queue_timeout:g} s. Retry later.",
                    model=slot.name,
                )
            # Wake on any change, and at least every reap_interval: idle-time
            # eligibility (idle_unload_trigger_min) changes with the clock alone.
            await self._wait_change(min(remaining, self.reap_interval))

    def _admission(self, slot: ModelSlot, group: Any) -> tuple[str, policy.Admission]:
        """The first rule that does not admit ``slot`` now (group, then budget), and its decision."""
        if group is not None and group.max_loaded is not None:
            trigger = group.idle_unload_trigger_min
            decision = policy.group_admission(
                slot.name,
                [s.candidate() for s in self.slots.values() if s.entry.group == group.name],
                max_loaded=group.max_loaded,
                now=time.monotonic(),
                min_idle_seconds=None if trigger is None else trigger * 60.0,
            )
            if not decision.admit:
                return f"group '{group.name}'", decision
        decision = policy.budget_admission(
            slot.name, slot.estimate, [s.candidate() for s in self.slots.values()], budget=self.budget
        )
        return "memory budget", decision

    async def _await_unload(self, slot: ModelSlot, reason: str = "manual", *, patient: bool = True) -> None:
        task = slot.single_unload(
            lambda: self._spawn(self._unload_flow(slot, reason, patient), f"unload:{slot.name}")
        )
        await asyncio.shield(task)

    async def _unload_flow(self, slot: ModelSlot, reason: str, patient: bool = True) -> None:
        if slot.memory_state is not MemoryState.LOADED:
            return
        await slot.unload(self.engine, self._memory_lock, patient=patient)
        self.metrics.unloaded(slot.name, reason)
        log.info("model '%s' unloaded (%s), %.1f MB freed", slot.name, reason, (slot.freed_bytes or 0) / 1e6)

    # ----------------------------------------------------------- idle reaper

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            await self.reap_idle()

    async def reap_idle(self) -> list[str]:
        """Unload every JIT model whose idle timer ran out; returns their names."""
        candidates = [s.candidate() for s in self.slots.values() if s.memory_state is MemoryState.LOADED]
        expired = policy.idle_expired(candidates, time.monotonic())
        for name in expired:
            slot = self.slots.get(name)
            if slot is not None:
                try:
                    await self._await_unload(slot, reason="idle")
                except Exception:
                    log.exception("model '%s': idle unload failed", name)
        return expired

    # ---------------------------------------------------------------- reload

    async def reload(self, source: ConfigSource | None = None) -> dict[str, list[str]]:
        """Apply a new config: start new defaults, stop removed models, restart changed ones.

        Unchanged models are not touched (a loaded model stays loaded). A
        config that does not validate raises ``ConfigError`` before anything
        changes. ``source`` defaults to re-reading the file the hub came from.
        """
        if source is None:
            if self.config_path is None:
                raise NoConfigFileError(
                    "this hub was started from an in-memory config, so there is no hub.yaml to re-read; "
                    "pass the new config to reload()"
                )
            source = self.config_path
        new, path = _as_config(source)
        async with self._reload_lock:
            running = {n for n, s in self.slots.items() if s.port_state is PortState.RUNNING}
            ports = PortBook.for_config(new).assign(new, held={n: self.slots[n].port for n in running})
            plan = policy.reload_plan(
                [policy.Placement(n, s.entry.model_dump(), s.port, s.host) for n, s in self.slots.items()],
                running,
                [
                    policy.Placement(m.name, m.model_dump(), ports[m.name], new.host_of(m), m.default)
                    for m in new.models
                ],
            )
            stopped = [
                n
                for n in plan.remove + plan.replace
                if n in self.slots and await self.stop_model(n) == "stopped"
            ]
            kept = {n: self.slots[n] for n in plan.keep}
            # New entries keep hub.yaml's order, which dashboards show.
            self.slots = {
                m.name: kept.get(m.name) or ModelSlot(m, ports[m.name], new.host_of(m), self._notify)
                for m in new.models
            }
            self.config = new
            self.budget = self._budget(new)
            self._api_keys = new.keys
            if path is not None:
                self.config_path = path
            started = await self.start_many(plan.start)
            self._notify()
        return {"started": started, "stopped": stopped, "unchanged": plan.keep}

    # ---------------------------------------------------------------- status

    def status_document(self) -> HubStatus:
        """The ``/hub/status`` document, typed: the reference hub's shape plus memory figures."""
        return build_status(self)

    def log_file(self, slot: ModelSlot) -> str | None:
        """The model's own log file, when this hub writes per-model logs."""
        path = logs.model_log_path(slot.entry, self.config) if self.model_logs else None
        return str(path) if path else None

    def status(self) -> dict[str, Any]:
        """``status_document()`` as the JSON-ready dict ``/hub/status`` sends."""
        return self.status_document().model_dump(mode="json")

    # --------------------------------------------------------------- helpers

    def find(self, requested: str) -> ModelSlot | None:
        """The slot a request's ``model`` means: an entry name, else a served_model_name or model_path.

        Several entries may serve one path; the loaded one wins, then a running one.
        """
        if requested in self.slots:
            return self.slots[requested]
        matches = [s for s in self.slots.values() if requested in s.entry.names]
        matches.sort(
            key=lambda s: (s.memory_state is not MemoryState.LOADED, s.port_state is not PortState.RUNNING)
        )
        return matches[0] if matches else None

    @property
    def api_keys(self) -> frozenset[str]:
        return self._api_keys

    def _slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join(self.slots) or "none"
            raise UnknownModelError(f"no model named '{name}' (models: {known})", model=name)
        return slot

    def _notify(self) -> None:
        """Wake everyone waiting for any state change (a new event for the next wait)."""
        self._change.set()
        self._change = asyncio.Event()

    async def _wait_change(self, timeout: float | None = None) -> bool:
        """Sleep until the next state change; False if ``timeout`` passed first."""
        event = self._change
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """A background task of the hub; a failure nobody awaits is logged with the task's name."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap_task)
        return task

    def _reap_task(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # retrieved, so asyncio does not warn about it
        if error is not None and task.get_name().startswith("keep-alive:"):
            # Nobody awaits a keep_alive unload; loads and unloads are awaited by their callers.
            log.error("%s failed: %s", task.get_name(), error, exc_info=error)
