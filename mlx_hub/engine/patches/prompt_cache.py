"""Upstream's prompt cache, kept on disk across unloads, swaps and restarts (mlx-openai-server 1.8.1).

Upstream 1.8.1's ``app.utils.prompt_cache.LRUPromptCache`` (one per
``MLXLMHandler``, shared with its ``BatchScheduler``) writes every entry with
``dill`` into a temporary folder, keeps the token trie only in memory, and its
``close()`` (called by ``cleanup()``) deletes the folder. So every unload, group
swap, budget eviction, reload and restart threw away the prefill of every long
prompt, and what it did keep was a pickle.

``PersistentPromptCache`` is that class with its storage replaced, and nothing
else: lookups (exact, shorter and longer matches, ``allowed_sources``), LRU
order, ``prompt_cache_size`` and ``prompt_cache_max_bytes`` stay upstream's own
code. What changes:

- an entry is written with mlx-lm's ``save_prompt_cache`` format (safetensors
  tensors, class names and meta state as strings) plus its token ids, into the
  model identity's folder of the hub's ``PromptStore``; read back without pickle,
  and only cache classes mlx-lm defines are rebuilt;
- on construction the trie is rebuilt from the store's index, so the first
  request after a load finds what earlier loads (or hubs) left;
- ``close()`` keeps the files; the store's cap (LRU across all models) and
  upstream's own bounds are what delete them;
- lookups are counted (hits, misses, tokens reused) for the hub's status;
- the batch scheduler's writes go behind it (engine/prompt_writer.py): it
  queues each entry's files, deletes and index touches and goes on decoding,
  and a reply's end (upstream's stream sentinel) is delivered after the writes
  queued before it, so a finished reply's entry is on disk as before. The
  one-request-at-a-time path, which has no batch to hold up, still waits for
  its writes.

The hub swaps a handler's cache for this one right after its load, before any
request (``MLXEngine.persist_prompt_cache``). Patch name (``MLX_HUB_DISABLE_PATCHES``):
``persistent_prompt_cache``. Proof: without it,
tests/test_prompt_cache.py::test_restored_cache_answers_as_cold_after_unload_and_restart
sees a miss after the unload; without the writes behind the batch,
tests/test_prompt_cache.py::test_a_slow_cache_write_holds_up_no_other_request
gets no token while a write is held.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import mlx.core as mx
from app.utils.prompt_cache import LRUPromptCache
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import can_trim_prompt_cache, save_prompt_cache

from mlx_hub.config import ModelConfig
from mlx_hub.engine.base import Identity
from mlx_hub.engine.patches.switch import enabled
from mlx_hub.engine.prompt_files import new_entry_id, publish, temp_path
from mlx_hub.engine.prompt_identity import FORMAT
from mlx_hub.engine.prompt_store import Entry, PromptStore
from mlx_hub.engine.prompt_writer import WriteBehind

log = logging.getLogger(__name__)

#: Every entry's metadata carries these, so a file from elsewhere is refused rather than misread.
FORMAT_KEY = "mlx_hub_format"
IDENTITY_KEY = "mlx_hub_identity"
#: upstream's ``source`` for caches its batch scheduler inserts (the writes that go behind).
BATCH = "batch"
#: Seconds an unload waits for the writes still queued (they go on in the background after).
CLOSE_TIMEOUT = 120.0

#: The writer of the cache the current batch scheduler thread last inserted into (see ``_send``).
_inserted = threading.local()


class UnreadableEntry(ValueError):
    """A payload that is not a prompt cache this identity wrote (upstream skips and deletes on ValueError)."""


def _cache_class(name: Any) -> type:
    cls = getattr(mlx_cache, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, mlx_cache._BaseCache)):
        raise UnreadableEntry(f"unknown cache class {name!r}")
    return cls


def entry_layout(metadata: dict[str, str]) -> tuple[dict[str, Any], list[str], list[Any] | None, list[Any]]:
    """mlx-lm's ``save_prompt_cache`` metadata as (extra, cache classes, meta states, scalar marks).

    mlx-lm 0.31 writes ``[meta states, extra, classes]`` and each class's
    ``from_state`` takes the meta state; 0.32 writes ``[extra, classes, scalars]``,
    keeps scalars inside the state (``scalars`` says which arrays were numbers,
    strings or None) and has no meta states (None here).
    """
    tree = tree_unflatten(list(metadata.items()))
    if isinstance(tree[0], dict):
        extra, classes, scalars = tree
        return extra, list(classes), None, list(scalars[1:])
    info, extra, classes = tree
    return extra, list(classes), list(info), []


def _restore_scalars(arrays: dict[str, Any], scalars: list[Any]) -> None:
    for position, kind in scalars:
        value = arrays[position]
        if kind == "scalar":
            arrays[position] = value.item()
        elif kind == "string":
            arrays[position] = "".join(chr(c) for c in value.tolist())
        elif kind == "none":
            arrays[position] = None
        else:
            raise UnreadableEntry(f"unknown scalar kind {kind!r}")


def _check_inner(name: str, state: Any, meta: Any) -> None:
    """A CacheList names its inner classes (0.31: in its meta state; 0.32: in its state): mlx-lm's only."""
    if _cache_class(name) is mlx_cache.CacheList:
        for inner in meta[0] if meta is not None else [c for _, c in state]:
            _cache_class(inner)


