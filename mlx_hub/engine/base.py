"""The seam between the hub and a model runtime: what the core may know of an engine.

The core (slots, admission, the hub) is written against ``Engine`` and the
small value types here, never against MLX or mlx-openai-server; ``mlx.py``
is the real engine and ``mlx_hub.testing.fake_engine`` the fast-tier one.
The value types that cross the seam are defined here and the engine's own
modules import them from here, so this module imports no other engine module
(``tests/test_layers.py`` holds it to that) and no MLX.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlx_hub.config import ModelConfig


class EngineError(RuntimeError):
    """A model cannot be built or loaded; the message says why and what to do."""


class PromptStoreError(RuntimeError):
    """The cache folder cannot be used safely; the message names the path and the fix."""


@dataclass(frozen=True)
class Identity:
    """What a model's KV caches depend on, and the folder name it hashes to."""

    key: str
    description: dict[str, Any]


@dataclass(frozen=True)
class RequestNeed:
    """One request's reservation: the tokens it can reach and the bytes they cost."""

    @property
    def bytes(self) -> int:
        return self.kv_bytes + self.prefill_bytes

    prompt_tokens: int
    max_tokens: int
    tokens: int  # prompt + max_tokens, capped by the context
    kv_bytes: int  # its KV cache, with the copies upstream's prompt cache takes of it while it runs
    prefill_bytes: int


@dataclass
class SharedWeights:
    """One copy of a model's weights and the entries holding it (``weights.py`` shares them)."""

    folder: str
    bytes: int  # what reading them added to MLX's active memory
    holders: list[str] = field(default_factory=list)  # entry names, in load order
    model: Callable[[], Any] = lambda: None  # a weak reference to the model
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelCounters:
    """Per model, since the hub started: lookups that found a cache, those that did not, tokens reused."""

    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0


class PromptCacheStore(Protocol):
    """The engine's store of prompt caches on disk, as the core uses it (``prompt_store.PromptStore``).

    The core opens it (``Engine.open_prompt_store``), tells it hub.yaml's
    entries (``known``), reads its figures for status and clears it; the
    engine's handlers write and read the caches themselves.
    """

    root: Path
    cap: int
    bytes_written: int

    @property
    def known(self) -> dict[str, str]: ...
    @known.setter
    def known(self, value: dict[str, str]) -> None: ...
    def close(self) -> None: ...
    def clear(self, names: list[str] | None = None) -> list[str]: ...
    def records(self, name: str) -> bool: ...
    def counters(self, name: str) -> ModelCounters: ...
    def model_bytes(self, name: str) -> int: ...
    def total_bytes(self) -> int: ...


@dataclass
class Loaded:
    """A live handler and what its load cost."""

    handler: Any
    memory_bytes: int  # what the load added to MLX's active memory
    load_seconds: float
    created_bytes: int = 0  # of that, the weights copies this load read first (weights.py shares them)
    # A model served by other processes (a sharded model's ranks) can end on its own: this
    # resolves with the reason when it does (None when the hub ended it), and the hub then
    # marks the model failed.
    ended: asyncio.Future[str | None] | None = None
    # Whether upstream serves this load's requests as one batch, so admission reserves the padding a
    # batch adds. Judged once, here: the judgement imports and patches upstream and reads package
    # versions, too slow to repeat on the event loop for every request.
    batches: bool = False


#: Text of the errors MLX raises when an allocation fails (CPU ``[malloc]``, Metal ``[metal::malloc]``).
ALLOCATION_ERRORS = ("[malloc] Unable to allocate", "[metal::malloc]", "Unable to allocate", "Resource limit")


def is_allocation_error(text: str) -> bool:
    """Whether an error's text is MLX failing to allocate memory."""
    return any(marker in text for marker in ALLOCATION_ERRORS)


class Engine(Protocol):
    """What the hub needs from a model runtime. ``MLXEngine`` is the real one; tests bring a fake."""

    async def load(self, entry: ModelConfig, *, lock: asyncio.Lock | None = None) -> Loaded: ...
    async def unload(self, handler: Any, name: str) -> None: ...
    def estimate(self, entry: ModelConfig) -> int: ...
    def preload(self, model_types: set[str]) -> None: ...
    def free_memory(self) -> None: ...
    def active_memory(self) -> int: ...
    def cache_memory(self) -> int: ...
    def system_memory(self) -> int | None: ...
    def upstream_version(self) -> str | None: ...
    def shared(self, name: str) -> list[SharedWeights]: ...
    def estimate_request(self, entry: ModelConfig, body: dict[str, Any] | None) -> RequestNeed: ...
    def prompt_cache_bytes(self, handler: Any) -> int: ...
    def bound_prompt_cache(self, handler: Any, budget: int | None) -> None: ...
    def prompt_identity(self, entry: ModelConfig) -> Identity: ...
    def persist_prompt_cache(
        self, handler: Any, entry: ModelConfig, store: PromptCacheStore, identity: Identity
    ) -> bool: ...
    def open_prompt_store(self, root: Path, cap: int) -> PromptCacheStore: ...
    def peak_memory(self) -> int: ...
    def reset_peak_memory(self) -> None: ...
    def working_set(self) -> int | None: ...
    def set_memory_limit(self, budget: int | None) -> None: ...
    def option_choices(self) -> Mapping[str, frozenset[str]]: ...
