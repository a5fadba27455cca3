"""A fake engine for the fast tier: the hub, its gate and /v1 routing without MLX.

``FakeEngine`` loads ``FakeHandler``s that answer upstream's chat route like an
lm handler does, instantly, and keep an honest memory count, so admission,
eviction, JIT, keep_alive and stops can be tested in milliseconds. The real
engine's tests (tests/test_engine.py and every test with a generated model)
remain the integration tier. It lives in the package, beside the generated
models, so that other projects can test against a hub without MLX too.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlx_hub.config import ModelConfig
from mlx_hub.engine.base import EngineError, Identity, Loaded, PromptCacheStore, RequestNeed
from mlx_hub.engine.prompt_identity import model_identity
from mlx_hub.engine.prompt_store import open_store


class FakeHandler:
    handler_type = "lm"

    def __init__(self, entry: ModelConfig, size: int, engine: FakeEngine):
        self.model_path = entry.model_path
        self.served_model_name = entry.served_name
        self.name = entry.name
        self.size = size
        self.engine = engine
        self.cleaned = False

    async def get_models(self) -> list[dict[str, Any]]:
        return [{"id": self.model_path, "object": "model", "created": 0, "owned_by": "local"}]

    async def get_queue_stats(self) -> dict[str, Any]:
        return {}

    async def generate_text_response(self, request: Any) -> dict[str, Any]:
        await self.engine.hold[self.name].wait()  # a test can keep a request running
        return {"response": f"answer from {self.name}", "usage": None}

    async def generate_text_stream(self, request: Any) -> Any:
        await self.engine.hold[self.name].wait()
        for piece in ("answer", " from", f" {self.name}"):
            yield piece

    async def cleanup(self) -> None:
        self.cleaned = True


class FakeEngine:
    """Loads take a real await and no time; ``sizes`` (bytes by entry name) default to 1000."""

    def __init__(
        self,
        sizes: dict[str, int] | None = None,
        failing: set[str] | None = None,
        request_bytes_per_token: int = 0,
    ):
        self.sizes = sizes or {}
        self.request_bytes_per_token = request_bytes_per_token  # a request reserves this x its max_tokens
        self.limit: int | None = None  # what the hub set as MLX's memory limit
        self.failing = failing or set()
        self.active = 0
        self.loads: Counter[str] = Counter()
        self.hold: dict[str, asyncio.Event] = {}

    def block(self, name: str) -> None:
        """Requests to ``name`` run until ``unblock``."""
        self.hold[name] = asyncio.Event()

    def unblock(self, name: str) -> None:
        self.hold[name].set()

    async def load(self, entry: ModelConfig, *, lock: asyncio.Lock | None = None) -> Loaded:
        await asyncio.sleep(0.01)
        if entry.name in self.failing:
            raise EngineError(f"OSError: no weights in {entry.model_path}")
        if entry.name not in self.hold or self.hold[entry.name].is_set():
            self.hold[entry.name] = asyncio.Event()
            self.hold[entry.name].set()
        size = self.estimate(entry)
        self.active += size
        self.loads[entry.name] += 1
        handler = FakeHandler(entry, size, self)
        return Loaded(
            handler=handler, memory_bytes=size, load_seconds=0.01, batches=self.batches(entry, handler)
        )

    async def unload(self, handler: FakeHandler, name: str) -> None:
        await handler.cleanup()
        self.active -= handler.size

    def estimate(self, entry: ModelConfig) -> int:
        return self.sizes.get(entry.name, 1000)

    def preload(self, model_types: set[str]) -> None:
        pass

    def free_memory(self) -> None:
        pass

    def active_memory(self) -> int:
        return self.active

    def cache_memory(self) -> int:
        return 0

    def system_memory(self) -> int | None:
        return 1 << 34

    def upstream_version(self) -> str | None:
        return "fake"

    def shared(self, name: str) -> list[Any]:
        return []  # fake models share nothing

    def estimate_request(self, entry: ModelConfig, body: dict[str, Any] | None) -> RequestNeed:
        tokens = int((body or {}).get("max_tokens") or 0)
        return RequestNeed(0, tokens, tokens, tokens * self.request_bytes_per_token, 0)

    def prompt_cache_bytes(self, handler: Any) -> int:
        return 0

    def batches(self, entry: ModelConfig, handler: Any = None) -> bool:
        """Whether a load of ``entry`` batches its requests (as ``MLXEngine.load`` judges it): never, here."""
        return False

    def bound_prompt_cache(self, handler: Any, budget: int | None) -> None:
        pass

    def prompt_identity(self, entry: ModelConfig) -> Identity:
        return model_identity(entry.model_path, None)

    def persist_prompt_cache(
        self, handler: Any, entry: ModelConfig, store: PromptCacheStore, identity: Identity
    ) -> bool:
        return False  # fake handlers keep no prompt cache

    def open_prompt_store(self, root: Path, cap: int) -> PromptCacheStore:
        return open_store(root, cap)  # the real store: hub.yaml's folder rules hold in the fast tier too

    def peak_memory(self) -> int:
        return self.active

    def reset_peak_memory(self) -> None:
        pass

    def working_set(self) -> int | None:
        return 3 << 32

    def set_memory_limit(self, budget: int | None) -> None:
        self.limit = budget

    def option_choices(self) -> Mapping[str, frozenset[str]]:
        return {}  # fake models take any parser name


def fake(name: str, **kw: Any) -> dict[str, Any]:
    """A hub.yaml entry for a FakeEngine model (``default: true`` unless said otherwise)."""
    return {"name": name, "model_path": f"fake/{name}", "default": True, **kw}


def port(hub: Any, name: str) -> Any:
    """A client for one model's app, in-process."""
    import httpx

    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hub.slots[name].app), base_url="http://127.0.0.1"
    )
