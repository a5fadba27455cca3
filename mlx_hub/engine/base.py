"""The seam between the hub and a model runtime: what the core may know of an engine.

The core (slots, admission, the hub) is written against ``Engine`` and the
small value types here, never against MLX or mlx-openai-server; ``mlx.py``
is the real engine and ``mlx_hub.testing.fake_engine`` the fast-tier one.
Importing this module imports no MLX.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mlx_hub.config import ModelConfig
from mlx_hub.engine.prompt_identity import Identity
from mlx_hub.engine.prompt_store import PromptStore
from mlx_hub.engine.reservation import RequestNeed
from mlx_hub.engine.weights import SharedWeights


class EngineError(RuntimeError):
    """A model cannot be built or loaded; the message says why and what to do."""


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
        self, handler: Any, entry: ModelConfig, store: PromptStore, identity: Identity
    ) -> bool: ...
    def peak_memory(self) -> int: ...
    def reset_peak_memory(self) -> None: ...
    def working_set(self) -> int | None: ...
    def set_memory_limit(self, budget: int | None) -> None: ...
    def option_choices(self) -> Mapping[str, frozenset[str]]: ...
