"""What several commands do: start the hub (detached or in the foreground), and act on models.

Each step reports as a person reads it (a spinner while the hub starts, a line
per model) and exits non-zero when something did not happen.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.text import Text

from mlx_hub.cli import views
from mlx_hub.cli.client import ClientError, HubClient
from mlx_hub.cli.terminal import err_console, fail, ok, print_status, warn
from mlx_hub.config import HubConfig


def start_foreground(path: Path, cfg: HubConfig, names: tuple[str, ...]) -> None:
    from mlx_hub.core import logs
    from mlx_hub.core.ports import connect_host
    from mlx_hub.service.daemon import DaemonError, serve

    logs.setup(cfg, console=True)
    url = f"http://{connect_host(cfg.host)}:{cfg.port}"

    def ready(hub: Any) -> None:
        print_status(hub.status_document(), url)
        ok(f"hub running in the foreground; {front_door(cfg, url)} · Ctrl-C stops it")

    try:
        asyncio.run(serve(cfg, config_path=path, names=names or None, on_ready=ready))
    except DaemonError as exc:
        fail(str(exc))


def start_detached(path: Path, cfg: HubConfig, names: tuple[str, ...], wait_seconds: float) -> None:
    from mlx_hub.service.daemon import spawn
    from mlx_hub.service.runtime import read_runtime

    process = spawn(path, cfg, names)
    hub_log = cfg.log_dir / "hub.log"
    deadline = time.monotonic() + wait_seconds
    client: HubClient | None = None
    with err_console.status("starting the hub…") as spinner:
        while True:
            code = process.poll()
            if code is not None:
                last = tail(hub_log, 15)
                fail(f"the hub exited while starting (exit code {code}); last lines of {hub_log}:\n{last}")
            runtime = read_runtime(cfg.log_dir)
            if runtime is not None and runtime.pid == process.pid:
                client = client or HubClient(runtime.url)
                try:
                    status = client.status()
                except ClientError:
                    status = None
                if status is not None:
                    if status.ready:
                        break
                    busy = views.loading_models(status)
                    spinner.update(
                        f"starting the hub… loading {', '.join(busy)}" if busy else "starting the hub…"
                    )
            if time.monotonic() > deadline:
                fail(
                    f"the hub (pid {process.pid}) did not finish starting in {wait_seconds:g} s; see {hub_log}"
                )
            time.sleep(0.2)
    assert client is not None and runtime is not None
    print_status(status, runtime.url)
    ok(f"hub started (pid {process.pid}); {front_door(cfg, runtime.url)} · log {hub_log}")
    failed = views.failed_models(status)
    if failed:
        fail(f"some models did not start: {', '.join(failed)} (see the warnings above)")


def front_door(cfg: HubConfig, url: str) -> str:
    """Where to go next: the dashboard, or only the API where hub.yaml turns the page off."""
    if cfg.enable_status_page:
        return f"dashboard {url}/hub/"
    return f"controller {url} (dashboard off: enable_status_page is false)"


def report_failures(failed: dict[str, str]) -> None:
    """Name each model that did not start and why, then exit 1."""
    for name, why in failed.items():
        err_console.print(Text("✗ ", style="red") + Text(f"{name} did not start: {why}"))
    fail(f"{len(failed)} model(s) did not start: {', '.join(failed)}")


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_all(client: HubClient) -> None:
    result = client.service("stop")
    stopped = result.get("models") or []
    ok(f"stopped {', '.join(stopped)}" if stopped else "no model was running")


def run_actions(client: HubClient, names: Iterable[str], action: str) -> None:
    failures = 0
    for name in names:
        try:
            result = client.model(name, action)
        except ClientError as exc:
            failures += 1
            err_console.print(Text("✗ ", style="red") + Text(f"{name}: {exc.message}"))
            continue
        word = result["status"]
        (ok if word in ("started", "stopped", "loaded", "unloaded") else warn)(
            f"{name}: {word.replace('_', ' ')}"
        )
    if failures:
        sys.exit(1)
