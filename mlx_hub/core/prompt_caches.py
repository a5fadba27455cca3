"""The hub's side of persistent prompt caches: its store, each load's cache, clearing, and what status shows.

Everything the core does with prompt caches is here, and it reaches the
engine's store only as ``engine.base.PromptCacheStore``. The store is opened
(``Engine.open_prompt_store``) from hub.yaml's ``prompt_cache_path`` and
``prompt_cache_disk_size``; ``0`` leaves upstream's temporary caches alone.
Each load hands its handler's prompt cache to the store through the engine
(``persist_prompt_cache``), before the model serves its first request.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from mlx_hub.config import ConfigError, HubConfig, ModelConfig
from mlx_hub.core.errors import UnknownModelError
from mlx_hub.core.slot import ModelSlot
from mlx_hub.core.status import ModelStatus, PromptCacheStatus
from mlx_hub.engine.base import Engine, PromptCacheStore, PromptStoreError

log = logging.getLogger(__name__)

#: Model types whose upstream handler keeps a prompt cache (1.8.1: ``MLXLMHandler`` only).
CACHING_TYPES = ("lm",)


def persists(entry: ModelConfig) -> bool:
    """Whether this entry's prompt caches go to the hub's store.

    Not when it keeps none (``prompt_cache_size: 0``: nothing would be written
    only to be deleted), nor when it names its own ``prompt_cache_dir``:
    upstream's behaviour in that folder is what such an entry asked for.
    """
    return entry.model_type in CACHING_TYPES and entry.prompt_cache_size > 0 and not entry.prompt_cache_dir


def store_for(config: HubConfig, engine: Engine, current: PromptCacheStore | None) -> PromptCacheStore | None:
    """The store ``config`` asks for (``current`` again when the folder is the same); None when it is off.

    A folder the hub cannot use safely is a ``ConfigError`` naming it and the fix,
    raised before a start or a reload changes anything.
    """
    cap = config.prompt_cache_cap
    if cap <= 0:
        if current is not None:
            current.close()
        return None
    folder = config.prompt_cache_folder.resolve()
    try:
        store = (
            current
            if current is not None and current.root == folder
            else engine.open_prompt_store(folder, cap)
        )
    except PromptStoreError as exc:
        raise ConfigError([str(exc)]) from None
    if current is not None and store is not current:
        current.close()  # its last uses written, its leases let go
    store.cap = cap
    store.known = {m.name: engine.prompt_identity(m).key for m in config.models if persists(m)}
    return store


def attach(store: PromptCacheStore | None, engine: Engine, slot: ModelSlot, handler: Any) -> None:
    """Give a freshly loaded handler its persistent prompt cache (restoring what earlier loads kept)."""
    if store is None or not persists(slot.entry):
        return
    identity = engine.prompt_identity(slot.entry)
    store.known[slot.name] = identity.key  # the weights may have changed since hub.yaml was read
    try:
        engine.persist_prompt_cache(handler, slot.entry, store, identity)
    except Exception:  # the model still serves, with upstream's temporary cache
        log.exception("model '%s': its prompt caches cannot be kept on disk", slot.name)


def clear(store: PromptCacheStore | None, models: Collection[str], name: str | None) -> list[str]:
    """Delete the prompt caches of model ``name`` (all models when None); the identity folders emptied.

    ``models`` are the hub's entry names: one of them, or a name some folder
    records (a model since removed from hub.yaml), may be cleared.
    """
    if name is not None and name not in models and (store is None or not store.records(name)):
        raise UnknownModelError(f"no model named '{name}' has prompt caches", model=name)
    if store is None:
        return []
    cleared = store.clear(None if name is None else [name])
    log.info("prompt caches cleared: %s", ", ".join(cleared) or "none")
    return cleared


def model_row(row: ModelStatus, store: PromptCacheStore | None) -> ModelStatus:
    """A model's row with its prompt-cache lookups and disk bytes, where caches persist."""
    if store is not None:
        counters, meta = store.counters(row.id), row.metadata
        meta.prompt_cache_hits, meta.prompt_cache_misses = counters.hits, counters.misses
        meta.prompt_cache_tokens_reused = counters.tokens_reused
        meta.prompt_cache_disk_bytes = store.model_bytes(row.id)
    return row


def status(store: PromptCacheStore | None) -> PromptCacheStatus:
    """The status document's ``prompt_cache``: the store's folder, bytes on disk, cap and bytes written."""
    if store is None:
        return PromptCacheStatus(enabled=False, path=None, disk_bytes=0, cap_bytes=0)
    return PromptCacheStatus(
        enabled=True,
        path=str(store.root),
        disk_bytes=store.total_bytes(),
        cap_bytes=store.cap,
        bytes_written=store.bytes_written,
    )
