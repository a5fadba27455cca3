"""Where log lines go: the hub's log, and one file per model for upstream's output.

All models share one process, so upstream's loguru messages carry no model
name of their own. The hub marks each request and each load with the model it
serves (a context variable, which asyncio tasks and ``to_thread`` inherit), and
a loguru patcher copies that mark onto every record; per-model sinks filter on
it. Threads that upstream starts for a model inherit its mark when they start.
Records without a mark (the hub's own work) go to the hub log.
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import sys
import threading
from pathlib import Path
from typing import Any

from mlx_hub.config import HubConfig, ModelConfig
from mlx_hub.fsutil import private_dir, private_opener

HUB_LOG = "hub.log"
MAX_BYTES = 20 * 1024 * 1024
BACKUPS = 5
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

current_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("hub_model", default=None)

_model_sinks: dict[str, int] = {}


class PrivateFile(logging.FileHandler):
    """A log file (and, rotated, each new one) only its owner may read: logs can hold prompts."""

    def _open(self) -> Any:
        return open(  # noqa: SIM115 (logging keeps the stream open)
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=private_opener
        )


class PrivateWatchedFile(PrivateFile, logging.handlers.WatchedFileHandler):
    """The supervisor's view of hub.log: reopened after the hub rotates it, owner-only like the rest."""


class _RotatingWithStdio(PrivateFile, logging.handlers.RotatingFileHandler):
    """Rotates hub.log and, in the detached daemon, keeps stdout/stderr pointing at it.

    The daemon's stdout and stderr are hub.log (so a crash before logging is
    set up still lands there); after a rotation they would keep writing into
    the renamed file, so they are re-pointed at the new one.
    """

    def __init__(self, path: Path, *, redirect_stdio: bool):
        super().__init__(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
        self.redirect_stdio = redirect_stdio

    def doRollover(self) -> None:  # noqa: N802 (logging's name)
        super().doRollover()
        if self.redirect_stdio and self.stream is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self.stream.fileno(), 1)
            os.dup2(self.stream.fileno(), 2)


def setup(config: HubConfig, *, console: bool, detached: bool = False) -> Path:
    """Configure the hub's logging; returns the hub log's path.

    ``console``: also print to stderr (foreground runs). ``detached``: stdout
    and stderr already are hub.log, so no console handler and stdio follows
    rotation.
    """
    level = getattr(logging, config.log_level, logging.INFO)
    path = private_dir(config.log_dir) / HUB_LOG
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    file_handler = _RotatingWithStdio(path, redirect_stdio=detached)
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)
    if console and not detached:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(stream)
    root.setLevel(level)
    logging.getLogger("uvicorn.error").setLevel(max(level, logging.WARNING))
    _setup_loguru(config.log_level)
    return path


def _patch(record: dict[str, Any]) -> None:
    model = current_model.get() or getattr(threading.current_thread(), "_hub_model", None)
    record["extra"].setdefault("hub_model", model)


def _tag_threads() -> None:
    """Threads take the model mark of the code that starts them.

    Context variables do not cross into new threads, so without this the
    lines of upstream's inference and batching threads would lose their
    model. Executor threads are shared across models and skipped: work sent
    to them through ``asyncio.to_thread`` carries its context anyway.
    """
    if getattr(threading.Thread.start, "_hub_tagging", False):
        return
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if not self.name.startswith(("asyncio_", "ThreadPoolExecutor")):
            self._hub_model = current_model.get()  # type: ignore[attr-defined]
        original(self)

    start._hub_tagging = True  # type: ignore[attr-defined]
    threading.Thread.start = start  # type: ignore[method-assign]


def _to_hub_log(message: Any) -> None:
    record = message.record
    if record["extra"].get("hub_model") in _model_sinks:
        return  # that model's own file has it
    logging.getLogger("upstream").log(record["level"].no, "%s", record["message"].rstrip())


def _setup_loguru(level: str) -> None:
    try:
        from loguru import logger
    except ImportError:
        return
    logger.remove()
    _model_sinks.clear()
    _tag_threads()
    logger.configure(patcher=_patch)
    logger.add(_to_hub_log, level=level, format="{message}")


def model_log_path(entry: ModelConfig, config: HubConfig) -> Path | None:
    if entry.no_log_file:
        return None
    return Path(entry.log_file) if entry.log_file else config.log_dir / f"{entry.name}.log"


def attach_model(entry: ModelConfig, config: HubConfig) -> Path | None:
    """Open the model's own log file (rotated); upstream's lines for it go there."""
    detach_model(entry.name)
    path = model_log_path(entry, config)
    if path is None:
        return None
    try:
        from loguru import logger
    except ImportError:
        return None
    private_dir(path.parent)
    name = entry.name
    _model_sinks[name] = logger.add(
        str(path),
        opener=private_opener,  # handed to open(): the file and each rotated one are owner-only
        level=entry.log_level or config.log_level,
        rotation=MAX_BYTES,
        retention=BACKUPS,
        enqueue=False,
        format="{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}",
        filter=lambda record: record["extra"].get("hub_model") == name,
    )
    return path


def detach_model(name: str) -> None:
    sink = _model_sinks.pop(name, None)
    if sink is None:
        return
    from loguru import logger

    try:
        logger.remove(sink)
    except ValueError:
        pass


def model_line(name: str, message: str, level: str = "INFO") -> None:
    """One line in model ``name``'s own log (its file when it has one, else the hub's log).

    For what the hub itself says about a model's requests: upstream's lines
    land there by their context, this one is addressed by name.
    """
    if name not in _model_sinks:
        logging.getLogger("mlx_hub.requests").log(
            getattr(logging, level, logging.INFO), "%s: %s", name, message
        )
        return
    from loguru import logger

    logger.bind(hub_model=name).log(level, message)
