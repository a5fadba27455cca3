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
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from mlx_hub.config import ConfigSource, HubConfig, ModelConfig, read_config
from mlx_hub.core import admission, logs, model_ops, reload
from mlx_hub.core.activity import Activity
from mlx_hub.core.errors import (
    UnknownModelError,
)
from mlx_hub.core.metrics import HubMetrics
from mlx_hub.core.report import build_status
from mlx_hub.core.serving import ServeFactory
from mlx_hub.core.signals import Background, Changes
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.states import MemoryState, PortState
from mlx_hub.core.status import HubStatus, Supervision
from mlx_hub.engine.base import Engine, PromptCacheStore

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
        self.serve = serve  # what serves that app on its port (web.server): the core knows no HTTP server
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
        self.prompt_store: PromptCacheStore | None = None  # prompt caches kept on disk (prompt_caches.py)
        reload.adopt(self, config)
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

    async def start(
        self,
        names: Iterable[str] | None = None,
        *,
        before_ready: Callable[[Hub], Awaitable[None]] | None = None,
    ) -> list[str]:
        """Register every model, then start ``names``, else the startup set (``HubConfig.startup_models``).

        A model that fails to start is marked failed and reported in status;
        the others start regardless. Returns the names that started. Then
        ``before_ready``, then ``ready`` (``model_ops.start_then_ready``).
        """
        if self.started_at is None:
            reload.register(self)
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
        return await model_ops.start_then_ready(self, wanted, before_ready)

    async def start_each(self, names: list[str]) -> tuple[list[str], dict[str, str]]:
        """Start each model in turn; one failing does not stop the rest. Returns those started, and why
        each of the others failed (name: error)."""
        return await model_ops.start_each(self, names)

    async def start_defaults(self) -> tuple[list[str], dict[str, str]]:
        """Start the startup set's models that are not running (``start`` on a running hub, the Start button)."""
        return await model_ops.start_defaults(self)

    async def stop_all(self, *, drain_timeout: float | None = None) -> list[str]:
        """Stop every running model, keeping the hub (the CLI's ``stop``). Returns those stopped.

        One model failing to stop does not keep the others running; its error is logged by name.
        """
        return await model_ops.stop_all(self, drain_timeout)

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
        return await model_ops.start_model(self, self._slot(name))

    async def stop_model(self, name: str, *, drain_timeout: float | None = None) -> str:
        """Stop accepting, let in-flight requests finish, unload, close. ``stopped`` or ``not_running``.

        Requests still running after ``drain_timeout`` seconds (hub.yaml's
        ``drain_timeout`` unless given) are cancelled: a stream ends where it
        is, a request not yet answered gets 503 ``model_stopped``. So neither a
        stuck generation nor a client that never reads holds a stop forever.
        """
        return await model_ops.stop_model(self, self._slot(name), drain_timeout)

    async def load(self, name: str) -> str:
        """Load the weights now, opening the port first if it is closed. ``loaded`` or ``already_loaded``.

        A JIT model "stays off until explicitly loaded": one ``load-model`` is
        that explicit request, so it opens the port as well.
        """
        return await model_ops.load(self, self._slot(name))

    async def unload(self, name: str, *, wait_for_requests: bool = True) -> str:
        """Free the weights, keeping the port open. ``unloaded`` or ``not_loaded``.

        Waits for running requests and streams to finish (unless a stop has
        already drained and cancelled them); requests that arrive meanwhile
        wait, then load the model again if it is JIT.
        """
        return await model_ops.unload(self, self._slot(name), wait_for_requests)

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
        new, path = reload.read(self, source)
        async with self._reload_lock:
            result = await reload.apply(self, new)
            if path is not None:
                self.config_path = path
        return result

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
        engine = self.engine
        return ModelSlot(entry, port, host, self.notify, engine.shared, engine.prompt_cache_bytes, self.serve)

    def _slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise UnknownModelError.among(name, self.slots)
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
