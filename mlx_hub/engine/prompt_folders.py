"""The prompt store's identity folders: made private, described, and leased while this hub uses them.

This hub uses an identity when its hub.yaml names it (``known``) or a loaded
model's cache listens to it; it then holds the folder's lease (prompt_locks.py),
so no other hub on the same ``prompt_cache_path`` deletes it or evicts its
entries before those of identities nobody uses. A folder that vanished (a
``cache clear`` of an older hub, a person) is made again by the next write,
with its description and lease.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlx_hub.engine.base import Identity
from mlx_hub.engine.prompt_files import IDENTITY, names_in, new_entry_id
from mlx_hub.engine.prompt_listeners import Listeners
from mlx_hub.engine.prompt_locks import Leases, StoreLock, writer_lock
from mlx_hub.fsutil import atomic_write_json, read_json


class Folders:
    """The identity folders under ``root``; the store's lock guards every change."""

    def __init__(self, root: Path, lock: StoreLock, listeners: Listeners):
        self.root, self._lock, self._listeners = root, lock, listeners
        self.known: dict[str, str] = {}  # hub.yaml entry name -> identity key
        self.leases = Leases()
        self._described: dict[str, tuple[dict[str, Any], set[str]]] = {}  # adopted: rewritten if deleted

    def folder(self, key: str) -> Path:
        return self.root / key

    def keys(self) -> list[str]:
        with contextlib.suppress(OSError):
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        return []

    def uses(self, key: str) -> bool:
        """Whether this hub uses the identity: its hub.yaml names it, or a loaded model's cache does."""
        return key in self.known.values() or self._listeners.has(key)

    def in_use(self, key: str) -> bool:
        """Whether any live hub uses the identity (another hub's lease says so for it)."""
        return self.uses(key) or self.leases.in_use(self.folder(key))

    def sync_leases(self) -> None:
        """Lease the used identities that have a folder; let go of the others."""
        with self._lock.hold():
            for folder in self.leases.held():
                if not self.uses(folder.name):
                    self.leases.release(folder)
            for key in set(self.known.values()):
                if self.folder(key).is_dir():
                    self.leases.hold(self.folder(key))

    def _make(self, key: str) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = self.folder(key)
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder

    def adopt(self, identity: Identity, name: str) -> Path:
        """The identity's folder, made (0700) with its description and leased; ``name`` noted as a user."""
        with self._lock.hold():
            folder = self._make(identity.key)
            info = read_json(folder / IDENTITY, {})
            names = sorted(set(names_in(info)) | {name})
            self._described[identity.key] = (identity.description, set(names))
            if not isinstance(info, dict) or info.get("names") != names:
                atomic_write_json(folder / IDENTITY, {"names": names, **identity.description})
            self.leases.hold(folder)
        return folder

    def _ensure(self, key: str) -> Path:
        """The identity's folder, made again (description, lease) if it vanished (caller holds the lock)."""
        folder = self._make(key)
        described = self._described.get(key)
        if described is not None and not (folder / IDENTITY).exists():
            description, names = described
            atomic_write_json(folder / IDENTITY, {"names": sorted(names), **description})
        if self.uses(key):
            self.leases.hold(folder)
        return folder

    @contextlib.contextmanager
    def writing(self, key: str, entry_id: str | None = None) -> Iterator[str]:
        """An entry id of ``key`` (a new one unless given) whose files only this block may have until it ends.

        Its folder is there (made again if it vanished), and its writer lock is
        taken before the store lock is let go, so no sweep or clear ever sees
        its files unowned. Commit inside the block.
        """
        entry_id = entry_id or new_entry_id()
        with contextlib.ExitStack() as stack:
            with self._lock.hold():
                folder = self._ensure(key)
                stack.enter_context(writer_lock(folder, entry_id))
            yield entry_id
