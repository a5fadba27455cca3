"""One model's place in the hub: its weights, who is using them, and its port.

A slot has two independent state machines. The *port* (the reference hub's
"process") is whether something serves the model's app (model_port.py); the
*memory* is whether the weights are resident, and is this module's. A JIT
model's port runs with no weights, and a request loads them. Counters of
running and waiting requests, and what they reserve (reservations.py), are
what keep a model from being unloaded under a client. What status shows of a
slot is slot_status.py's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from mlx_hub.config import ModelConfig
from mlx_hub.core.model_port import ModelPort
from mlx_hub.core.policy import Candidate, idle_timeout
from mlx_hub.core.reservations import NO_RESERVATION, Reservation, Reservations
from mlx_hub.core.serving import ServeFactory
from mlx_hub.core.states import MEMORY_MOVES, OCCUPYING, MemoryState, PortState, StateError
from mlx_hub.engine.base import Engine, EngineError, Loaded, SharedWeights

T = TypeVar("T")


class _FromPort(Generic[T]):
    """A slot attribute that is its port's (``slot.port_state`` is ``slot.model_port.state``), read-only:
    the web layer and status read the port off the slot, and its moves are checked on the port alone."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, slot: ModelSlot, owner: type[ModelSlot] | None = None) -> T:
        return getattr(slot.model_port, self.field)  # type: ignore[no-any-return]

    def __set__(self, slot: ModelSlot, value: T) -> None:
        raise AttributeError(f"{self.field} belongs to the slot's model_port; move or set it there")


class ModelSlot:
    """The memory state machine and requests of one hub.yaml entry, beside its port (``model_port``).

    The slot decides its own transitions (each checked against ``MEMORY_MOVES``;
    the port's against ``PORT_MOVES``), counts its requests, and runs at most
    one load and one unload at a time. The hub decides *when* (admission,
    eviction, reload, the idle reaper) and calls the slot to make each move.
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
        self.model_port = ModelPort(entry.name, host, port, on_change, serve)
        self.memory_state = MemoryState.UNLOADED
        self.memory_error: str | None = None
        self.memory_changed_at: float | None = None  # wall clock, for people
        self.handler: Any = None
        self.active = 0  # requests the handler is serving now
        self.waiting = 0  # requests waiting for a load or a group place
        self.cancelled_by_client: dict[str, int] = {}  # requests whose client left, by stage
        self.load_for_requests = False  # the load in progress was started by requests alone
        self.requests: set[asyncio.Task[Any]] = set()  # tasks serving the active requests, for a forced stop
        self.last_used = time.monotonic()
        self.memory_bytes = 0
        self.reserved = Reservations()  # what each request in flight reserved
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

    @property
    def name(self) -> str:
        return self.entry.name

    port: _FromPort[int] = _FromPort("port")
    host: _FromPort[str] = _FromPort("host")
    port_state: _FromPort[PortState] = _FromPort("state")
    port_error: _FromPort[str | None] = _FromPort("error")
    port_changed_at: _FromPort[float | None] = _FromPort("changed_at")
    app: _FromPort[Any] = _FromPort("app")  # the app the port serves (None while it is closed)

    # ------------------------------------------------------------ transitions

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
        self.model_port.serve_handler(loaded.handler)
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
        self.model_port.serve_handler(None)
        return handler

    def unloaded(self, freed: int) -> None:
        """UNLOADING -> UNLOADED, with the bytes the unload gave back."""
        self.move_memory(MemoryState.UNLOADED)
        self.freed_bytes = freed
        self.memory_bytes = 0
        self.keep_alive = None

    def hold_back(self, reason: str) -> None:
        """Keep the weights off until an explicit load: requests get 503 with ``reason``."""
        self.held_back = reason
        if self.memory_state is MemoryState.UNLOADED:
            self.move_memory(MemoryState.FAILED, reason)

    def stopped(self) -> None:
        """STOPPING -> INACTIVE; a failed load (or a model held back) is forgotten with its port."""
        self.held_back = None
        self.model_port.move(PortState.INACTIVE)
        if self.memory_state is MemoryState.FAILED:
            self.move_memory(MemoryState.UNLOADED)

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
        return self.reserved.bytes

    def reservation(self, kv: int, prefill: int, batched: bool) -> Reservation:
        """A request's reservation if it started now (``Reservations.next``)."""
        return self.reserved.next(kv, prefill, batched)

    def begin_request(self, reservation: Reservation = NO_RESERVATION) -> None:
        """Count a request in, with what admission reserved for it."""
        self.active += 1
        self.reserved.add(reservation)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes + self.reserved_bytes)
        self._idle.clear()
        self.on_change()  # a request now runs in the handler: a supervisor blames a crash on it

    def end_request(self, reservation: Reservation = NO_RESERVATION) -> None:
        """Count a request out and give back its reservation (what ``begin_request`` took)."""
        self.active -= 1
        self.reserved.remove(reservation)
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

    def candidate(self) -> Candidate:
        return Candidate(
            name=self.name,
            loaded=self.memory_state in OCCUPYING,
            busy=self.busy,
            last_used=self.last_used,
            group=self.entry.group,
            jit=self.entry.jit_enabled,
            auto_unload_seconds=idle_timeout(
                self.keep_alive, self.entry.auto_unload_minutes, self.group_idle_minutes
            ),
            size=self.held_bytes if self.memory_state is MemoryState.LOADED else self.estimate,
            pinned=self.entry.pinned,
            frees=self.sole_bytes if self.memory_state is MemoryState.LOADED else None,
            reserved=self.reserved_bytes,
            evictable=self.prompt_cache_bytes,
        )

    # ------------------------------------------------------- weights, one load and one unload at a time

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
