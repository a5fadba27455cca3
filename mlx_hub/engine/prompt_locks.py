"""The prompt-cache store's ``fcntl`` locks: the store lock, identity leases and writer locks.

Hubs that share one ``prompt_cache_path`` (two configs, a test hub beside the
daily one) see each other only through these, and every one of them dies with
its process, so a crashed hub leaves nothing held:

- **the store lock** (``<root>/.lock``, exclusive): every index change, lease
  check and deletion happens under it, so what one hub reads another has
  written whole;
- **a lease** (``<identity>/.lease``, shared): held open for as long as this
  hub's hub.yaml has the identity or a loaded model uses it. An identity some
  live hub leases is never deleted, and its entries are evicted by age among
  everyone's, not before them. Whether anyone holds one is asked by trying an
  exclusive lock without waiting, under the store lock;
- **a writer lock** (``<identity>/.<entry id>.writing``, exclusive): held from
  before an entry's first file is created until it is listed in the index (or
  its files are gone). Every file of an entry is named ``<id>.<kind>`` or,
  while written, ``.<id>.tmp.<kind>``; a sweep or a clear leaves the files of
  an id whose writer lock is held alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"
LEASE = ".lease"
WRITING = ".writing"
#: An entry's files and its writer lock: ``<id>.<kind>``, ``.<id>.tmp.<kind>``, ``.<id>.writing``.
ENTRY_FILE = re.compile(r"\.?([0-9a-f]{32})\.")
#: How often a bounded wait tries the store lock again.
RETRY_SECONDS = 0.01


def entry_of(name: str) -> str | None:
    """The entry id a file name belongs to, or None for any other file."""
    match = ENTRY_FILE.match(name)
    return match.group(1) if match else None


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file ``fd`` has open (not deleted or replaced since)."""
    try:
        mine, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _flock(fd: int, mode: int, deadline: float | None) -> None:
    if deadline is None:
        fcntl.flock(fd, mode)
        return
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError("the prompt cache store lock is held elsewhere") from None
            time.sleep(RETRY_SECONDS)


def held_elsewhere(path: Path) -> bool:
    """Whether some open file (this process's included) holds a lock on ``path`` now."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases what was taken
    return False


class StoreLock:
    """Exclusive use of every index: this thread among threads, this process among hubs."""

    def __init__(self, root: Path):
        self.root = root
        self._mutex = threading.RLock()
        self._held = threading.local()

    @contextlib.contextmanager
    def hold(self, timeout: float | None = None) -> Iterator[None]:
        """Held until the block ends; ``TimeoutError`` when not had within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._mutex.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("the prompt cache store lock is held by another thread")
        try:
            if getattr(self._held, "depth", 0):  # this thread holds it already: no second flock
                yield
                return
            fd = self._open()
            try:
                _flock(fd, fcntl.LOCK_EX, deadline)
                self._held.depth = 1
                try:
                    yield
                finally:
                    self._held.depth = 0
            finally:
                os.close(fd)  # closing releases the lock
        finally:
            self._mutex.release()

    def _open(self) -> int:
        try:
            return os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the whole folder was deleted: make it again, private
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)


class Leases:
    """This store's leases on identity folders; take and test them under the store lock."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._mutex = threading.Lock()  # the dict only; taking a shared lease never waits

    def hold(self, folder: Path) -> None:
        """Lease ``folder`` (it exists), again if its lease file was deleted or replaced since."""
        path = folder / LEASE
        with self._mutex:
            fd = self._fds.pop(folder, None)
            if fd is not None:
                if _same_file(fd, path):
                    self._fds[folder] = fd
                    return
                os.close(fd)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            # Shared: hubs lease together. An exclusive lock is only ever tried under the store lock,
            # which the caller holds, so this never waits.
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._fds[folder] = fd

    def release(self, folder: Path) -> None:
        with self._mutex:
            fd = self._fds.pop(folder, None)
        if fd is not None:
            os.close(fd)

    def held(self) -> list[Path]:
        with self._mutex:
            return list(self._fds)

    def release_all(self) -> None:
        for folder in self.held():
            self.release(folder)

    def in_use(self, folder: Path) -> bool:
        """Whether a live hub (this one or another) leases ``folder``."""
        with self._mutex:
            fd = self._fds.get(folder)
            mine = fd is not None and _same_file(fd, folder / LEASE)
        return mine or held_elsewhere(folder / LEASE)


@contextlib.contextmanager
def writer_lock(folder: Path, entry_id: str) -> Iterator[None]:
    """Own entry ``entry_id``'s files in ``folder`` until the block ends (its lock file then goes)."""
    path = folder / f".{entry_id}{WRITING}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, path):
            break
        os.close(fd)  # a sweep took the file between the open and the lock: make a new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still ours: nobody deletes a writer lock they could not take
        os.close(fd)


def writer_alive(folder: Path, entry_id: str) -> bool:
    """Whether a live writer owns entry ``entry_id``'s files."""
    return held_elsewhere(folder / f".{entry_id}{WRITING}")


def delete_unowned(folder: Path, listed: set[str], keep: set[str]) -> int:
    """Delete the files of ``folder`` that nobody owns; the count deleted (call under the store lock).

    Owned are the names in ``keep``, the published files of ``listed`` entries,
    and every file of an entry whose writer is alive; a dead writer's lock file
    and temporary files go like any other.
    """
    alive: dict[str, bool] = {}
    deleted = 0
    with contextlib.suppress(OSError):
        for path in list(folder.iterdir()):
            entry_id = entry_of(path.name)
            if path.name in keep or (entry_id in listed and not path.name.startswith(".")):
                continue
            if entry_id is not None:
                if entry_id not in alive:
                    alive[entry_id] = writer_alive(folder, entry_id)
                if alive[entry_id]:
                    continue
            with contextlib.suppress(OSError):
                path.unlink()
                deleted += 1
    return deleted
