"""The prompt store's work off the event loop: batched touches, usage figures, one background thread.

A cache hit is served on the event loop (upstream looks single requests up
there). Noting the use in the index there would take the store's file lock,
read the index and rewrite it with an fsync on every hit, stalling every other
request behind another hub's lock or a slow disk. So a hit only notes the time
in memory (``Touches``); this thread writes the notes in batches, at most
``interval`` seconds late, and at once when a model unloads or the hub stops.
It also re-reads the indexes when a status asks for figures older than their
age limit, so a status build never reads them itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: The longest a touch waits in memory before it is written.
FLUSH_SECONDS = 2.0
#: The longest closing the store waits for the last touches to be written.
CLOSE_SECONDS = 5.0


class Touches:
    """Uses noted in memory: (identity, entry id) -> the latest time, until written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held for a dict operation only: safe on the event loop
        self._pending: dict[tuple[str, str], float] = {}

    def note(self, key: str, entry_id: str, when: float) -> None:
        with self._lock:
            self._pending[(key, entry_id)] = max(when, self._pending.get((key, entry_id), 0.0))

    def latest(self, key: str, entry_id: str) -> float:
        with self._lock:
            return self._pending.get((key, entry_id), 0.0)

    def take(self) -> dict[str, dict[str, float]]:
        """Every pending use, by identity, now no longer pending."""
        with self._lock:
            pending, self._pending = self._pending, {}
        by_key: dict[str, dict[str, float]] = {}
        for (key, entry_id), when in pending.items():
            by_key.setdefault(key, {})[entry_id] = when
        return by_key

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


class Background:
    """One daemon thread that runs ``work`` when poked: after ``interval`` s, or at once when urgent.

    Started on the first poke and again after ``close``; ``work(None)`` may
    wait for locks, ``close`` runs it one last time with a deadline.
    """

    def __init__(self, work: Callable[[float | None], None], name: str, interval: float = FLUSH_SECONDS):
        self._work, self._name, self.interval = work, name, interval
        self._wake = threading.Condition()
        self._due = self._urgent = self._stopping = False
        self._thread: threading.Thread | None = None

    def poke(self, *, urgent: bool = False) -> None:
        with self._wake:
            self._due = True
            self._urgent = self._urgent or urgent
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._due or self._stopping)
                # Gather a batch: later touches ride along with this one.
                self._wake.wait_for(lambda: self._urgent or self._stopping, timeout=self.interval)
                if self._stopping:
                    return
                self._due = self._urgent = False
            try:
                self._work(None)
            except Exception:  # the next poke tries again; nothing here may end the thread
                log.exception("prompt cache store: background write failed")

    def close(self, deadline: float) -> None:
        """Stop the thread (waiting for it until ``deadline``, a ``time.monotonic()``), then work once more."""
        with self._wake:
            self._stopping = True
            thread, self._thread = self._thread, None
            self._wake.notify()
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.0))
        self._work(deadline)


class Figures:
    """Bytes on disk by identity: read whole now and then, changed in place by this store's own writes."""

    def __init__(self) -> None:
        self.by_key: dict[str, int] | None = None  # None: never read
        self.read_at = 0.0
        self.wanted = False  # a reader found them too old: the background thread reads them again

    def change(self, key: str, total: int | None) -> None:
        """This store changed an identity's entries (None: its folder went); nothing is read."""
        if self.by_key is not None:
            by_key = {
                k: v for k, v in self.by_key.items() if k != key
            }  # a new dict: readers hold the old one
            self.by_key = by_key if total is None else {**by_key, key: total}

    def replace(self, by_key: dict[str, int]) -> None:
        self.by_key, self.read_at = by_key, time.monotonic()

    def older_than(self, max_age: float) -> bool:
        return time.monotonic() - self.read_at > max_age
