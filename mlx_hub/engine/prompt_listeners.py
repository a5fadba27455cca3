"""Who in this hub hears of the store's changes, and what each model's lookups found.

Both are read on the event loop (a lookup, a status build), so each has its own
small lock, never the store lock, which a disk write or another hub may hold.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Protocol

from mlx_hub.engine.base import ModelCounters
from mlx_hub.engine.prompt_index import Entry


class Listener(Protocol):
    """A live prompt cache of one identity: told when entries it may hold appear or go."""

    def forget(self, ids: list[str]) -> None: ...
    def learn(self, entry: Entry) -> None: ...


class Listeners:
    """The live caches of each identity in this process."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[Listener]] = {}
        self._lock = threading.Lock()

    def add(self, key: str, listener: Listener) -> None:
        with self._lock:
            self._by_key.setdefault(key, []).append(listener)

    def drop(self, key: str, listener: Listener) -> None:
        with self._lock:
            held = self._by_key.get(key, [])
            if listener in held:
                held.remove(listener)
            if not held:
                self._by_key.pop(key, None)

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._by_key

    def of(self, key: str) -> list[Listener]:
        with self._lock:
            return list(self._by_key.get(key, []))

    def learn(self, key: str, entry: Entry, *, origin: Listener | None) -> None:
        for listener in self.of(key):
            if listener is not origin:
                listener.learn(entry)

    def forget(self, gone: list[tuple[str, str]], *, origin: Listener | None = None) -> None:
        """Tell each identity's caches (but ``origin``) which of its entries were deleted (``*``: all)."""
        by_key: dict[str, list[str]] = {}
        for key, entry_id in gone:
            by_key.setdefault(key, []).append(entry_id)
        for key, ids in by_key.items():
            for listener in self.of(key):
                if listener is not origin:
                    listener.forget(ids)


class Counters:
    """``ModelCounters`` by model name."""

    def __init__(self) -> None:
        self._by_name: dict[str, ModelCounters] = {}
        self._lock = threading.Lock()

    def record(self, name: str, *, hit: bool, reused: int) -> None:
        with self._lock:
            counters = self._by_name.setdefault(name, ModelCounters())
            if hit:
                counters.hits += 1
                counters.tokens_reused += reused
            else:
                counters.misses += 1

    def of(self, name: str) -> ModelCounters:
        with self._lock:
            return ModelCounters(**asdict(self._by_name.get(name, ModelCounters())))
