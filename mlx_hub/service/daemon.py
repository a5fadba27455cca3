"""Running the hub as a long-lived process: signals, detaching, clean shutdown.

The CLI finds a running hub through the runtime files (``runtime.py``),
written once the controller port answers and removed on a clean exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mlx_hub.config import ConfigError, HubConfig, find_config, load_config
from mlx_hub.core import logs
from mlx_hub.core.ports import PortError, connect_host
from mlx_hub.engine.handlers import option_choices
from mlx_hub.service.api import Hub
from mlx_hub.service.runtime import Runtime, clear_runtime, write_runtime
from mlx_hub.version import __version__

log = logging.getLogger("mlx_hub.daemon")


class DaemonError(RuntimeError):
    """The hub cannot run; the message says what to do."""


# --------------------------------------------------------------------------- serving


async def serve(
    config: HubConfig,
    *,
    config_path: Path | None = None,
    names: Sequence[str] | None = None,
    on_ready: Callable[[Hub], None] | None = None,
) -> None:
    """Run the controller and the hub until SIGINT, SIGTERM or ``POST /hub/shutdown``.

    Shutdown order: the controller stops taking commands, each model stops
    taking requests and lets running ones finish (bounded), weights are
    freed, ports close, and the runtime file goes.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hub = Hub(
        config,
        config_path=config_path,
        model_logs=True,
        freeze_gc=True,
        # The answer to POST /hub/shutdown is sent before the hub stops.
        request_shutdown=lambda: loop.call_later(0.1, stop.set),
    )
    try:
        await hub.open_controller()
    except PortError as exc:
        raise DaemonError(
            f"the controller cannot listen: {exc}; change `port` in {config_path or 'hub.yaml'}"
        ) from None
    pid = os.getpid()
    write_runtime(
        config.log_dir,
        Runtime(
            pid=pid,
            host=config.host,
            port=config.port,
            config_path=str(config_path or ""),
            started_at=time.time(),
        ),
    )
    log.info(
        "hub %s (pid %d) controller on http://%s:%d", __version__, pid, connect_host(config.host), config.port
    )
    try:
        starting = asyncio.create_task(hub.start(names))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and not starting.cancelled() and starting.exception() is None and on_ready:
            on_ready(hub)
        await stopping
    finally:
        log.info("shutting down")
        if not starting.done():
            starting.cancel()
        await hub.shutdown()  # the controller first, then every model
        clear_runtime(config.log_dir, pid)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("hub stopped")


def spawn(config_path: Path, config: HubConfig, names: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start ``python -m mlx_hub.service.daemon`` detached: its own session, output to hub.log."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    with open(config.log_dir / logs.HUB_LOG, "ab") as hub_log:
        return subprocess.Popen(
            [sys.executable, "-m", "mlx_hub.service.daemon", "--config", str(config_path), *names],
            stdin=subprocess.DEVNULL,
            stdout=hub_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the detached daemon process (``spawn`` runs it)."""
    parser = argparse.ArgumentParser(prog="python -m mlx_hub.service.daemon")
    parser.add_argument("--config")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    try:
        path = find_config(args.config)
        config = load_config(path, choices=option_choices())
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    logs.setup(config, console=False, detached=True)
    try:
        asyncio.run(serve(config, config_path=path, names=args.names or None))
    except DaemonError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
