"""``/hub/prompt-cache``: list the prompt caches kept on disk, and clear one model's or all.

The CLI's ``cache`` and ``cache clear`` go through these while a hub runs, so
the hub's live caches forget what was deleted.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import BaseModel

from mlx_hub.core import prompt_caches
from mlx_hub.engine.prompt_listing import describe

if TYPE_CHECKING:
    from mlx_hub.core.hub import Hub


class CachedIdentity(BaseModel):
    key: str  # the folder: the weights' name and a hash of what the KV depends on
    names: list[str]  # hub.yaml entries that used it
    model: str
    entries: int
    bytes: int
    last_use: float | None
    known: bool  # some entry of this hub's hub.yaml has this identity now
    in_use: bool = False  # a live hub on the folder (this one or another) uses it; others are evicted first


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
        return await asyncio.to_thread(describe, hub.prompt_store)  # file locks and reads: off the loop

    @router.post("/hub/prompt-cache/clear", response_model=PromptCacheCleared, responses=errors)
    async def clear(model: str | None = None) -> PromptCacheCleared:
        """Delete the prompt caches of ``model`` (every model's without it)."""
        cleared = await asyncio.to_thread(prompt_caches.clear, hub.prompt_store, list(hub.slots), model)
        hub.notify()
        return PromptCacheCleared(cleared=cleared)

    return router
