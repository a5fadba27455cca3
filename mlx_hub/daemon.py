"""Running the hub as a long-lived process: logging, signals, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .config import HubConfig
from .hub import Hub

log = logging.getLogger("mlx_hub")


def setup_logging(level: str = "INFO") -> None:
    """One level for the hub's logging and for upstream's loguru output.

    Upstream logs every token batch at DEBUG through loguru's default sink;
    left alone, that drowns the hub's own messages.
    """
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        from loguru import logger
    except ImportError:
        return
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), format="{time:HH:mm:ss} {level: <7} upstream: {message}")


async def serve(
    config: HubConfig,
    *,
    config_path: Path | None = None,
    on_ready: Callable[[Hub], None] | None = None,
) -> None:
    """Start the hub and run until SIGINT or SIGTERM, then shut down cleanly.

    The hub owns these signals (embedded uvicorn servers do not install their
    own), so one Ctrl-C lets in-flight requests finish, frees every model's
    memory and closes every port.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hub = Hub(config, config_path=config_path)
    try:
        await hub.start()
        if on_ready is not None:
            on_ready(hub)
        await stop.wait()
        log.info("shutting down")
    finally:
        await hub.shutdown()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