def save_entry(path: Path, cache: list[Any], key: str) -> None:
    """Write one payload with mlx-lm's format, marked as this identity's; a file MLX cannot write is an OSError."""
    try:
        save_prompt_cache(str(path), cache, {FORMAT_KEY: str(FORMAT), IDENTITY_KEY: key})
    except RuntimeError as exc:  # how MLX says it could not open or write the file
        raise OSError(f"{path}: {exc}") from exc


def load_entry(path: Path, key: str) -> list[Any]:
    """Read one payload: safetensors only, cache classes from mlx-lm only, this identity's only."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        # Read now, on this thread: a lazy load is tied to this thread's stream, and upstream's
        # single-request path looks caches up on the event loop but generates on its worker thread.
        mx.eval(list(arrays.values()))
        extra, classes, info, scalars = entry_layout(metadata)
        if extra.get(FORMAT_KEY) != str(FORMAT) or extra.get(IDENTITY_KEY) != key:
            raise UnreadableEntry("written for another identity or by another format")
        _restore_scalars(arrays, scalars)
        states = tree_unflatten(list(arrays.items())) if arrays else [[] for _ in classes]
        metas = info if info is not None else [None] * len(classes)
        cache = []
        for name, state, meta in zip(classes, states, metas, strict=True):
            _check_inner(name, state, meta)
            cls = _cache_class(name)
            cache.append(cls.from_state(state) if meta is None else cls.from_state(state, meta))
        return cache
    except UnreadableEntry:
        raise
    except Exception as exc:  # truncated, corrupt or foreign: any failure means "not usable"
        raise UnreadableEntry(f"{type(exc).__name__}: {exc}") from exc


def _evaluate(prompt_cache: list[Any]) -> None:
    """Finish every array of a cache's state on this thread (an array is tied to the stream it was built on)."""
    mx.eval([a for _, a in tree_flatten([c.state for c in prompt_cache]) if isinstance(a, mx.array)])


