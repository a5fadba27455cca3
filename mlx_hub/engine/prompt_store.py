"""The prompt-cache store on disk: one folder per model identity (prompt_identity.py), one hub-wide cap.

Upstream keeps each handler's prompt caches in a temporary folder that its
``close()`` deletes, with the index only in memory; every unload, swap and
restart then re-prefills long prompts. This store keeps them instead, in
``prompt_cache_path``:

- one folder per **identity** (``model_identity``): the resolved weights (path,
  each weight file's size and mtime), the KV options and the draft model, hashed;
  anything that changes what the KV holds changes the folder, so a stale cache is
  never read, and entries that share weights and options share one folder;
- per entry, its tensors (``<id>.safetensors``, written by the patch with
  mlx-lm's format) and its token ids (``<id>.tokens``, little-endian uint32),
  listed in a small JSON ``index.json`` with a digest of the tokens, the bytes
  on disk and the last use;
- a cap, ``prompt_cache_disk_size``, on the bytes of all folders together,
  checked after every write: least recently used entries go first, those of
  identities no hub.yaml entry has any more before all others.

Nothing here imports MLX or upstream: it stores files and decides what to
evict. Every change to an index happens under one ``fcntl`` lock on the folder,
so two hubs on one folder see each other's writes whole; every file is written
through a temporary name, fsynced and renamed. Unreadable files are skipped with
one warning and deleted; the request they would have served runs cold.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mlx_hub.engine.prompt_files import (
    check_folder,
    digest_of,
    parse_tokens,
    publish,
    token_bytes,
)
from mlx_hub.engine.prompt_identity import FORMAT, Identity
from mlx_hub.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)

INDEX = "index.json"
IDENTITY = "identity.json"
LOCK = ".lock"
PAYLOAD = ".safetensors"
TOKENS = ".tokens"
#: A temporary file older than this is a crashed write's leftover, not another hub's write in progress.
STALE_TMP_SECONDS = 3600.0


@dataclass
class Entry:
    """One prompt cache on disk: its files are ``<id>.safetensors`` and ``<id>.tokens``."""

    id: str
    tokens: int  # how many token ids the key has
    digest: str  # sha256 of the token file's bytes
    bytes: int  # both files' size on disk
    nbytes: int  # the tensors' bytes in memory (upstream's accounting)
    last_use: float
    cache_type: str = "assistant"
    trimmable: bool = True
    source: str = "nonbatch"

    @classmethod
    def parse(cls, value: Any) -> Entry | None:
        try:
            entry = cls(**value)
        except TypeError:
            return None
        ok = isinstance(entry.id, str) and re.fullmatch(r"[0-9a-f]{32}", entry.id) is not None
        return entry if ok and isinstance(entry.bytes, int) and isinstance(entry.tokens, int) else None


class Listener(Protocol):
    """A live prompt cache of one identity: told when entries it may hold appear or go."""

    def forget(self, ids: list[str]) -> None: ...
    def learn(self, entry: Entry) -> None: ...


@dataclass
class ModelCounters:
    """Per model, since the hub started: lookups that found a cache, those that did not, tokens reused."""

    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0


@dataclass
class IdentityInfo:
    """One folder, as ``mlx-openai-server-hub cache`` lists it."""

    key: str
    names: list[str]
    model: str
    entries: int
    bytes: int
    last_use: float | None
    known: bool


class PromptStore:
    """Every model's prompt caches under ``root``, at most ``cap`` bytes in all.

    Thread-safe (handlers' worker threads, batch schedulers and the event loop
    all call in) and process-safe (the ``.lock`` file). ``known`` maps each
    hub.yaml entry name to its identity key; identities outside it go first.
    """

    def __init__(self, root: str | os.PathLike[str], cap: int):
        self.root = Path(root).expanduser()
        check_folder(self.root)
        self.cap = int(cap)
        self.known: dict[str, str] = {}
        self._mutex = threading.RLock()
        self._held = threading.local()
        self._listeners: dict[str, list[Listener]] = {}
        self._counters: dict[str, ModelCounters] = {}
        self._usage: tuple[float, dict[str, int]] | None = None
        self._warned: set[str] = set()
        self.bytes_written = 0  # by this process, since it opened the store

    # ---------------------------------------------------------------- locking

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of every index: this thread among threads, this process among hubs."""
        with self._mutex:
            if getattr(self._held, "depth", 0):  # this thread holds it already: no second flock
                yield
                return
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            self._held.depth = 1
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                self._held.depth = 0
                os.close(fd)  # closing releases the lock
                self._usage = None

    # --------------------------------------------------------------- identities

    def folder(self, key: str) -> Path:
        return self.root / key

    def adopt(self, identity: Identity, name: str) -> Path:
        """The identity's folder, created (0700) with its description; ``name`` is noted as one of its users."""
        folder = self.folder(identity.key)
        with self.locked():
            folder.mkdir(mode=0o700, exist_ok=True)
            info = read_json(folder / IDENTITY, {})
            names = sorted(set(info.get("names", []) if isinstance(info, dict) else []) | {name})
            if not isinstance(info, dict) or info.get("names") != names:
                atomic_write_json(folder / IDENTITY, {"names": names, **identity.description})
        return folder

    def keys(self) -> list[str]:
        with contextlib.suppress(OSError):
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        return []

    # ------------------------------------------------------------------ index

    def _read(self, key: str) -> dict[str, Entry]:
        """The identity's index; a corrupt one is dropped (with its files) after one warning."""
        path = self.folder(key) / INDEX
        if not path.exists():
            return {}
        data = read_json(path)
        raw = data.get("entries") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if not isinstance(raw, dict):
            self._warn_once(
                str(path), f"prompt cache index {path} is unreadable; dropping that model's caches"
            )
            self._wipe(key)
            return {}
        entries = {}
        for entry_id, value in raw.items():
            entry = Entry.parse(value)
            if entry is None or entry.id != entry_id:
                self._warn_once(f"{path}:{entry_id}", f"prompt cache index {path}: skipping a bad entry")
                continue
            entries[entry_id] = entry
        return entries

    def _write(self, key: str, entries: dict[str, Entry]) -> None:
        folder = self.folder(key)
        if not folder.is_dir():
            return
        atomic_write_json(
            folder / INDEX, {"format": FORMAT, "entries": {k: asdict(e) for k, e in entries.items()}}
        )

    def entries(self, key: str) -> list[Entry]:
        """The identity's entries, least recently used first."""
        with self.locked():
            return sorted(self._read(key).values(), key=lambda e: e.last_use)

    def paths(self, key: str, entry_id: str) -> tuple[Path, Path]:
        """An entry's tensor file and token file."""
        folder = self.folder(key)
        return folder / f"{entry_id}{PAYLOAD}", folder / f"{entry_id}{TOKENS}"

    def has(self, key: str, entry_id: str) -> bool:
        with self.locked():
            return entry_id in self._read(key)

    def read_tokens(self, key: str, entry: Entry) -> list[int] | None:
        """The entry's token ids; None (after one warning, and the entry deleted) if its file does not match."""
        _, path = self.paths(key, entry.id)
        try:
            raw = path.read_bytes()
        except OSError:
            raw = b""
        if len(raw) != 4 * entry.tokens or digest_of(raw) != entry.digest:
            self.discard(key, entry.id, f"prompt cache {path} is missing or does not match its index")
            return None
        return parse_tokens(raw)

    # ------------------------------------------------------------------ writes

    def new_entry_id(self) -> str:
        return uuid.uuid4().hex

    def write_tokens(self, key: str, entry_id: str, tokens: list[int]) -> tuple[int, str]:
        """Write an entry's token file (atomically); its size and digest."""
        raw = token_bytes(tokens)
        _, final = self.paths(key, entry_id)
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.write_bytes(raw)
        publish(tmp, final)
        return len(raw), digest_of(raw)

    def make_room(self, key: str, nbytes: int) -> bool:
        """Evict until ``nbytes`` more fit under the cap; False (nothing evicted) if they never could."""
        if nbytes > self.cap:
            return False
        with self.locked():
            evicted = self._evict(self.cap - nbytes, keep=None)
        self._tell_forgotten(evicted)
        return True

    def commit(self, key: str, entry: Entry, *, origin: Listener | None = None) -> bool:
        """List a written entry in its index, then hold the cap. False if the entry itself had to go."""
        with self.locked():
            entries = self._read(key)
            entries[entry.id] = entry
            self._write(key, entries)
            self.bytes_written += entry.bytes
            evicted = self._evict(self.cap, keep=(key, entry.id))
            if self._total() > self.cap:  # the new entry alone is over the cap
                evicted += self._drop(key, [entry.id])
        self._tell_forgotten(evicted)
        kept = (key, entry.id) not in evicted
        if kept:
            for listener in self._listeners_of(key):
                if listener is not origin:
                    listener.learn(entry)
        return kept

    def touch(self, key: str, entry_id: str) -> None:
        """Note a use of the entry (least recently used goes first)."""
        with self.locked():
            entries = self._read(key)
            if entry_id in entries:
                entries[entry_id].last_use = time.time()
                self._write(key, entries)

    def remove(self, key: str, ids: list[str], *, origin: Listener | None = None) -> None:
        """Delete entries (upstream evicted or replaced them); the other live caches of the identity forget them."""
        with self.locked():
            gone = self._drop(key, ids)
        self._tell_forgotten(gone, origin=origin)

    def discard(self, key: str, entry_id: str, why: str) -> None:
        """An entry that cannot be read: one warning, then it is deleted."""
        self._warn_once(f"{key}/{entry_id}", f"{why}; deleting it, the request is served without it")
        self.remove(key, [entry_id])

    def clear(self, names: list[str] | None = None) -> list[str]:
        """Delete every entry of the identities ``names`` use (all when None); the keys cleared."""
        cleared = []
        with self.locked():
            for key in self.keys():
                if names is not None and not set(names) & set(self._names(key)):
                    continue
                cleared.append(key)
                for entry_id in self._read(key):
                    for path in self.paths(key, entry_id):
                        path.unlink(missing_ok=True)
                self._wipe(key, keep_folder=bool(self._listeners.get(key)))
        for key in cleared:
            for listener in self._listeners_of(key):
                listener.forget(["*"])
        return cleared

    # ------------------------------------------------------------------ eviction

    def _all(self) -> list[tuple[str, Entry]]:
        return [(key, e) for key in self.keys() for e in self._read(key).values()]

    def _total(self) -> int:
        return sum(e.bytes for _, e in self._all())

    def _evict(self, limit: int, keep: tuple[str, str] | None) -> list[tuple[str, str]]:
        """Delete least recently used entries until the total is at most ``limit`` (caller holds the lock).

        Entries of identities no hub.yaml entry has go first; ``keep`` (the
        entry just written) goes last, by ``commit``, and only when alone over.
        """
        everything = self._all()
        total = sum(e.bytes for _, e in everything)
        current = set(self.known.values())
        order = sorted(
            (item for item in everything if (item[0], item[1].id) != keep),
            key=lambda item: (not current or item[0] in current, item[1].last_use),
        )
        evicted: list[tuple[str, str]] = []
        for key, entry in order:
            if total <= limit:
                break
            evicted += self._drop(key, [entry.id])
            total -= entry.bytes
        return evicted

    def _drop(self, key: str, ids: list[str]) -> list[tuple[str, str]]:
        entries = self._read(key)
        gone = [i for i in ids if i in entries]
        for entry_id in ids:
            for path in self.paths(key, entry_id):
                path.unlink(missing_ok=True)
            entries.pop(entry_id, None)
        if gone:
            self._write(key, entries)
        if not entries and key not in self._listeners and self.known and key not in self.known.values():
            self._wipe(key)  # an identity nobody uses any more leaves no folder behind
        return [(key, i) for i in gone]

    def _wipe(self, key: str, *, keep_folder: bool = False) -> None:
        folder = self.folder(key)
        with contextlib.suppress(OSError):
            for path in folder.iterdir():
                if keep_folder and path.name == IDENTITY:
                    continue
                path.unlink(missing_ok=True)
            if not keep_folder:
                folder.rmdir()

    def sweep(self) -> int:
        """Delete files no index lists (a crashed write's leftovers, foreign files); the count deleted."""
        deleted = 0
        now = time.time()
        with self.locked():
            for key in self.keys():
                listed = {p.name for i in self._read(key) for p in self.paths(key, i)}
                for path in self.folder(key).iterdir():
                    if path.name in listed or path.name in (INDEX, IDENTITY):
                        continue
                    with contextlib.suppress(OSError):
                        if path.name.endswith(".tmp") and now - path.stat().st_mtime < STALE_TMP_SECONDS:
                            continue  # another hub may be writing it now
                        path.unlink()
                        deleted += 1
        return deleted

    # ------------------------------------------------------------- listeners

    def subscribe(self, key: str, listener: Listener) -> None:
        with self._mutex:
            self._listeners.setdefault(key, []).append(listener)

    def unsubscribe(self, key: str, listener: Listener) -> None:
        with self._mutex:
            held = self._listeners.get(key, [])
            if listener in held:
                held.remove(listener)
            if not held:
                self._listeners.pop(key, None)

    def _listeners_of(self, key: str) -> list[Listener]:
        with self._mutex:
            return list(self._listeners.get(key, []))

    def _tell_forgotten(self, gone: list[tuple[str, str]], *, origin: Listener | None = None) -> None:
        by_key: dict[str, list[str]] = {}
        for key, entry_id in gone:
            by_key.setdefault(key, []).append(entry_id)
        for key, ids in by_key.items():
            for listener in self._listeners_of(key):
                if listener is not origin:
                    listener.forget(ids)

    # --------------------------------------------------------------- reading

    def _names(self, key: str) -> list[str]:
        info = read_json(self.folder(key) / IDENTITY, {})
        names = info.get("names") if isinstance(info, dict) else None
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def usage(self, max_age: float = 1.0) -> dict[str, int]:
        """Bytes on disk by identity key (read again at most every ``max_age`` seconds)."""
        cached = self._usage
        if cached is not None and time.monotonic() - cached[0] < max_age:
            return cached[1]
        with self.locked():
            usage = {key: sum(e.bytes for e in self._read(key).values()) for key in self.keys()}
        self._usage = (time.monotonic(), usage)
        return usage

    def total_bytes(self) -> int:
        return sum(self.usage().values())

    def model_bytes(self, name: str) -> int:
        """Bytes on disk for the identity hub.yaml's entry ``name`` has now."""
        key = self.known.get(name)
        return self.usage().get(key, 0) if key else 0

    def listing(self) -> list[IdentityInfo]:
        """Every identity folder with its users, entries, bytes and last use."""
        rows = []
        with self.locked():
            for key in self.keys():
                entries = list(self._read(key).values())
                info = read_json(self.folder(key) / IDENTITY, {})
                rows.append(
                    IdentityInfo(
                        key=key,
                        names=self._names(key),
                        model=str(info.get("model", "?")) if isinstance(info, dict) else "?",
                        entries=len(entries),
                        bytes=sum(e.bytes for e in entries),
                        last_use=max((e.last_use for e in entries), default=None),
                        known=not self.known or key in self.known.values(),
                    )
                )
        return rows

    # --------------------------------------------------------------- counters

    def record(self, name: str, *, hit: bool, reused: int) -> None:
        """Count one lookup of model ``name``'s prompt cache."""
        with self._mutex:
            counters = self._counters.setdefault(name, ModelCounters())
            if hit:
                counters.hits += 1
                counters.tokens_reused += reused
            else:
                counters.misses += 1

    def counters(self, name: str) -> ModelCounters:
        with self._mutex:
            return ModelCounters(**asdict(self._counters.get(name, ModelCounters())))

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message)


def describe(store: PromptStore | None) -> dict[str, Any]:
    """What ``GET /hub/prompt-cache`` answers and ``mlx-openai-server-hub cache`` prints."""
    if store is None:
        return {"enabled": False, "path": None, "disk_bytes": 0, "cap_bytes": 0, "identities": []}
    rows = [asdict(row) for row in store.listing()]
    return {
        "enabled": True,
        "path": str(store.root),
        "disk_bytes": sum(row["bytes"] for row in rows),
        "cap_bytes": store.cap,
        "identities": rows,
    }


def open_store(root: str | os.PathLike[str], cap: int) -> PromptStore:
    """The store at ``root`` (created 0700, or refused), with a crashed write's leftovers swept away."""
    store = PromptStore(root, cap)
    store.sweep()
    return store
