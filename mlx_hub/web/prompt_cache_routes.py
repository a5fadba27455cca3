"""``/hub/prompt-cache``: list the prompt caches kept on disk, and clear one model's or all.

The CLI's ``cache`` and ``cache clear`` go through these while a hub runs, so
the hub's live caches forget what was deleted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import BaseModel

from mlx_hub.core import prompt_caches
from mlx_hub.engine.prompt_store import describe

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub


class CachedIdentity(BaseModel):
    key: str  # the folder: the weights' name and a hash of what the KV depends on
    names: list[str]  # hub.yaml entries that used it
    model: str
    entries: int
    bytes: int
    last_use: float | None
    known: bool  # some hub.yaml entry has this identity now (others are evicted first)


class PromptCacheListing(BaseModel):
    enabled: bool
    path: str | None
    disk_bytes: int
    cap_bytes: int
    identities: list[CachedIdentity]


class PromptCacheCleared(BaseModel):
    cleared: list[str]  # identity folders emptied


def prompt_cache_router(hub: Hub, errors: dict[int | str, dict[str, Any]]) -> APIRouter:
    router = APIRouter()

    @router.get("/hub/prompt-cache", response_model=PromptCacheListing)
    async def listing() -> dict[str, Any]:
        """Every model identity's prompt caches on disk: entries, bytes, last use; the cap."""
        return describe(hub.prompt_store)

    @router.post("/hub/prompt-cache/clear", response_model=PromptCacheCleared, responses=errors)
    async def clear(model: str | None = None) -> PromptCacheCleared:
        """Delete the prompt caches of ``model`` (every model's without it)."""
        cleared = prompt_caches.clear(hub.prompt_store, hub.slots, model)
        hub.notify()
        return PromptCacheCleared(cleared=cleared)

    return router
