"""The request log: one row per finished request, in SQLite at ``<log_path>/requests.db``.

Why SQLite: it survives restarts, answers "the last 100 requests of this
model" from an index however many rows it holds, and the CLI can read it
with no hub running. The file is in WAL mode, so readers (the controller,
the CLI) never wait for the writer.

Writes never slow a request: the gate hands a finished ``RequestRecord`` to
``RequestLog.write``, which only puts it on a queue; one writer thread
commits whatever has queued up in one transaction and prunes the table to
``request_log_days`` and ``request_log_max_rows``. A database that fails is
logged and the hub goes on serving. The text of a request and its answer is
kept only with ``request_log_bodies: true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import re
import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from mlx_hub.fsutil import private_dir, private_file

log = logging.getLogger("mlx_hub.requests")

DB_NAME = "requests.db"
SCHEMA_VERSION = 1
BODY_LIMIT = 64 * 1024  # characters of a request or answer kept with request_log_bodies
PRUNE_EVERY = 500  # rows written between prunes (and at open)
QUEUE_LIMIT = 10_000  # records waiting for the writer; beyond this they are dropped and counted
PAGE_LIMIT = 1000  # rows one /hub/requests answer holds at most; more come page by page (``before``)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    api TEXT NOT NULL,
    via TEXT NOT NULL,
    status INTEGER NOT NULL,
    error TEXT,
    stream INTEGER NOT NULL,
    prompt_tokens INTEGER,
    cached_tokens INTEGER,
    completion_tokens INTEGER,
    wait_s REAL,
    ttft_s REAL,
    tokens_per_s REAL,
    total_s REAL NOT NULL,
    disconnected INTEGER NOT NULL,
    request_body TEXT,
    response_text TEXT
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE INDEX IF NOT EXISTS requests_model_ts ON requests (model, ts);
"""


@dataclasses.dataclass
class RequestRecord:
    """One finished request, as the log stores it and ``/hub/requests`` serves it.

    Times are seconds. ``ts`` is when it ended (epoch). ``wait_s``: before the
    model could take it (a JIT load, a group place, room under the budget).
    ``ttft_s``: from arrival to the first generated text of a stream (None
    for a whole-body answer). ``tokens_per_s``: completion tokens over the
    time spent generating them (a stream: after its first token).
    """

    ts: float
    model: str
    route: str
    api: str  # openai or anthropic
    via: str  # port (the model's own) or v1 (the controller's /v1)
    status: int
    total_s: float
    error: str | None = None  # the error envelope's code (or type); None when it succeeded
    stream: bool = False
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens upstream's prompt cache reused
    completion_tokens: int | None = None
    wait_s: float | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    disconnected: bool = False  # the client went away before the answer ended
    request_body: str | None = None  # only with request_log_bodies
    response_text: str | None = None
    id: int | None = None

    def public(self) -> dict[str, Any]:
        """The JSON a client sees: every field, bodies only where they were kept."""
        return dataclasses.asdict(self)


_FIELDS = [f.name for f in dataclasses.fields(RequestRecord) if f.name != "id"]
_INSERT = f"INSERT INTO requests ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})"
_COLUMNS = ", ".join(["id", *_FIELDS])


def db_path(log_dir: Path) -> Path:
    return Path(log_dir) / DB_NAME


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode that waits briefly for a lock rather than failing."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
    else:
        # Prompts and answers: owner-only. SQLite gives the -wal and -shm files the same mode.
        private_file(path)
        conn = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last commit, never the file
    return conn


class NewerSchemaError(sqlite3.Error):
    """The file is a newer hub's: left as it is, and not written."""


