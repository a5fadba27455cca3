"""The prompt-cache store on disk: one folder per model identity (prompt_identity.py), one cap for all.

Upstream keeps each handler's prompt caches in a temporary folder that its
``close()`` deletes, with the index only in memory; every unload, swap and
restart then re-prefills long prompts. This store keeps them instead, in
``prompt_cache_path``:

- one folder per **identity** (``model_identity``): the resolved weights (path,
  each weight file's size and mtime), ``config.json``'s content and, under
  ``trust_remote_code``, the folder's Python files, the KV options and the draft
  model, hashed;
  anything that changes what the KV holds changes the folder, so a stale cache is
  never read, and entries that share weights and options share one folder;
- per entry, its tensors (``<id>.safetensors``, written by the patch with
  mlx-lm's format) and its token ids (``<id>.tokens``, little-endian uint32),
  listed in a small JSON ``index.json`` (prompt_index.py) with a digest of the
  tokens, the bytes on disk and the last use;
- a cap, ``prompt_cache_disk_size``, on the bytes of all folders together,
  checked after every write: least recently used entries go first, those of
  identities no live hub uses before all others.

Several hubs may share the folder (docs/prompt-cache.md): every index change
happens under one ``fcntl`` lock (prompt_locks.py), each hub leases the
identities its hub.yaml and its loaded models use (prompt_folders.py), so none
deletes an identity another live hub uses, and each entry's writer owns its
files until they are indexed, so no sweep or clear takes a write in progress. Every file is written through a temporary name, fsynced and
renamed. A file that cannot be read now is skipped and kept; one that was read
and is malformed is dropped alone, after one warning; the request it would have
served runs cold. Uses of entries (hits) are noted in memory and written by a
background thread (prompt_background.py), never on the caller's thread.

Nothing here imports MLX or upstream: it stores files and decides what to evict.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from mlx_hub.engine.base import Identity, ModelCounters
from mlx_hub.engine.prompt_background import CLOSE_SECONDS, FLUSH_SECONDS, Background, Figures, Touches
from mlx_hub.engine.prompt_files import (
    IDENTITY,
    INDEX,
    PAYLOAD,
    TOKENS,
    check_folder,
    digest_of,
    names_in,
    parse_tokens,
    publish,
    temp_path,
    token_bytes,
)
from mlx_hub.engine.prompt_folders import Folders
from mlx_hub.engine.prompt_identity import FORMAT
from mlx_hub.engine.prompt_index import Entry, IndexUnreadable, read_index
from mlx_hub.engine.prompt_listeners import Counters, Listener, Listeners
from mlx_hub.engine.prompt_locks import LEASE, StoreLock, delete_unowned
from mlx_hub.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)


class PromptStore:
    """Every model's prompt caches under ``root``, at most ``cap`` bytes in all.

    Thread-safe (handlers' worker threads, batch schedulers and the event loop
    all call in) and process-safe (prompt_locks.py). ``known`` maps each
    hub.yaml entry name to its identity key; this hub leases those identities.
    """

    def __init__(self, root: str | os.PathLike[str], cap: int, *, flush_seconds: float = FLUSH_SECONDS):
        self.root = Path(root).expanduser()
        check_folder(self.root)
        self.cap = int(cap)
        self._lock = StoreLock(self.root)
        self._touches = Touches()
        self._background = Background(self._background_work, f"prompt-store:{self.root.name}", flush_seconds)
        self._listeners = Listeners()
        self._folders = Folders(self.root, self._lock, self._listeners)
        self._counters = Counters()
        self._figures = Figures()
        self._warned: set[str] = set()
        self.bytes_written = 0  # by this process, since it opened the store

    def locked(self, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Exclusive use of every index: this thread among threads, this process among hubs."""
        return self._lock.hold(timeout)

    # --------------------------------------------------------------- identities

    @property
    def known(self) -> dict[str, str]:
        """hub.yaml's entry names and their identity keys (prompt_folders.py)."""
        return self._folders.known

    @known.setter
    def known(self, value: dict[str, str]) -> None:
        """hub.yaml's entries and their identities: leased from now, those no longer named let go."""
        self._folders.known = dict(value)
        self._folders.sync_leases()

    def folder(self, key: str) -> Path:
        return self._folders.folder(key)

    def keys(self) -> list[str]:
        return self._folders.keys()

    def in_use(self, key: str) -> bool:
        """Whether a live hub (this one or another on the folder) uses the identity."""
        return self._folders.in_use(key)

    def adopt(self, identity: Identity, name: str) -> Path:
        """The identity's folder, made (0700) with its description and leased; ``name`` noted as a user."""
        return self._folders.adopt(identity, name)

    def writing(self, key: str, entry_id: str | None = None) -> contextlib.AbstractContextManager[str]:
        """An entry id of ``key`` (new unless given), its folder there and its files owned until the block ends.

        Commit inside the block.
        """
        return self._folders.writing(key, entry_id)

    # ------------------------------------------------------------------ index

    def _read(self, key: str) -> dict[str, Entry]:
        """The identity's valid entries, with uses not yet written; raises ``IndexUnreadable``.

        A malformed index is deleted after one warning (the next sweep takes its
        entries' files); a malformed entry is skipped after one warning and
        left out of the next write. Call with the lock held.
        """
        path = self.folder(key) / INDEX
        parsed = read_index(path)
        if parsed is None:
            self._warn_once(str(path), f"prompt cache index {path} is malformed; dropping that file")
            with contextlib.suppress(OSError):
                path.unlink()
            return {}
        entries, dropped = parsed
        for entry_id in dropped:
            self._warn_once(
                f"{path}:{entry_id}",
                f"prompt cache index {path}: dropping entry {entry_id!r}, a field is missing or malformed",
            )
        for entry_id, entry in entries.items():
            entry.last_use = max(entry.last_use, self._touches.latest(key, entry_id))
        return entries

    def _readable(self, key: str) -> dict[str, Entry] | None:
        """``_read``, or None (after one warning) when the index cannot be read now: then keep everything."""
        try:
            return self._read(key)
        except IndexUnreadable as exc:
            self._warn_once(f"{exc.path}:unreadable", f"{exc}; its caches are kept and skipped for now")
            return None

    def _write(self, key: str, entries: dict[str, Entry]) -> None:
        folder = self.folder(key)
        if not folder.is_dir():
            return
        atomic_write_json(
            folder / INDEX, {"format": FORMAT, "entries": {k: asdict(e) for k, e in entries.items()}}
        )
        self._figures.change(key, sum(e.bytes for e in entries.values()))

    def entries(self, key: str) -> list[Entry]:
        """The identity's entries, least recently used first (none while its index cannot be read)."""
        with self.locked():
            return sorted((self._readable(key) or {}).values(), key=lambda e: e.last_use)

    def paths(self, key: str, entry_id: str) -> tuple[Path, Path]:
        """An entry's tensor file and token file."""
        folder = self.folder(key)
        return folder / f"{entry_id}{PAYLOAD}", folder / f"{entry_id}{TOKENS}"

    def has(self, key: str, entry_id: str) -> bool:
        with self.locked():
            return entry_id in (self._readable(key) or {})

    def read_tokens(self, key: str, entry: Entry) -> list[int] | None:
        """The entry's token ids; None if its file cannot be read now, or (deleted) does not match."""
        _, path = self.paths(key, entry.id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            self._warn_once(str(path), f"prompt cache {path} cannot be read ({exc.strerror or exc}); kept")
            return None
        if len(raw) != 4 * entry.tokens or digest_of(raw) != entry.digest:
            self.discard(key, entry.id, f"prompt cache {path} is missing or does not match its index")
            return None
        return parse_tokens(raw)

    # ------------------------------------------------------------------ writes

    def write_tokens(self, key: str, entry_id: str, tokens: list[int]) -> tuple[int, str]:
        """Write an entry's token file (atomically, inside ``writing``); its size and digest."""
        raw = token_bytes(tokens)
        _, final = self.paths(key, entry_id)
        tmp = temp_path(final)
        tmp.write_bytes(raw)
        publish(tmp, final)
        return len(raw), digest_of(raw)

    def make_room(self, key: str, nbytes: int) -> bool:
        """Evict until ``nbytes`` more fit under the cap; False (nothing evicted) if they never could."""
        if nbytes > self.cap:
            return False
        with self.locked():
            evicted = self._evict(self.cap - nbytes, keep=None)
        self._listeners.forget(evicted)
        return True

    def commit(self, key: str, entry: Entry, *, origin: Listener | None = None) -> bool:
        """List a written entry in its index, then hold the cap. False if the entry itself had to go."""
        with self.locked():
            entries = self._readable(key)
            if entries is None:  # rewriting it would lose every other entry: this one goes instead
                for path in self.paths(key, entry.id):
                    path.unlink(missing_ok=True)
                return False
            entries[entry.id] = entry
            self._write(key, entries)
            self.bytes_written += entry.bytes
            evicted = self._evict(self.cap, keep=(key, entry.id))
            if self._total() > self.cap:  # the new entry alone is over the cap
                evicted += self._drop(key, [entry.id])
        self._listeners.forget(evicted)
        kept = (key, entry.id) not in evicted
        if kept:
            self._listeners.learn(key, entry, origin=origin)
        return kept

    def touch(self, key: str, entry_id: str) -> None:
        """Note a use of the entry (least recently used goes first): in memory, written in the background."""
        self._touches.note(key, entry_id, time.time())
        self._background.poke()

    def flush(self) -> None:
        """Write the uses noted so far now, on the background thread."""
        self._background.poke(urgent=True)

    def remove(self, key: str, ids: list[str], *, origin: Listener | None = None) -> None:
        """Delete entries (upstream evicted or replaced them); the other live caches of the identity forget them."""
        with self.locked():
            gone = self._drop(key, ids)
        self._listeners.forget(gone, origin=origin)

    def discard(self, key: str, entry_id: str, why: str) -> None:
        """An entry that was read and is not usable: one warning, then it is deleted."""
        self._warn_once(f"{key}/{entry_id}", f"{why}; deleting it, the request is served without it")
        self.remove(key, [entry_id])

    def clear(self, names: list[str] | None = None) -> list[str]:
        """Delete every entry of the identities ``names`` use (all when None); the keys cleared.

        A folder some live hub leases keeps its description and lease, and a
        write in progress keeps its files (it lists its entry once done).
        """
        cleared = []
        with self.locked():
            for key in self.keys():
                if names is not None and not set(names) & set(self._names(key)):
                    continue
                cleared.append(key)
                for entry_id in self._readable(key) or {}:
                    for path in self.paths(key, entry_id):
                        path.unlink(missing_ok=True)
                self._wipe(key, keep_folder=self.in_use(key))
        self._listeners.forget([(key, "*") for key in cleared])
        return cleared

    # ------------------------------------------------------------------ eviction

    def _all(self) -> list[tuple[str, Entry]]:
        return [(key, e) for key in self.keys() for e in (self._readable(key) or {}).values()]

    def _total(self) -> int:
        return sum(e.bytes for _, e in self._all())

    def _evict(self, limit: int, keep: tuple[str, str] | None) -> list[tuple[str, str]]:
        """Delete least recently used entries until the total is at most ``limit`` (caller holds the lock).

        Entries of identities no live hub uses go first (all identities count
        as used for a store that knows no hub.yaml); among the rest, the oldest
        use goes first, whichever hub made it. ``keep`` (the entry just
        written) goes last, by ``commit``, and only when alone over.
        """
        everything = self._all()
        total = sum(e.bytes for _, e in everything)
        used = {key for key, _ in everything}
        if self.known:
            used = {key for key in used if self.in_use(key)}
        order = sorted(
            (item for item in everything if (item[0], item[1].id) != keep),
            key=lambda item: (item[0] in used, item[1].last_use),
        )
        evicted: list[tuple[str, str]] = []
        for key, entry in order:
            if total <= limit:
                break
            evicted += self._drop(key, [entry.id])
            total -= entry.bytes
        return evicted

    def _drop(self, key: str, ids: list[str]) -> list[tuple[str, str]]:
        entries = self._readable(key)
        if entries is None:
            return []
        gone = [i for i in ids if i in entries]
        for entry_id in ids:
            for path in self.paths(key, entry_id):
                path.unlink(missing_ok=True)
            entries.pop(entry_id, None)
        if gone:
            self._write(key, entries)
        if not entries and self.known and not self.in_use(key):
            self._wipe(key)  # an identity no live hub uses leaves no folder behind
        return [(key, i) for i in gone]

    def _wipe(self, key: str, *, keep_folder: bool = False) -> None:
        """Delete the folder's files but a live writer's (and, with ``keep_folder``, its description and lease)."""
        folder = self.folder(key)
        delete_unowned(folder, listed=set(), keep={IDENTITY, LEASE} if keep_folder else set())
        if not keep_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()  # not when a write in progress kept its files there
        self._figures.change(key, 0 if keep_folder else None)

    def sweep(self) -> int:
        """Delete files no index lists and no live writer owns (a crashed write's leftovers, foreign files).

        A folder whose index cannot be read now is left alone. Returns the count deleted.
        """
        deleted = 0
        with self.locked():
            for key in self.keys():
                entries = self._readable(key)
                if entries is not None:
                    deleted += delete_unowned(self.folder(key), set(entries), {INDEX, IDENTITY, LEASE})
        return deleted

    # ------------------------------------------------------------- listeners

    def subscribe(self, key: str, listener: Listener) -> None:
        self._listeners.add(key, listener)

    def unsubscribe(self, key: str, listener: Listener) -> None:
        """A cache stops listening (its model unloads): the uses it noted are written now."""
        self._listeners.drop(key, listener)
        if not self._folders.uses(key):
            self._folders.leases.release(self.folder(key))
        self.flush()

    # --------------------------------------------------------------- reading

    def _names(self, key: str) -> list[str]:
        return names_in(read_json(self.folder(key) / IDENTITY, {}))

    def records(self, name: str) -> bool:
        """Whether some identity folder records hub.yaml name ``name`` (a model since removed may)."""
        with self.locked():
            return any(name in self._names(key) for key in self.keys())

    def refresh_usage(self) -> dict[str, int]:
        """Read every index for the bytes on disk by identity (another hub may have changed them)."""
        with self.locked():
            previous = self._figures.by_key or {}
            usage = {}
            for key in self.keys():
                entries = self._readable(key)
                usage[key] = (
                    previous.get(key, 0) if entries is None else sum(e.bytes for e in entries.values())
                )
            self._figures.replace(usage)
        return usage

    def usage(self, max_age: float = 1.0) -> dict[str, int]:
        """Bytes on disk by identity key: this store's own changes at once, other hubs' within ``max_age`` s.

        Once the figures exist this reads nothing on the caller's thread (a
        status build, on the event loop): older figures are refreshed by the
        background thread, and answer until then.
        """
        usage = self._figures.by_key
        if usage is None:
            return self.refresh_usage()
        if self._figures.older_than(max_age):
            self._figures.wanted = True
            self._background.poke(urgent=True)
        return usage

    def total_bytes(self) -> int:
        return sum(self.usage().values())

    def model_bytes(self, name: str) -> int:
        """Bytes on disk for the identity hub.yaml's entry ``name`` has now."""
        key = self.known.get(name)
        return self.usage().get(key, 0) if key else 0

    # ------------------------------------------------------------- background

    def _flush(self, deadline: float | None) -> None:
        """Write the uses noted; with a ``deadline``, give up (and say so) then."""
        pending = self._touches.take()
        if not pending:
            return
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            with self.locked(timeout):
                for key, uses in pending.items():
                    entries = self._readable(key) or {}
                    changed = [i for i, when in uses.items() if i in entries and when > entries[i].last_use]
                    for entry_id in changed:
                        entries[entry_id].last_use = uses[entry_id]
                    if changed:
                        self._write(key, entries)
        except TimeoutError:
            lost = sum(len(uses) for uses in pending.values())
            log.warning(
                "prompt cache store %s: %d use(s) not written, its lock is held elsewhere", self.root, lost
            )

    def _background_work(self, deadline: float | None) -> None:
        self._flush(deadline)
        if deadline is None:  # not closing: figures and leases too
            if self._figures.wanted:
                self._figures.wanted = False
                self.refresh_usage()
            self._folders.sync_leases()

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Write the uses still in memory (waiting at most ``timeout`` s in all), then let go of every lease.

        The store may be used again afterwards; it leases what it uses again.
        """
        self._background.close(time.monotonic() + timeout)
        self._folders.leases.release_all()

    # --------------------------------------------------------------- counters

    def record(self, name: str, *, hit: bool, reused: int) -> None:
        """Count one lookup of model ``name``'s prompt cache."""
        self._counters.record(name, hit=hit, reused=reused)

    def counters(self, name: str) -> ModelCounters:
        return self._counters.of(name)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message)


def open_store(root: str | os.PathLike[str], cap: int) -> PromptStore:
    """The store at ``root`` (created 0700, or refused), a crashed write's leftovers swept, its figures read."""
    store = PromptStore(root, cap)
    store.sweep()
    store.refresh_usage()
    return store