class PersistentPromptCache(LRUPromptCache):
    """``LRUPromptCache`` whose entries live in ``store`` under identity ``key`` and outlive the handler."""

    def __init__(self, store: PromptStore, key: str, model: str, *, max_size: int, max_bytes: int):
        super().__init__(max_size=max_size, max_bytes=max_bytes, cache_dir=store.folder(key))
        self.store, self.key, self.model = store, key, model
        self._lock = threading.RLock()  # upstream's callers: a worker thread and a batch scheduler thread
        self._pending: deque[tuple[str, Any]] = deque()  # what the store told us, applied on our threads
        self._ids: dict[str, tuple[int, ...]] = {}  # entry id -> its tokens in the trie
        self._writing = threading.local()
        self._writer = WriteBehind(model)
        # entry id -> its caches, until the writer has them on disk
        self._unwritten: dict[str, list[Any]] = {}
        self.restored = 0
        for entry in store.entries(key):  # least recently used first, as the LRU expects
            self._adopt(entry)
        self.restored = len(self._ids)
        if len(self) > self.max_size or self.nbytes > self.max_bytes:
            self.trim_to(n_sequences=self.max_size, n_bytes=self.max_bytes)
        store.subscribe(key, self)

    # ------------------------------------------------------------ entries

    def _adopt(self, entry: Entry) -> None:
        """Put an entry from the store into the trie (restore, or another profile wrote it)."""
        if entry.id in self._ids or entry.cache_type not in self._lru.ordering:
            return
        tokens = self.store.read_tokens(self.key, entry)
        if not tokens:
            return
        payload, _ = self.store.paths(self.key, entry.id)
        cached = self.CacheEntry(payload, entry.nbytes, entry.cache_type, entry.trimmable, entry.source)
        prev = self._trie.add(tokens, cached)
        if prev is not None:  # the same tokens twice: the newer stays
            self._remove_entry_accounting(prev)
            self._lru.remove(tuple(tokens))
            self._delete_entry_file(prev)
        self._n_bytes += cached.nbytes
        self._n_bytes_by_type[cached.cache_type] += cached.nbytes
        self._lru.push(tuple(tokens), cached.cache_type)
        self._ids[entry.id] = tuple(tokens)

    def _drop_local(self, entry_id: str) -> None:
        """Take an entry the store deleted out of the trie, without touching files."""
        tokens = self._ids.pop(entry_id, None)
        if tokens is None:
            return
        try:
            held = self._trie.get(list(tokens))
        except (KeyError, IndexError):
            return
        if held.file_path.stem != entry_id:
            return
        self._trie.pop(list(tokens))
        self._lru.remove(tokens)
        self._remove_entry_accounting(held)

    def _apply_pending(self, *, trim: bool = True) -> None:
        while self._pending:
            kind, value = self._pending.popleft()
            if kind == "learn":
                self._adopt(value)
            else:
                for entry_id in list(self._ids) if "*" in value else value:
                    self._drop_local(entry_id)
        while trim and len(self) > self.max_size:  # another profile's entries count against this bound too
            self._evict_tokens(self._lru.pop())

    # ------------------------------------------------- the store's listener

    def forget(self, ids: list[str]) -> None:
        self._pending.append(("forget", list(ids)))
        self._apply_if_free()

    def learn(self, entry: Entry) -> None:
        self._pending.append(("learn", entry))

    def _apply_if_free(self) -> None:
        """Apply now unless a request's thread is using the cache (it applies them on its next call)."""
        if getattr(self._writing, "active", False) or not self._lock.acquire(blocking=False):
            return
        try:
            self._apply_pending()
        finally:
            self._lock.release()

    # ------------------------------------------------- upstream's interface

    def fetch_nearest_cache(
        self, tokens_ids: list[int], *, allowed_sources: set[str] | None = None
    ) -> tuple[list[Any] | None, list[int]]:
        with self._lock:
            self._apply_pending(trim=False)  # on the event loop: no trimming (files), the next insert trims
            cache, rest = super().fetch_nearest_cache(tokens_ids, allowed_sources=allowed_sources)
        self.store.record(self.model, hit=cache is not None, reused=len(tokens_ids) - len(rest))
        return cache, rest

    def insert_cache(
        self,
        tokens_ids: list[int],
        prompt_cache: list[Any],
        *,
        cache_type: str = "assistant",
        source: str = "nonbatch",
    ) -> None:
        nbytes = sum(getattr(c, "nbytes", 0) for c in prompt_cache)
        with self._lock:
            self._apply_pending()
            if not self.store.make_room(self.key, nbytes):
                log.info(
                    "model '%s': a %d-byte prompt cache is larger than prompt_cache_disk_size; not kept",
                    self.model,
                    nbytes,
                )
                return
            self._writing.active = True
            self._writing.request = (list(tokens_ids), cache_type, source, nbytes)
            try:
                super().insert_cache(tokens_ids, prompt_cache, cache_type=cache_type, source=source)
            finally:
                self._writing.active = False
            self._apply_pending()
        if source == BATCH:
            _inserted.writer = self._writer  # the reply that ends next on this thread waits for these writes
        else:
            self._writer.flush()  # one request at a time: nothing to hold up, and its reply ends on disk

    def trim_to(self, *, n_sequences: int | None = None, n_bytes: int | None = None) -> None:
        with self._lock:
            self._apply_pending()
            super().trim_to(n_sequences=n_sequences, n_bytes=n_bytes)

    def close(self) -> None:
        """Keep every entry for the next load of this identity: finish the queued writes, stop listening."""
        self._writer.close(CLOSE_TIMEOUT)
        self.store.unsubscribe(self.key, self)
        self._pending.clear()

    # ------------------------------------------------- upstream's storage

    def _write_cache_to_disk(self, prompt_cache: list[Any]) -> Path:
        """Queue the entry's files; its path (the file appears once the writer has run)."""
        tokens, cache_type, source, nbytes = self._writing.request
        entry_id = new_entry_id()
        payload, _ = self.store.paths(self.key, entry_id)
        # Evaluated here, on the generating thread whose stream built them: the writer's
        # own ops (slices, the save) then only read finished arrays.
        _evaluate(prompt_cache)
        self._ids[entry_id] = tuple(tokens)
        self._unwritten[entry_id] = prompt_cache
        entry = Entry(
            id=entry_id,
            tokens=len(tokens),
            digest="",
            bytes=0,
            nbytes=nbytes,
            last_use=time.time(),
            cache_type=cache_type,
            trimmable=can_trim_prompt_cache(prompt_cache),
            source=source,
        )
        self._writer.submit(lambda: self._write_entry(entry, prompt_cache, tokens), entry_id, nbytes)
        return payload

    def _write_entry(self, entry: Entry, prompt_cache: list[Any], tokens: list[int]) -> None:
        """On the writer thread: the tensors and tokens, published by rename, then the index.

        Inside the store's ``writing`` block: its folder is there and no sweep or
        clear takes its files before the commit.
        """
        payload, _ = self.store.paths(self.key, entry.id)
        tmp = temp_path(payload)
        try:
            with self.store.writing(self.key, entry.id):
                save_entry(tmp, prompt_cache, self.key)
                publish(tmp, payload)
                token_size, entry.digest = self.store.write_tokens(self.key, entry.id, tokens)
                entry.bytes = payload.stat().st_size + token_size
                self.store.commit(self.key, entry, origin=self)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            payload.unlink(missing_ok=True)
            self.forget([entry.id])  # a miss next time, never a file that is not there
            if not isinstance(exc, OSError):
                raise
            # A full disk, a folder made unusable: the answer stood, only its cache is lost.
            log.warning("model '%s': a prompt cache could not be written (%s); not kept", self.model, exc)
        finally:
            self._unwritten.pop(entry.id, None)

    def _load_cache_from_disk(self, entry: Any) -> list[Any]:
        return load_entry(entry.file_path, self.key)

    def _try_load_cache(self, tokens: list[int], entry: Any) -> list[Any] | None:
        entry_id = entry.file_path.stem
        unwritten = self._unwritten.get(entry_id)
        if unwritten is not None:  # still queued for disk: a copy (mlx-lm's own LRU copies the same way)
            cache = copy.deepcopy(unwritten)
            _evaluate(cache)  # on this thread: the reading thread may not be the one that generates
            return cache
        if not entry.file_path.exists():  # the cap, a `cache clear` or another hub removed it: a plain miss
            self._invalidate_tokens(tokens, entry)
            return None
        cache = super()._try_load_cache(tokens, entry)  # a bad file: one warning, deleted, served cold
        if cache is not None:
            self.store.touch(self.key, entry_id)  # noted in memory; written by the store's own thread
        return cache

    def _delete_entry_file(self, entry: Any) -> None:
        """Forget an entry's files: a queued write is dropped, a written one removed after the writes before it.

        The removal goes to the writer (never the caller's thread, which may be
        the event loop on a lookup), so it cannot overtake the entry's own write.
        """
        entry_id = entry.file_path.stem
        self._ids.pop(entry_id, None)
        if self._writer.cancel(entry_id):  # replaced or evicted before it was written: never written
            self._unwritten.pop(entry_id, None)
            return
        self._writer.submit(lambda: self.store.remove(self.key, [entry_id], origin=self))


