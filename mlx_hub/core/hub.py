"""The hub: many models in one process, each on its own port, loaded when needed.

``Hub`` owns one ``ModelSlot`` per hub.yaml entry and decides what spans models
(admission.py, reload.py); each slot makes its own checked moves. All of it runs
on one asyncio loop, with inference on upstream's threads: a check and the state
change it justifies happen with no ``await`` between them, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mlx_hub.config import ConfigSource, HubConfig, ModelConfig, read_config
from mlx_hub.core import admission, logs, prompt_caches, reload
from mlx_hub.core.activity import Activity
from mlx_hub.core.errors import (
    HubError,
    NoConfigFileError,
    NotRunningError,
    PortStartError,
    UnknownModelError,
)
from mlx_hub.core.metrics import HubMetrics
from mlx_hub.core.ports import PortBook, PortError
from mlx_hub.core.report import build_status
from mlx_hub.core.serving import ServeFactory
from mlx_hub.core.signals import Background, Changes
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.states import OCCUPYING, MemoryState, PortState
from mlx_hub.core.status import HubStatus, Supervision
from mlx_hub.engine.base import Engine
from mlx_hub.engine.prompt_store import PromptStore

log = logging.getLogger(__name__)

#: Builds the ASGI app a model's port serves; the web layer supplies it, so the core never imports web.
AppFactory = Callable[["Hub", ModelSlot], Any]


class Hub:
    """Serve every model in a hub.yaml from this process.

    Use ``async with Hub.from_config("hub.yaml") as hub:`` or call ``start()``
    and ``shutdown()`` yourself. Every public coroutine returns the reference
    hub's status word (``loaded``, ``already_loaded``, ``started``, ...) and
    raises a ``HubError`` subclass that knows its HTTP status.
    """

    #: Builds the engine when none is given (``mlx_hub.Hub`` sets the MLX one; the core knows only ``Engine``).
    default_engine: Callable[[], Engine] | None = None

    def __init__(
        self,
        config: HubConfig,
        *,
        app_factory: AppFactory,
        serve: ServeFactory | None = None,
        engine: Engine | None = None,
        config_path: Path | None = None,
        reap_interval: float = 1.0,
        model_logs: bool = False,
        freeze_gc: bool = False,
    ):
        self.app_factory = app_factory  # the ASGI app each model port serves (web.model_app)
        self.serve = (
            serve  # what serves that app on the model's port (web.server); the core knows no HTTP server
        )
        self.engine: Engine = engine or self._make_engine()  # what loads, frees and measures models
        self.config_path = config_path
        self.reap_interval = reap_interval
        self.model_logs = model_logs  # per-model log files; the daemon turns this on
        # gc.freeze() after imports: a full collection drops from ~0.2 s to ~0 on
        # every unload. Process-wide, so only the daemon, which owns its process, asks.
        self.freeze_gc = freeze_gc
        self.ready = False  # the first start() has finished (the CLI waits for this)
        self.slots: dict[str, ModelSlot] = {}
        self.started_at: float | None = None
        self._changes = Changes()
        self.memory_lock = asyncio.Lock()  # one load or unload at a time: each is measured
        self._reload_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._background = Background()
        self.budget: int | None = None
        self.budget_source: str | None = None  # "auto", "none", or "max_memory" (a size or fraction)
        self.api_keys: frozenset[str] = frozenset()  # what the model ports and the controller accept
        self.observers: list[Callable[[], None]] = []  # called on every state change (a supervisor's report)
        self.supervision: Supervision | None = None  # restarts and the last crash, from a supervisor
        self.prompt_store: PromptStore | None = None  # prompt caches kept on disk (prompt_caches.py)
        self.adopt(config)
        self.metrics = HubMetrics(self.status_document)
        self.activity = Activity(config)  # request log, live feed, memory history

    @classmethod
    def from_config(cls, source: ConfigSource, **kwargs: Any) -> Hub:
        """Build from a ``HubConfig``, a dict shaped like hub.yaml, or a path to one.

        The engine comes first: it knows the parser names the file may use.
        """
        engine = kwargs.pop("engine", None) or cls._make_engine()
        config, path = read_config(source, engine.option_choices())
        return cls(config, config_path=path, engine=engine, **kwargs)

    @classmethod
    def _make_engine(cls) -> Engine:
        if cls.default_engine is None:
            raise TypeError("this Hub has no default engine; pass engine=")
        return cls.default_engine()

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ------------------------------------------------------------ lifecycle

    async def start(self, names: Iterable[str] | None = None) -> list[str]:
        """Register every model, then start ``names``, else the startup set (``HubConfig.startup_models``).

        A model that fails to start is marked failed and reported in status;
        the others start regardless. Returns the names that started.
        """
        if self.started_at is None:
            ports = PortBook.for_config(self.config).assign(self.config)
            host = self.config.host_of
            self.slots = {m.name: self.new_slot(m, ports[m.name], host(m)) for m in self.config.models}
            self.link_groups()
            self._reaper = asyncio.create_task(self._reap_forever(), name="hub:idle-reaper")
            await self.activity.start(self)
            self.started_at = time.time()
            self.engine.reset_peak_memory()  # status's peak_bytes: the highest since start
            # Import the handler modules now, off the loop, so a JIT model's
            # first request pays for its weights, not for importing mlx-lm.
            await asyncio.to_thread(self.engine.preload, {m.model_type for m in self.config.models})
            if self.freeze_gc:  # nothing is loaded yet: later collections skip import-time objects
                gc.collect()
                gc.freeze()
        wanted = list(names) if names is not None else self.config.startup_models()
        for name in wanted:
            self._slot(name)  # unknown names fail before anything starts
        try:
            return (await self.start_each(wanted))[0]
        finally:
            self.ready = True

    async def start_each(self, names: list[str]) -> tuple[list[str], dict[str, str]]:
        """Start each model in turn; one failing does not stop the rest. Returns those started, and why
        each of the others failed (name: error)."""
        started, failed = [], {}
        for name in names:
            try:
                await self.start_model(name)
                started.append(name)
            except HubError as exc:
                log.error("model '%s' did not start: %s", name, exc)
                failed[name] = exc.message
        return started, failed

    async def start_defaults(self) -> tuple[list[str], dict[str, str]]:
        """Start the startup set's models that are not running (``start`` on a running hub, the Start button)."""
        names = [
            n
            for n in self.config.startup_models()
            if n in self.slots and self.slots[n].port_state not in (PortState.RUNNING, PortState.STARTING)
        ]
        return await self.start_each(names)

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
        if self.prompt_store is not None:  # the last cache hits' uses, written within a bounded wait
            await asyncio.to_thread(self.prompt_store.close)
        self._background.cancel_all()
        await self.activity.stop()  # after the drain: the last requests are in the log
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
        if not slot.entry.jit_enabled and not slot.held_back:
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
            was_running = await slot.stop_port(drain_timeout, self.wait_change)
            if slot.memory_state in OCCUPYING:
                await self.unload(name, wait_for_requests=False)
            if self.model_logs:
                logs.detach_model(name)
            slot.stopped()
            log.info("model '%s' stopped", name)
        return "stopped" if was_running else "not_running"

    async def load(self, name: str) -> str:
        """Load the weights now, opening the port first if it is closed. ``loaded`` or ``already_loaded``.

        A JIT model "stays off until explicitly loaded": one ``load-model`` is
        that explicit request, so it opens the port as well.
        """
        slot = self._slot(name)
        if slot.port_state is PortState.STOPPING:
            raise NotRunningError(f"model '{name}' is stopping; load it once it has stopped", model=name)
        slot.held_back = None  # an explicit load is the one way a model held back after a crash loads again
        if slot.port_state is not PortState.RUNNING and slot.port_state is not PortState.STARTING:
            await self.start_model(name)  # loads a non-JIT model as well
            if slot.memory_state is MemoryState.LOADED:
                return "loaded"
        if slot.memory_state is MemoryState.LOADED:
            return "already_loaded"
        if slot.memory_state is MemoryState.UNLOADING:
            await admission.unload_slot(self, slot)
        task = admission.load_task(self, slot)
        slot.load_for_requests = False  # asked for by name: it loads whoever leaves
        await asyncio.shield(task)
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
        await admission.unload_slot(
            self, slot, reason="manual" if wait_for_requests else "stop", patient=wait_for_requests
        )
        return "unloaded"

    # ----------------------------------------------------------- idle reaper

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            await admission.reap_idle(self)

    # ---------------------------------------------------------------- reload

    async def reload(self, source: ConfigSource | None = None) -> dict[str, Any]:
        """Apply a new config (``reload.apply``): start new defaults, stop removed models, restart changed ones.

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
        new, path = read_config(source, self.engine.option_choices())
        # An unusable prompt_cache_path fails the reload here, before anything changes.
        self.prompt_store = prompt_caches.store_for(new, self.engine, self.prompt_store)
        async with self._reload_lock:
            result = await reload.apply(self, new)
            if path is not None:
                self.config_path = path
        return result

    def adopt(self, config: HubConfig) -> None:
        """Take ``config`` as the running one: the memory budget, API keys and group timers follow it."""
        self.prompt_store = prompt_caches.store_for(config, self.engine, self.prompt_store)
        self.config = config
        self.link_groups()
        self.budget, self.budget_source = admission.resolve_budget(config.max_memory, self.engine)
        self.engine.set_memory_limit(self.budget)
        for slot in self.slots.values():  # a new budget bounds the prompt caches already held
            if slot.handler is not None:
                self.engine.bound_prompt_cache(slot.handler, self.budget)
        self.api_keys = config.keys

    def link_groups(self) -> None:
        """Give each slot its group's ``idle_unload_trigger_min`` (its idle timer where it sets none)."""
        for slot in self.slots.values():
            group = self.config.group(slot.entry.group)
            slot.group_idle_minutes = group.idle_unload_trigger_min if group is not None else None

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
        matches = [s for s in self.slots.values() if s.entry.answers_to(requested)]
        rank = lambda s: (s.memory_state is not MemoryState.LOADED, s.port_state is not PortState.RUNNING)  # noqa: E731
        return min(matches, key=rank, default=None)

    def new_slot(self, entry: ModelConfig, port: int, host: str) -> ModelSlot:
        """A slot for ``entry`` that reports to this hub and reads its engine's shares and caches."""
        return ModelSlot(
            entry,
            port,
            host,
            self.notify,
            self.engine.shared,
            self.engine.prompt_cache_bytes,
            serve=self.serve,
        )

    def _slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join(self.slots) or "none"
            raise UnknownModelError(f"no model named '{name}' (models: {known})", model=name)
        return slot

    def notify(self) -> None:
        """Wake everyone waiting for any state change."""
        self._changes.notify()
        for observer in self.observers:
            observer()

    async def wait_change(self, timeout: float | None = None) -> bool:
        """Sleep until the next state change; False if ``timeout`` passed first."""
        return await self._changes.wait(timeout)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """A background task of the hub (``signals.Background``)."""
        return self._background.spawn(coro, name)
