"""One model's place in the hub: its port, its weights, and who is using it.

A slot has two independent state machines. The *port* (the reference hub's
"process") is whether its uvicorn server listens; the *memory* is whether the
weights are resident. A JIT model's port runs with no weights, and a request
loads them. Counters of running and waiting requests are what keep a model
from being unloaded under a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mlx_hub.config import ModelConfig
from mlx_hub.core.policy import Candidate, batch_padding, seconds_until_idle_unload
from mlx_hub.core.ports import PortError
from mlx_hub.core.serving import PortServer, ServeFactory
from mlx_hub.core.states import OCCUPYING, MemoryState, PortState
from mlx_hub.core.status import ModelMetadata, ModelStatus
from mlx_hub.engine.base import Engine, EngineError, Loaded
from mlx_hub.engine.weights import SharedWeights

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Reservation:
    """What one request in flight holds under the budget: ``bytes`` in all, of which ``kv`` is its own KV
    cache and ``kv_reserved`` its KV with the batch padding it took on joining (``prefill`` likewise)."""

    bytes: int = 0
    kv: int = 0
    kv_reserved: int = 0
    prefill: int = 0
    prefill_reserved: int = 0


NO_RESERVATION = Reservation()

#: How long cancelled requests get to unwind before a stop frees their model regardless.
CANCEL_GRACE_SECONDS = 5.0


class StateError(RuntimeError):
    """A transition the slot's state machine does not allow."""