def _create(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise NewerSchemaError(f"written by a newer hub (schema {version}, this hub knows {SCHEMA_VERSION})")
    conn.executescript(_SCHEMA)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.commit()


def query(
    path: Path,
    *,
    model: str | None = None,
    since: float | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[RequestRecord]:
    """The newest rows first, at most ``limit``; no file yet is no rows. Safe while a hub writes."""
    if not Path(path).exists():
        return []
    where, args = [], []
    if model:
        where.append("model = ?")
        args.append(model)
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if before_id is not None:
        where.append("id < ?")
        args.append(before_id)
    sql = f"SELECT {_COLUMNS} FROM requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(max(0, int(limit)))
    with contextlib.closing(connect(path, readonly=True)) as conn:
        try:
            rows = conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
    return [_record(row) for row in rows]


def _record(row: tuple[Any, ...]) -> RequestRecord:
    values = dict(zip(["id", *_FIELDS], row, strict=True))
    values["stream"] = bool(values["stream"])
    values["disconnected"] = bool(values["disconnected"])
    return RequestRecord(**values)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str | float | None, *, now: float | None = None) -> float | None:
    """``since`` as epoch seconds: a number, a duration back from now (``90s``, ``15m``, ``2h``, ``7d``), or an ISO time.

    Raises ``ValueError`` with the accepted forms for anything else.
    """
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    with contextlib.suppress(ValueError):
        return float(text)
    match = _DURATION.match(text)
    if match:
        return (now if now is not None else time.time()) - float(match.group(1)) * _UNIT[match.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"since={text!r} is not a time: give epoch seconds, a duration such as 15m, 2h or 7d, "
            "or an ISO time such as 2025-01-31T09:00"
        ) from None


class RequestLog:
    """The writer side: ``open`` starts a thread, ``write`` queues, ``flush`` waits, ``close`` drains."""

    def __init__(self, path: Path, *, days: float, max_rows: int, bodies: bool):
        self.path = Path(path)
        self.days = days
        self.max_rows = max_rows
        self.bodies = bodies
        self.dropped = 0  # records lost to a full queue or a failing database
        self._queue: queue.Queue[RequestRecord | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        self._since_prune = 0

    @property
    def enabled(self) -> bool:
        return self.days > 0

    def configure(self, *, days: float, max_rows: int, bodies: bool) -> None:
        """Take a reloaded hub.yaml's limits; the next prune applies them."""
        self.days, self.max_rows, self.bodies = days, max_rows, bodies
        self._since_prune = PRUNE_EVERY

    def open(self) -> None:
        """Create the file (or move aside one SQLite cannot read) and start the writer thread."""
        if not self.enabled or self._thread is not None:
            return
        try:
            private_dir(self.path.parent)
            conn = self._open_connection()
        except (sqlite3.Error, OSError) as exc:
            log.error("request log %s cannot be used (%s); requests are not logged", self.path, exc)
            return
        self._thread = threading.Thread(target=self._run, args=(conn,), name="hub-request-log", daemon=True)
        self._thread.start()

    def _open_connection(self) -> sqlite3.Connection:
        try:
            return self._prepared()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            log.warning(
                "request log %s is unreadable (%s); moved it to %s and started afresh", self.path, exc, aside
            )
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
            return self._prepared()

    def _prepared(self) -> sqlite3.Connection:
        conn = connect(self.path)
        try:
            _create(conn)
            self._prune(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def write(self, record: RequestRecord) -> None:
        """Queue one record for the writer; never blocks, never raises."""
        if self._thread is None:
            return
        if not self.bodies:
            record.request_body = record.response_text = None
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every queued record is committed (read-your-writes for ``/hub/requests``)."""
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Commit what is queued and stop the writer."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout=10)

    def _run(self, conn: sqlite3.Connection) -> None:
        """The writer thread: commit what has queued up, one transaction at a time, until ``close``."""
        try:
            while True:
                batch = self._take()
                records = [r for r in batch if r is not None]
                if records:
                    self._commit(conn, records)
                for _ in batch:
                    self._queue.task_done()
                if len(records) < len(batch):
                    self._prune(conn)  # closing: the file is left within its bounds
                    return
        except sqlite3.Error as exc:
            log.error("request log %s: %s", self.path, exc)
        finally:
            conn.close()

    def _take(self) -> list[RequestRecord | None]:
        """The next record (waiting for it) and whatever else is already queued, up to 1000."""
        batch = [self._queue.get()]
        with contextlib.suppress(queue.Empty):
            while len(batch) < 1000 and batch[-1] is not None:
                batch.append(self._queue.get_nowait())
        return batch

    def _commit(self, conn: sqlite3.Connection, records: list[RequestRecord]) -> None:
        rows = [tuple(_value(getattr(r, name)) for name in _FIELDS) for r in records]
        try:
            with conn:
                conn.executemany(_INSERT, rows)
            self._since_prune += len(rows)
            if self._since_prune >= PRUNE_EVERY:
                self._prune(conn)
        except sqlite3.Error as exc:
            self.dropped += len(rows)
            log.error("request log %s: %d records not written (%s)", self.path, len(rows), exc)

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Drop rows older than ``days`` and the oldest beyond ``max_rows``."""
        self._since_prune = 0
        with conn:
            if self.days > 0:
                conn.execute("DELETE FROM requests WHERE ts < ?", (time.time() - self.days * 86400,))
            conn.execute(
                "DELETE FROM requests WHERE id <= (SELECT id FROM requests ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.max_rows,),
            )


def _value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value
