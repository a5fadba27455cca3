"""Prompt-cache files written behind the generation: one writer thread per live cache, jobs in order.

Writing an entry (its tensors, its tokens, the index, each fsynced) takes
milliseconds to tens of milliseconds, and upstream's batch scheduler called it
between two decode steps of the whole batch: with 16 clients, every finished
request stalled the other 15 (the hub gave a quarter less throughput than the
same batch without the disk tier). The cache hands those writes to a
``WriteBehind`` instead: the scheduler thread queues a job and goes on; the
writer runs jobs one at a time in the order they came, so a delete queued
after a write runs after it, and a reply's end queued after its entry's write
is delivered once that entry is on disk.

A job not yet started can be cancelled (an entry replaced before it was
written is never written); a reader can wait for one job (an entry read right
after its insert); ``close`` waits for all. Payload jobs carry their bytes, and
``submit`` waits while more than ``max_bytes`` are queued, so a slow disk
holds back generation rather than filling memory with caches to write.
Nothing here imports MLX: the jobs are the cache's.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Bytes of queued payloads above which ``submit`` waits for the writer.
MAX_QUEUED_BYTES = 512 << 20


class WriteBehind:
    """Jobs run in submission order on one thread of their own, started with the first job."""

    def __init__(self, name: str, max_bytes: int = MAX_QUEUED_BYTES):
        self.name = name
        self.max_bytes = max_bytes
        self._jobs: OrderedDict[str, tuple[Callable[[], None], int]] = OrderedDict()
        self._running: str | None = None
        self._queued_bytes = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._serial = itertools.count()

    def submit(self, fn: Callable[[], None], job_id: str | None = None, nbytes: int = 0) -> str:
        """Queue ``fn``; its id. Waits first while the queued payloads exceed ``max_bytes``."""
        job_id = job_id or f"job-{next(self._serial)}"
        with self._changed:
            while self._queued_bytes and self._queued_bytes + nbytes > self.max_bytes and not self._closed:
                self._changed.wait()
            self._jobs[job_id] = (fn, nbytes)
            self._queued_bytes += nbytes
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"prompt-cache-writer-{self.name}", daemon=True)  # fmt: skip
                self._thread.start()
            self._changed.notify_all()
        return job_id

    def busy(self) -> bool:
        """Whether some job is queued or running."""
        with self._changed:
            return bool(self._jobs) or self._running is not None

    def cancel(self, job_id: str) -> bool:
        """Drop a job that has not started; False if it is running, done, or unknown."""
        with self._changed:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return False
            self._queued_bytes -= job[1]
            self._changed.notify_all()
            return True

    def wait(self, job_id: str, timeout: float | None = None) -> bool:
        """Wait until job ``job_id`` has run (or was never queued); False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: job_id not in self._jobs and self._running != job_id, timeout
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job queued so far has run; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._jobs and self._running is None, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Run what is queued, then let the thread end; False if that took longer than ``timeout``."""
        done = self.flush(timeout)
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if not done:
            log.warning("prompt cache %s: writes still queued after %s s; they finish in the background", self.name, timeout)  # fmt: skip
        return done

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    self._thread = None  # closed and drained: a later submit starts another
                    return
                job_id, (fn, nbytes) = self._jobs.popitem(last=False)
                self._running = job_id
            try:
                fn()
            except Exception:  # one entry lost is a cold prefill later, never a failed request
                log.exception("prompt cache %s: a background write failed", self.name)
            finally:
                # The job holds its cache's arrays: dropped now, not when the next job comes,
                # or an idle writer would keep the last request's KV alive.
                del fn
                with self._changed:
                    self._running = None
                    self._queued_bytes -= nbytes
                    self._changed.notify_all()