class ModelSlot:
    """State and serving machinery for one hub.yaml entry.

    The slot decides its own transitions (each checked against ``PORT_MOVES`` /
    ``MEMORY_MOVES``), counts its requests, and runs at most one load and one
    unload at a time. The hub decides *when* (admission, eviction, reload, the
    idle reaper) and calls the slot to make each move.
    """

    def __init__(
        self,
        entry: ModelConfig,
        port: int,
        host: str,
        on_change: Callable[[], None] = lambda: None,
        shared: Callable[[str], list[SharedWeights]] = lambda name: [],
        cached: Callable[[Any], int] = lambda handler: 0,
        serve: ServeFactory | None = None,
    ):
        self.entry = entry
        self._shared = shared  # the weights copies an entry holds (the engine's view)
        self._cached = cached  # bytes the handler's in-memory prompt cache holds (the engine's view)
        self.on_change = on_change  # every transition calls it: the hub wakes its waiters
        self.port = port
        self.host = host
        self.port_state = PortState.INACTIVE
        self.memory_state = MemoryState.UNLOADED
        self.port_error: str | None = None
        self.memory_error: str | None = None
        self.memory_changed_at: float | None = None  # wall clock, for people
        self.port_changed_at: float | None = None
        self.handler: Any = None
        self.app: Any = None
        self.active = 0  # requests the handler is serving now
        self.waiting = 0  # requests waiting for a load or a group place
        self.cancelled_by_client: dict[str, int] = {}  # requests whose client left, by stage
        self.load_for_requests = False  # the load in progress was started by requests alone
        self.requests: set[asyncio.Task[Any]] = set()  # tasks serving the active requests, for a forced stop
        self.last_used = time.monotonic()
        self.memory_bytes = 0
        self.reservations: list[Reservation] = []  # one per request in flight that reserved memory
        self.peak_bytes = 0  # the most this model accounted for at once (held + reserved) since it loaded
        self.estimate = 0  # bytes a load is expected to add, from the weight files
        self.keep_alive: float | None = None  # a request's keep_alive, for this residency
        self.group_idle_minutes: float | None = None  # its group's idle_unload_trigger_min (Hub sets it)
        self.load_seconds: float | None = None
        self.batches = False  # this residency's requests run as one batch (``Loaded.batches``)
        self.freed_bytes: int | None = None
        self.load_count = 0
        self.held_back: str | None = None  # why it is not loaded automatically (it crashed the hub)
        self.load_task: asyncio.Task[None] | None = None
        self.unload_task: asyncio.Task[None] | None = None
        self.op_lock = asyncio.Lock()  # start/stop of this one model, one at a time
        self._idle = asyncio.Event()  # set while no request runs
        self._idle.set()
        self._serve = serve  # builds the server for its port (the web layer's); None: this slot has no port
        self._server: PortServer | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    # ------------------------------------------------------------ transitions

    def move_port(self, state: PortState, error: str | None = None) -> None:
        """Change the port's state; ``StateError`` if the move is not one ``PORT_MOVES`` allows."""
        if state not in PORT_MOVES[self.port_state]:
            raise StateError(f"model '{self.name}': port cannot go from {self.port_state} to {state}")
        self.port_state = state
        self.port_error = error
        self.port_changed_at = time.time()
        self.on_change()

    def move_memory(self, state: MemoryState, error: str | None = None) -> None:
        """Change the memory state; ``StateError`` if ``MEMORY_MOVES`` does not allow it."""
        if state not in MEMORY_MOVES[self.memory_state]:
            raise StateError(f"model '{self.name}': memory cannot go from {self.memory_state} to {state}")
        self.memory_state = state
        if state is MemoryState.FAILED:
            self.memory_error = error
        self.memory_changed_at = time.time()
        self.on_change()

    def loaded(self, loaded: Loaded) -> None:
        """LOADING -> LOADED: make a freshly loaded handler the one the upstream routes use."""
        self.move_memory(MemoryState.LOADED)
        self.handler = loaded.handler
        if self.app is not None:
            self.app.state.handler = loaded.handler
        # Its own bytes; weights copies are counted apart (held_bytes), once for all their holders.
        self.memory_bytes = max(loaded.memory_bytes - loaded.created_bytes, 0)
        self.peak_bytes = self.held_bytes
        self.load_seconds = loaded.load_seconds
        self.batches = loaded.batches  # the value, not ``loaded``: the slot keeps no second handle
        self.load_count += 1
        self.memory_error = None
        self.touch()

    def release_handler(self) -> Any:
        """Drop every reference the slot holds to the handler (while UNLOADING) and hand it over."""
        if self.memory_state is not MemoryState.UNLOADING:
            raise StateError(f"model '{self.name}': its handler is released only while unloading")
        handler, self.handler = self.handler, None
        if self.app is not None:
            self.app.state.handler = None
        return handler

    def unloaded(self, freed: int) -> None:
        """UNLOADING -> UNLOADED, with the bytes the unload gave back."""
        self.move_memory(MemoryState.UNLOADED)
        self.freed_bytes = freed
        self.memory_bytes = 0
        self.keep_alive = None

    # ---------------------------------------------------------------- memory

    def shared(self) -> list[SharedWeights]:
        """The weights copies this model holds (shared with other entries or not)."""
        return self._shared(self.name) if self.memory_state in OCCUPYING else []

    @property
    def held_bytes(self) -> int:
        """What this model accounts for: its own bytes, plus each copy it is the first holder of.

        Every copy has exactly one first holder, so summing this over models
        counts shared weights once.
        """
        own = self.memory_bytes + self.prompt_cache_bytes
        return own + sum(g.bytes for g in self.shared() if g.holders[0] == self.name)

    @property
    def sole_bytes(self) -> int:
        """What unloading this model would free: its own bytes and the copies nobody else holds."""
        own = self.memory_bytes + self.prompt_cache_bytes
        return own + sum(g.bytes for g in self.shared() if g.holders == [self.name])

    @property
    def prompt_cache_bytes(self) -> int:
        """KV caches upstream keeps in memory between requests (its prompt cache): the model's own bytes.

        Entries upstream 1.8.1 keeps on disk are not memory (``prompt_cache_disk_bytes`` in status).
        """
        return self._cached(self.handler) if self.handler is not None else 0

    # ---------------------------------------------------------------- requests

    @property
    def reserved_bytes(self) -> int:
        """What the requests in flight reserve (KV cache, prefill, batch padding), summed."""
        return sum(r.bytes for r in self.reservations)

    def reservation(self, kv: int, prefill: int, batched: bool) -> Reservation:
        """A request's reservation if it started now: its KV and prefill, and in a batch the padding it adds."""
        held = self.reservations if batched else []
        kv_pad = batch_padding(kv, [r.kv for r in held], sum(r.kv_reserved for r in held)) if held else 0
        # Prompts admitted together are prefilled as one padded batch: as for KV, each counts at the longest.
        pre_pad = (
            batch_padding(prefill, [r.prefill for r in held], sum(r.prefill_reserved for r in held))
            if held
            else 0
        )
        return Reservation(
            bytes=kv + kv_pad + prefill + pre_pad,
            kv=kv,
            kv_reserved=kv + kv_pad,
            prefill=prefill,
            prefill_reserved=prefill + pre_pad,
        )

    def begin_request(self, reservation: Reservation = NO_RESERVATION) -> None:
        """Count a request in, with what admission reserved for it."""
        self.active += 1
        if reservation.bytes:
            self.reservations.append(reservation)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes + self.reserved_bytes)
        self._idle.clear()
        self.on_change()  # a request now runs in the handler: a supervisor blames a crash on it

    def end_request(self, reservation: Reservation = NO_RESERVATION) -> None:
        """Count a request out and give back its reservation (what ``begin_request`` took)."""
        self.active -= 1
        if reservation.bytes and reservation in self.reservations:
            self.reservations.remove(reservation)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)  # its KV may now sit in the prompt cache
        self.touch()
        if self.active == 0:
            self._idle.set()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        """In use or mid-transition: not a candidate for eviction or idle unload."""
        return (
            self.active > 0
            or self.waiting > 0
            or self.memory_state in (MemoryState.LOADING, MemoryState.UNLOADING)
        )

    @property
    def idle_timeout(self) -> float | None:
        """Seconds idle before unloading: keep_alive, else ``auto_unload_minutes``, else the group's trigger."""
        if self.keep_alive is not None:
            return None if self.keep_alive == float("inf") else self.keep_alive
        minutes = self.entry.auto_unload_minutes
        if minutes is None:
            minutes = self.group_idle_minutes  # the group's idle rule, where the member sets none
        return None if minutes is None else minutes * 60.0

    def candidate(self) -> Candidate:
        return Candidate(
            name=self.name,
            loaded=self.memory_state in OCCUPYING,
            busy=self.busy,
            last_used=self.last_used,
            group=self.entry.group,
            jit=self.entry.jit_enabled,
            auto_unload_seconds=self.idle_timeout,
            size=self.held_bytes if self.memory_state is MemoryState.LOADED else self.estimate,
            pinned=self.entry.pinned,
            frees=self.sole_bytes if self.memory_state is MemoryState.LOADED else None,
            reserved=self.reserved_bytes,
            evictable=self.prompt_cache_bytes,
        )

    # ---------------------------------------------------------------- weights

    async def load(self, engine: Engine, lock: asyncio.Lock) -> Loaded:
        """LOADING -> LOADED through ``engine`` (the hub has admitted the load); FAILED on its error."""
        try:
            loaded = await engine.load(self.entry, lock=lock)
        except EngineError as exc:
            self.move_memory(MemoryState.FAILED, str(exc))
            raise
        except BaseException:
            self.move_memory(MemoryState.UNLOADED)
            raise
        self.loaded(loaded)
        return loaded

    async def unload(self, engine: Engine, lock: asyncio.Lock, *, patient: bool = True) -> None:
        """LOADED -> UNLOADING -> UNLOADED: new requests wait, running ones finish (if ``patient``), then free.

        The bytes MLX's active memory gave back are kept as ``freed_bytes``.
        """
        self.move_memory(MemoryState.UNLOADING)  # from here new requests wait in the gate
        while patient and self.active > 0:
            await self._idle.wait()
        async with lock:
            before = engine.active_memory()
            handler = self.release_handler()
            await engine.unload(handler, self.name)
            del handler
            engine.free_memory()
            self.unloaded(before - engine.active_memory())

    # -------------------------------------------------------------- single flight

    def load_in_progress(self) -> bool:
        return self.load_task is not None and not self.load_task.done()

    def single_load(self, start: Callable[[], asyncio.Task[None]]) -> asyncio.Task[None]:
        """The one load in progress, started with ``start`` if there is none."""
        if not self.load_in_progress():
            self.load_task = start()
        assert self.load_task is not None
        return self.load_task

    def single_unload(self, start: Callable[[], asyncio.Task[None]]) -> asyncio.Task[None]:
        """The one unload in progress, started with ``start`` if there is none."""
        if self.unload_task is None or self.unload_task.done():
            self.unload_task = start()
        return self.unload_task

    async def drain(self, timeout: float, wait_change: Callable[[float], Awaitable[bool]]) -> None:
        """Let running requests finish for ``timeout`` s, then cancel what is left (a stop's drain).

        A cancelled stream is cut where it is; a request not yet answered gets
        503 from the gate. What does not end within ``CANCEL_GRACE_SECONDS`` of
        its cancellation is logged, and the stop goes on regardless.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active > 0 and loop.time() < deadline:
            await wait_change(deadline - loop.time())
        if self.active == 0:
            return
        log.warning(
            "model '%s': %d request(s) still running after %g s; cancelling them",
            self.name,
            self.active,
            timeout,
        )
        for task in list(self.requests):
            task.cancel()
        deadline = loop.time() + CANCEL_GRACE_SECONDS
        while self.active > 0 and loop.time() < deadline:
            await wait_change(deadline - loop.time())
        if self.active > 0:
            log.error(
                "model '%s': %d request(s) did not end when cancelled; freeing the model anyway",
                self.name,
                self.active,
            )

    # ------------------------------------------------------------------ status

    def status(self, now: float, log_file: str | None) -> ModelStatus:
        """This model's row of ``/hub/status``."""
        entry = self.entry
        running = self.port_state is PortState.RUNNING
        idle_left = seconds_until_idle_unload(self.candidate(), now)
        keep_alive = self.keep_alive
        shared = self.shared()
        return ModelStatus(
            id=self.name,
            metadata=ModelMetadata(
                process_state=self.port_state.value,
                memory_state=self.memory_state.value,
                pid=os.getpid() if running else None,
                port=self.port,
                host=self.host,
                group=entry.group,
                default=entry.default,
                jit_enabled=entry.jit_enabled,
                model_type=entry.model_type,
                model_path=entry.model_path,
                served_model_name=entry.served_name,
                auto_unload_minutes=entry.auto_unload_minutes,
                memory_last_transition_at=self.memory_changed_at,
                memory_last_error=self.memory_error,
                process_last_error=self.port_error,
                exit_code=1 if self.port_state is PortState.FAILED else None,
                memory_bytes=self.held_bytes,
                kv_reserved_bytes=self.reserved_bytes,
                memory_peak_bytes=self.peak_bytes,
                prompt_cache_bytes=self.prompt_cache_bytes,
                shared_bytes=sum(g.bytes for g in shared if len(g.holders) > 1),
                shared_with=sorted({h for g in shared for h in g.holders} - {self.name}),
                in_flight=self.active,
                waiting=self.waiting,
                cancelled_waiting=self.cancelled_by_client.get("waiting", 0),
                cancelled_generating=self.cancelled_by_client.get("generating", 0),
                idle_seconds_left=None if idle_left is None else round(idle_left, 1),
                load_seconds=None if self.load_seconds is None else round(self.load_seconds, 3),
                load_count=self.load_count,
                freed_bytes=self.freed_bytes,
                pinned=entry.pinned,
                keep_alive_seconds=None
                if keep_alive is None
                else (-1 if keep_alive == float("inf") else keep_alive),
                started_at=self.port_changed_at if running else None,
                log_file=log_file,
                ranks=self.ranks(),
            ),
        )

    def ranks(self) -> list[dict[str, object]] | None:
        """A sharded model's ranks as its group reports them; [] while none runs; None if not sharded."""
        if self.entry.distributed is None:
            return None
        report = getattr(self.handler, "ranks_status", None)
        return report() if report is not None else []

    # ------------------------------------------------------------------- port

    async def start_port(self, app: Any) -> None:
        """INACTIVE/FAILED -> STARTING -> RUNNING, serving ``app``; FAILED (and ``PortError``) if it cannot listen."""
        self.move_port(PortState.STARTING)
        try:
            await self.open_port(app)
        except (PortError, OSError) as exc:
            self.move_port(PortState.FAILED, str(exc))
            raise PortError(str(exc)) from None
        self.move_port(PortState.RUNNING)

    async def stop_port(self, drain_timeout: float, wait_change: Callable[[float], Awaitable[bool]]) -> bool:
        """Start stopping: turn new requests away, wait out (or cancel) a pending load, drain, close.

        Returns whether the port was serving. The caller unloads the weights
        and then calls ``stopped``.
        """
        was_running = self.port_state is not PortState.FAILED
        self.move_port(PortState.STOPPING)  # the gate now turns new requests away
        task = self.load_task
        if task is not None and not task.done():
            if self.memory_state is MemoryState.UNLOADED:
                task.cancel()  # still waiting for a group place: nothing to undo
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(task)
        await self.drain(drain_timeout, wait_change)
        await self.close_port(timeout=1.0)
        return was_running

    def hold_back(self, reason: str) -> None:
        """Keep the weights off until an explicit load: requests get 503 with ``reason``."""
        self.held_back = reason
        if self.memory_state is MemoryState.UNLOADED:
            self.move_memory(MemoryState.FAILED, reason)

    def stopped(self) -> None:
        """STOPPING -> INACTIVE; a failed load (or a model held back) is forgotten with its port."""
        self.held_back = None
        self.move_port(PortState.INACTIVE)
        if self.memory_state is MemoryState.FAILED:
            self.move_memory(MemoryState.UNLOADED)

    async def open_port(self, app: Any) -> None:
        """Serve ``app`` on this slot's port; raises ``PortError`` if the port is taken."""
        if self._serve is None:
            raise PortError(f"model '{self.name}': this hub was built without a server for model ports")
        server = self._serve(app, self.host, self.port, name=f"model '{self.name}'")
        await server.start()
        self.app = app
        self._server = server

    async def close_port(self, timeout: float = 15.0) -> None:
        """Stop accepting, let open requests finish for up to ``timeout`` s, then close."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(timeout)
        if self.app is not None:
            self.app.state.handler = None
        self.app = None
