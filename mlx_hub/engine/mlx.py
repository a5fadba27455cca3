"""The MLX engine: mlx-openai-server's handlers built, started, measured and freed in this process.

Handlers are built as upstream's ``launch`` builds them (handlers.py); this
module runs that on the right threads and keeps each engine's own state: the
weights copies its entries share (weights.py), the whisper weights it holds
(whisper.py) and its tokenizer copies for counting prompts (reservation.py).
Two ``MLXEngine`` objects in one process share none of it; MLX's allocator and
the patched library functions (patches/) are the process's.

Threads. MLX (>= 0.31.2) ties a stream to the thread that made it, and a lazy
array to the stream it was built on; Metal punishes a stream used on another
thread, CPU MLX reports it ("There is no Stream(cpu, N) in current thread").
Which thread does what, for every model:

- **Import**: a worker thread of the loop's default executor imports the
  handler modules (``preload``, ``handler_class``); module-level streams made
  then belong to that thread, so ``patches.apply`` replaces them.
- **Build**: one load thread at a time (``asyncio.to_thread`` under the hub's
  memory lock) runs the constructor, which reads and evaluates the weights.
  Anything the hub itself builds there is evaluated before the thread ends
  (``materialize``), so no lazy graph of the load thread is left for others.
- **Run**: upstream's own threads. Each handler's ``InferenceWorker`` thread
  (one request at a time, embeddings, whisper) and its batch scheduler thread
  (``BatchScheduler`` for lm, ``VLMBatchScheduler`` for multimodal on mlx-vlm
  0.7) make their own thread-local stream and evaluate everything under it;
  mlx-lm 0.32 and mlx-vlm 0.7 take that stream as an argument, and 0.31/0.4's
  module-level streams are made per thread (patches/). The cache plan's
  one-token probe (cache_plan.py) runs on the build thread, before any of
  these start. The event loop thread evaluates no model; it reads memory
  counters, and one thing more (next item).
- **Prompt cache**: the thread that generated an entry evaluates it before
  handing it on; its cache's writer thread (prompt_writer.py, one per loaded
  model) then slices and saves only finished arrays, under its own stream.
  Upstream's one-request path looks caches up on the event loop, so a hit
  read from disk (or copied while its write is queued) is evaluated there,
  whole, before the worker thread takes it: nothing lazy crosses.
- **Free**: on the loop thread, ``handler.cleanup()`` stops and joins those
  threads first; then the hub drops its references and ``free_memory`` runs
  ``gc.collect()`` and ``mx.clear_cache()``, neither of which uses a stream.

Library state that would break this is adapted at run time in patches/, one
module per library (site-packages stay as installed): mlx-vlm 0.4's import-time
``generation_stream`` (made thread-local), mlx_whisper's process-wide
``ModelHolder`` (one model per folder, loaded by the hub's load and freed by its
unload), and upstream's VLM batching switch on an mlx-vlm too old for its scheduler.
Patches written for one release line apply only there (patches/switch.ONLY_FOR).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlx_hub.config import ModelConfig
from mlx_hub.engine import memory
from mlx_hub.engine.base import EngineError, Identity, Loaded, RequestNeed, SharedWeights
from mlx_hub.engine.cache_plan import CachePlan, PlanMemo
from mlx_hub.engine.handlers import (
    batches,
    build_handler,
    handler_class,
    one_at_a_time,
    option_choices,
    preload,
    prompt_cache_bytes,
    queue_config,
)
from mlx_hub.engine.model_files import model_folder, weight_files_bytes
from mlx_hub.engine.patches.mlx_openai_server import bound_prompt_cache
from mlx_hub.engine.prompt_identity import entry_identity
from mlx_hub.engine.prompt_store import PromptStore, open_store
from mlx_hub.engine.reservation import PromptCounter, estimate_request
from mlx_hub.engine.sharded import engine as sharded
from mlx_hub.engine.versions import upstream_version
from mlx_hub.engine.weights import WeightRegistry
from mlx_hub.engine.whisper import WhisperWeights

log = logging.getLogger(__name__)


class MLXEngine:
    """The real ``Engine``: upstream's handlers on MLX, with this engine's own holders and counters."""

    def __init__(self) -> None:
        self.weights = WeightRegistry()
        self.whispers = WhisperWeights()
        self.counter = PromptCounter()
        self.plans: dict[str, CachePlan] = {}  # per loaded entry: what its model's caches hold
        self.plan_memo = PlanMemo()  # loads of one model, and entries sharing it, share its measurement

    # ------------------------------------------------------------ load / unload

    async def load(self, entry: ModelConfig, *, lock: asyncio.Lock | None = None) -> Loaded:
        """Build and initialize the handler for ``entry`` off the event loop.

        The constructor reads the weights synchronously, so it runs in a worker
        thread; the hub's other ports keep answering meanwhile. On failure every
        partial allocation is freed before the error is raised.

        Pass the hub's ``lock`` to run one load at a time: a load's memory is
        measured as the change in MLX's active memory, which two overlapping loads
        would blur, and on a machine's few cores two loads at once finish no sooner.
        """
        _check_local_path(entry)
        if entry.distributed is not None:  # its ranks are other processes: nothing loads here
            loaded = await sharded.load(entry)
            loaded.batches = batches(entry, loaded.handler)
            return loaded
        # The first import of a handler module pulls in mlx-lm and transformers
        # (seconds); in a thread it does not stall every other port on the loop.
        await asyncio.to_thread(handler_class, entry.model_type)
        async with lock or contextlib.nullcontext():
            before = memory.active_memory()  # excludes MLX's buffer cache: no collection needed first
            started = time.perf_counter()
            handler = None
            try:
                handler = await self._construct(entry)
                await handler.initialize(queue_config(entry))
            except BaseException as exc:
                if handler is not None:
                    await self.unload(handler, entry.name)
                handler = None
                memory.free_memory()
                if isinstance(exc, Exception):
                    raise EngineError(_explain(exc, entry)) from exc
                raise
            seconds = time.perf_counter() - started
            used = memory.active_memory() - before
        created = sum(g.bytes for g in self.weights.held_by(entry.name) if g.holders[0] == entry.name)
        why = one_at_a_time(entry, handler)
        if why and entry.model_type in ("lm", "multimodal"):
            log.info("model '%s' serves its requests one at a time: %s", entry.name, why)
        return Loaded(
            handler=handler,
            memory_bytes=max(used, 0),
            load_seconds=seconds,
            created_bytes=created,
            batches=why is None,
        )

    async def _construct(self, entry: ModelConfig) -> Any:
        """Run the constructor in a thread without the handler passing through a future.

        A finished ``asyncio.to_thread`` future keeps its result, and asyncio can
        keep that future reachable after the await; the handler, and with it every
        weight, would then survive ``unload``. The thread puts the handler in a box
        that this function empties, so the only reference is the one returned.
        """
        box: dict[str, Any] = {}

        def build() -> None:
            with self.weights.holding(entry.name):
                box["handler"] = build_handler(entry, self.whispers)
            if entry.model_type in ("lm", "multimodal"):  # on the load thread, evaluated before it ends
                identity = f"{entry.model_type}:{entry_identity(entry).key}"
                box["plan"] = self.plan_memo.handler_plan(box["handler"], entry.context_length, identity)

        self.plans.pop(entry.name, None)
        await asyncio.to_thread(build)
        plan = box.pop("plan", None)
        if plan is not None:
            self.plans[entry.name] = plan
        return box.pop("handler")

    async def unload(self, handler: Any, name: str) -> None:
        """Stop the handler's workers and release its weights; the caller drops its references, then
        ``free_memory``."""
        if sharded.is_group(handler):
            await handler.stop()  # every rank ends, on every host
            return
        cleanup = getattr(handler, "cleanup", None)
        try:
            if cleanup is not None:
                result = cleanup()
                if inspect.isawaitable(result):
                    await result
        except Exception:
            log.exception("model '%s': handler cleanup failed; freeing its memory anyway", name)
        finally:
            self.plans.pop(name, None)
            self.weights.release(name)
            if getattr(handler, "handler_type", None) == "whisper":
                self.whispers.release(handler.model_path)

    # ----------------------------------------------------------------- estimates

    def estimate(self, entry: ModelConfig) -> int:
        """What loading ``entry`` will add, from the size of its weight files (0 if unknown).

        Weights are memory-mapped and materialised at their stored precision, so
        their size on disk is a close estimate of what the load adds; the hub
        replaces it with the measured figure once the model has loaded. Weights
        another entry of this engine already holds add nothing (weights.py shares them).
        """
        if entry.distributed is not None:
            return sharded.estimate(entry)
        total = 0
        for path in (entry.model_path, entry.draft_model_path):
            folder = model_folder(path) if path else None
            if folder is not None and self.weights.loaded_bytes(str(folder)) is None:
                total += weight_files_bytes(folder)
        return total

    def estimate_request(self, entry: ModelConfig, body: dict[str, Any] | None) -> RequestNeed:
        """One request's KV and prefill need, its prompt counted with this engine's tokenizer copies,
        its caches as the loaded model makes them (cache_plan.py) once it is loaded."""
        if entry.distributed is not None:  # its KV lives in the ranks, measured there
            return RequestNeed(0, 0, 0, 0, 0)
        return estimate_request(entry, body, self.counter, self.plans.get(entry.name))

    def shared(self, name: str) -> list[SharedWeights]:
        return self.weights.held_by(name)

    # ------------------------------------------------------------ prompt caches

    prompt_identity = staticmethod(entry_identity)

    def persist_prompt_cache(
        self, handler: Any, entry: ModelConfig, store: PromptStore, identity: Identity
    ) -> bool:
        """Keep the handler's prompt caches in ``store`` (patches/prompt_cache.py); False if it keeps none.

        Call right after the load, before any request. The patch imports
        upstream's prompt cache and MLX, so only handlers that have one load it.
        """
        if getattr(handler, "prompt_cache", None) is None:
            return False
        from mlx_hub.engine.patches import prompt_cache  # upstream and MLX: only where a handler has a cache

        return prompt_cache.persist(handler, entry, store, identity)

    def open_prompt_store(self, root: Path, cap: int) -> PromptStore:
        """The store at ``root`` (``prompt_store.open_store``); ``PromptStoreError`` if it is unsafe to use."""
        return open_store(root, cap)

    # ------------------------------------------------- upstream and MLX, as they are

    preload = staticmethod(preload)
    batches = staticmethod(batches)
    prompt_cache_bytes = staticmethod(prompt_cache_bytes)
    bound_prompt_cache = staticmethod(bound_prompt_cache)
    upstream_version = staticmethod(upstream_version)
    free_memory = staticmethod(memory.free_memory)
    active_memory = staticmethod(memory.active_memory)
    cache_memory = staticmethod(memory.cache_memory)
    system_memory = staticmethod(memory.system_memory)
    peak_memory = staticmethod(memory.peak_memory)
    reset_peak_memory = staticmethod(memory.reset_peak_memory)
    working_set = staticmethod(memory.working_set)
    set_memory_limit = staticmethod(memory.set_memory_limit)

    def option_choices(self) -> Mapping[str, frozenset[str]]:
        return option_choices()


def _check_local_path(entry: ModelConfig) -> None:
    """A folder path that does not exist fails here, named, instead of as a repo-id download."""
    path = Path(entry.model_path)
    if path.is_absolute() and not path.exists():
        raise EngineError(
            f"model_path {entry.model_path} does not exist; fix model_path for model '{entry.name}' in hub.yaml"
        )


def _explain(exc: Exception, entry: ModelConfig) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, OSError)) and "model_path" not in text:
        text = f"{text} (model_path: {entry.model_path})"
    return f"{type(exc).__name__}: {text}"
