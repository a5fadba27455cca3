"""What several commands do: start the hub (detached or in the foreground), and act on models.

Each step reports as a person reads it (a spinner while the hub starts, a line
per model) and exits non-zero when something did not happen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path

from rich.text import Text

from mlx_hub.cli import views
from mlx_hub.cli.client import ClientError, HubClient
from mlx_hub.cli.terminal import api_key, err_console, fail, ok, print_status, warn
from mlx_hub.config import HubConfig
from mlx_hub.core.status import HubStatus


def start_foreground(path: Path, cfg: HubConfig, names: tuple[str, ...]) -> None:
    """Supervise the hub from this process: Ctrl-C (or SIGTERM) stops both, a crash restarts the hub."""
    from mlx_hub.core.ports import connect_host
    from mlx_hub.service.supervisor import run

    url = f"http://{connect_host(cfg.host)}:{cfg.port}"

    def ready(restarts: int) -> None:
        with HubClient(url, key=api_key(path)) as client:
            print_status(client.status(), url)
        if restarts:
            warn(f"hub restarted after a crash (restart {restarts}); `status` shows the cause")
        else:
            ok(f"hub running in the foreground; {front_door(cfg, url)} · Ctrl-C stops it")

    code = run(path, cfg, names, console=True, on_ready=ready)
    if code:
        fail(f"the hub stopped (exit code {code}); see {cfg.log_dir / 'hub.log'}", code=code)


def start_detached(path: Path, cfg: HubConfig, names: tuple[str, ...], wait_seconds: float) -> None:
    """Start the supervisor (and so the hub) in the background; print the table once the hub is ready."""
    from mlx_hub.service.runtime import read_runtime
    from mlx_hub.service.supervisor import spawn

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
            if runtime is not None and runtime.supervisor_pid == process.pid and runtime.state == "running":
                client = client or HubClient(runtime.url, key=api_key(path))
                status = _ready_status(client, runtime.pid)
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
    ok(
        f"hub started (pid {runtime.pid}, supervisor {process.pid}); {front_door(cfg, runtime.url)} · log {hub_log}"
    )
    failed = views.failed_models(status)
    if failed:
        fail(f"some models did not start: {', '.join(failed)} (see the warnings above)")


def _ready_status(client: HubClient, pid: int) -> HubStatus | None:
    """The starting hub's status, or None while it does not answer; a refused key ends the wait at once."""
    try:
        return client.status()
    except ClientError as exc:
        if exc.status == 401:  # the hub runs, but this key cannot see it: say so now
            fail(f"{exc.message}; the hub (pid {pid}) is running")
        return None


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
