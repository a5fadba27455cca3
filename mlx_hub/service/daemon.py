"""Running the hub as a long-lived process: signals, detaching, clean shutdown.

The CLI finds a running hub through the runtime files (``runtime.py``),
written once the controller port answers and removed on a clean exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mlx_hub.config import ConfigError, HubConfig, find_config, load_config
from mlx_hub.core import logs
from mlx_hub.core.ports import PortError, connect_host
from mlx_hub.engine.handlers import option_choices
from mlx_hub.engine.patches.transformers_imports import transformers_without_torch
from mlx_hub.service import faults
from mlx_hub.service.api import Hub
from mlx_hub.service.runtime import Runtime, clear_runtime, write_runtime
from mlx_hub.service.supervised import Supervised
from mlx_hub.service.supervision import EXIT_CONFIG
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
    supervised: Supervised | None = None,
) -> None:
    """Run the controller and the hub until SIGINT, SIGTERM or ``POST /hub/shutdown``.

    Shutdown order: the controller stops taking commands, each model stops
    taking requests and lets running ones finish (bounded), weights are
    freed, ports close, and the runtime file goes. ``supervised``: the
    supervisor that started this process (sockets, reports, a restart's restore).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # The answer to POST /hub/shutdown is sent before the hub stops.
    hub = await _open(config, config_path, lambda: loop.call_later(0.1, stop.set), supervised)
    pid = os.getpid()
    _write_runtime(config, config_path, supervised)
    log.info(
        "hub %s (pid %d) controller on http://%s:%d", __version__, pid, connect_host(config.host), config.port
    )
    try:
        starting = asyncio.create_task(_start(hub, names, supervised))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and not starting.cancelled():
            if (error := starting.exception()) is not None:
                # Not a crash to retry: the same start would fail the same way. Without this the
                # hub sat there never ready, and the CLI waited out its whole timeout in silence.
                log.error("the hub could not start", exc_info=error)
                raise DaemonError(f"the hub could not start: {type(error).__name__}: {error}")
            if on_ready:
                on_ready(hub)
        await stopping
    finally:
        log.info("shutting down")
        if supervised is not None and stop.is_set():
            # Asked to stop (shutdown, a signal): said before the shutdown begins, so that however this
            # process ends from here (the shutdown raises, hangs, is killed) it is not a crash.
            supervised.stopping(hub.config.drain_timeout)
        if not starting.done():
            starting.cancel()
        await hub.shutdown()  # the controller first, then every model
        clear_runtime(config.log_dir, pid)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("hub stopped")


async def _open(
    config: HubConfig,
    config_path: Path | None,
    request_shutdown: Callable[[], None],
    supervised: Supervised | None,
) -> Hub:
    """The daemon's hub, with its controller listening (a taken port is a DaemonError naming the fix)."""
    hub = Hub(
        config,
        config_path=config_path,
        model_logs=True,
        freeze_gc=True,
        request_shutdown=request_shutdown,
    )
    if faults.enabled():
        faults.install(hub)
    if supervised is not None:
        supervised.attach(hub)
    try:
        await hub.open_controller()
    except PortError as exc:
        raise DaemonError(
            f"the controller cannot listen: {exc}; change `port` in {config_path or 'hub.yaml'}"
        ) from None
    return hub


def _write_runtime(config: HubConfig, config_path: Path | None, supervised: Supervised | None) -> None:
    """hub_runtime.json and hub.pid: how the CLI finds this hub (and its supervisor)."""
    runtime = Runtime(
        pid=os.getpid(),
        host=config.host,
        port=config.port,
        config_path=str(config_path or ""),
        started_at=time.time(),
        **(supervised.runtime_fields() if supervised is not None else {}),
    )
    write_runtime(config.log_dir, runtime)


async def _start(hub: Hub, names: Sequence[str] | None, supervised: Supervised | None) -> None:
    """Start the models; under a supervisor, then restore what a crash took and say we are ready."""
    await hub.start(names, before_ready=supervised.after_start if supervised is not None else None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the hub process (the supervisor runs it: ``service.supervisor``)."""
    parser = argparse.ArgumentParser(prog="python -m mlx_hub.service.daemon")
    parser.add_argument("--config")
    parser.add_argument("--console", action="store_true", help="log to the terminal (a foreground run)")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    supervised = Supervised.from_env()
    try:
        path = find_config(args.config)
        config = load_config(path, choices=option_choices())
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_CONFIG if supervised is not None else 2  # a supervisor does not retry it
    logs.setup(config, console=args.console, detached=not args.console)
    transformers_without_torch(m.model_type for m in config.models)  # before anything imports transformers
    names = supervised.names(config) if supervised is not None else (args.names or None)
    try:
        asyncio.run(serve(config, config_path=path, names=names, supervised=supervised))
    except DaemonError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG if supervised is not None else 1
    _exit_now(0)
    return 0


def _exit_now(code: int) -> None:
    """End the process once the hub has stopped, skipping the interpreter's teardown.

    Every model is freed and every file written by now. What teardown would add
    is C++ static destructors of the MLX and tokenizer libraries, whose worker
    threads can still be joinable then: "terminate called without an active
    exception" aborts the process (exit 134) after a clean shutdown, which a
    supervisor would read as a crash.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