def persist(handler: Any, entry: ModelConfig, store: PromptStore, identity: Identity) -> bool:
    """Give ``handler`` a persistent prompt cache with its current bounds; False if it keeps none.

    Call before the handler serves anything: its batch scheduler, made on the
    first batched request, takes whatever ``handler.prompt_cache`` is then.
    """
    current = getattr(handler, "prompt_cache", None)
    if not enabled("persistent_prompt_cache") or not isinstance(current, LRUPromptCache):
        return False
    if isinstance(current, PersistentPromptCache):
        return True
    _end_replies_after_writes()
    store.adopt(identity, entry.name)
    cache = PersistentPromptCache(
        store, identity.key, entry.name, max_size=current.max_size, max_bytes=current.max_bytes
    )
    handler.prompt_cache = cache
    current.close()  # upstream's empty temporary folder
    return True


def _end_replies_after_writes() -> None:
    """Upstream's batch scheduler delivers a reply's end after the cache writes its thread queued before it.

    Its ``_send`` (a static method) puts each chunk, then the sentinel that ends
    the reply, on the request's queue. The sentinel of a reply whose thread has
    writes queued goes to the back of that writer's queue instead, so a client
    that has its answer finds its entry on disk, as when upstream wrote in line.
    """
    try:
        from app.core import batch_scheduler
    except ImportError:  # an upstream release without a batch scheduler writes in line
        return
    scheduler = batch_scheduler.BatchScheduler
    send = scheduler.__dict__["_send"].__func__
    if getattr(send, "_mlx_hub_after_writes", False):
        return

    def _send(loop: Any, out_queue: Any, item: Any) -> None:
        writer = getattr(_inserted, "writer", None)
        if item is batch_scheduler._STREAM_SENTINEL and writer is not None and writer.busy():
            writer.submit(lambda: send(loop, out_queue, item))
            return
        send(loop, out_queue, item)

    _send._mlx_hub_after_writes = True  # type: ignore[attr-defined]
    scheduler._send = staticmethod(_send)
