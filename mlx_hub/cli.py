"""``mlx-openai-server-hub <command>``: the reference hub's commands, plus ``models``.

Commands other than ``start --foreground`` and ``models`` talk to the running
daemon over its controller port, found through ``hub_runtime.json`` in the
config's ``log_path``. Exit codes: 0 done, 1 failed, 2 bad config or usage.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import __version__, registry_commands, views
from .client import ClientError, HubClient, find_running
from .config import HubConfig
from .terminal import (
    config_option,
    connect_hub,
    console,
    err_console,
    fail,
    load,
    log_dir,
    ok,
    print_status,
    warn,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="mlx-openai-server-hub")
@config_option
def main(config: str | None) -> None:
    """Serve many MLX models from one process, each on its own OpenAI-compatible port.

    Start with `mlx-openai-server-hub start`, then open http://127.0.0.1:8000/hub/
    or check `mlx-openai-server-hub status`.
    """


# ----------------------------------------------------------------------------- daemon


@main.command()
@config_option
@click.option("--foreground", is_flag=True, help="Run in this process until Ctrl-C (for launchd/systemd).")
@click.option(
    "--wait",
    "wait_seconds",
    default=900.0,
    show_default=True,
    help="Seconds to wait for the models to start.",
)
@click.argument("names", nargs=-1)
def start(config: str | None, foreground: bool, wait_seconds: float, names: tuple[str, ...]) -> None:
    """Start the hub in the background with its `default: true` models.

    With NAMES, start those models instead of the default ones. While a hub
    already runs for this config, start NAMES there and print its status.
    """
    path, cfg = load(config)
    unknown = [n for n in names if n not in {m.name for m in cfg.models}]
    if unknown:
        fail(f"no model named {', '.join(unknown)} in {path}", code=2)
    try:
        found = find_running(cfg.log_dir)
    except ClientError as exc:
        fail(exc.message)
    if found is not None:
        runtime, client = found
        warn(f"the hub is already running (pid {runtime.pid}) at {runtime.url}")
        _run_actions(client, names, "start")
        print_status(client.status(), runtime.url)
        return
    if foreground:
        _start_foreground(path, cfg, names)
        return
    _start_detached(path, cfg, names, wait_seconds)


def _start_foreground(path: Path, cfg: HubConfig, names: tuple[str, ...]) -> None:
    from . import logs
    from .daemon import DaemonError, serve
    from .ports import connect_host

    logs.setup(cfg, console=True)
    url = f"http://{connect_host(cfg.host)}:{cfg.port}"

    def ready(hub: Any) -> None:
        print_status(hub.status_document(), url)
        ok(f"hub running in the foreground; dashboard {url}/hub/ · Ctrl-C stops it")

    try:
        asyncio.run(serve(cfg, config_path=path, names=names or None, on_ready=ready))
    except DaemonError as exc:
        fail(str(exc))


def _start_detached(path: Path, cfg: HubConfig, names: tuple[str, ...], wait_seconds: float) -> None:
    from .daemon import spawn
    from .runtime import read_runtime

    process = spawn(path, cfg, names)
    hub_log = cfg.log_dir / "hub.log"
    deadline = time.monotonic() + wait_seconds
    client: HubClient | None = None
    with err_console.status("starting the hub…") as spinner:
        while True:
            code = process.poll()
            if code is not None:
                tail = _tail(hub_log, 15)
                fail(f"the hub exited while starting (exit code {code}); last lines of {hub_log}:\n{tail}")
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
    ok(f"hub started (pid {process.pid}); dashboard {runtime.url}/hub/ · log {hub_log}")
    failed = views.failed_models(status)
    if failed:
        fail(f"some models did not start: {', '.join(failed)} (see the warnings above)")


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@main.command()
@config_option
def shutdown(config: str | None) -> None:
    """Stop every model and the hub itself."""
    from .runtime import pid_alive

    folder = log_dir(config)
    try:
        found = find_running(folder)
    except ClientError as exc:
        fail(exc.message)
    if found is None:
        warn("no hub is running for this config; nothing to shut down")
        return
    runtime, client = found
    client.shutdown()
    deadline = time.monotonic() + 120
    with err_console.status(f"stopping the hub (pid {runtime.pid})…"):
        while pid_alive(runtime.pid):
            if time.monotonic() > deadline:
                fail(f"the hub (pid {runtime.pid}) is still running after 120 s; see {folder / 'hub.log'}")
            time.sleep(0.2)
    ok(f"hub stopped (pid {runtime.pid})")


@main.command()
@config_option
def reload(config: str | None) -> None:
    """Re-read hub.yaml: start new models, stop removed ones, restart changed ones."""
    _, client = connect_hub(config, quiet_config_errors=True)  # the hub's answer names them
    try:
        result = client.reload()
    except ClientError as exc:
        fail(exc.message)
    for key, verb in (("started", "started"), ("stopped", "stopped"), ("unchanged", "unchanged")):
        names = result.get(key) or []
        if names:
            (ok if key != "unchanged" else console.print)(f"{verb}: {', '.join(names)}")
    ok("reloaded")


@main.command()
@config_option
@click.argument("names", nargs=-1)
def status(config: str | None, names: tuple[str, ...]) -> None:
    """Show the hub and each model (or NAMES): states, port, group, memory, idle timer."""
    url, client = connect_hub(config)
    print_status(client.status(), url, names)


@main.command()
@config_option
def stop(config: str | None) -> None:
    """Stop every model but keep the hub running (start them again with `start-model`)."""
    _, client = connect_hub(config)
    result = client.service("stop")
    stopped = result.get("models") or []
    ok(f"stopped {', '.join(stopped)}" if stopped else "no model was running")


def _run_actions(client: HubClient, names: Iterable[str], action: str) -> None:
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


def _action_command(action: str, help_text: str) -> Callable[..., None]:
    @config_option
    @click.argument("names", nargs=-1, required=True)
    def command(config: str | None, names: tuple[str, ...]) -> None:
        _, client = connect_hub(config)
        _run_actions(client, names, action)

    command.__doc__ = help_text
    return command


main.command("start-model")(
    _action_command("start", "Open the port of each model NAME (loading it unless JIT).")
)
main.command("stop-model")(_action_command("stop", "Unload each model NAME and close its port."))
main.command("load-model")(
    _action_command("load", "Load the weights of each model NAME (its port must run).")
)
main.command("unload-model")(
    _action_command("unload", "Free the weights of each model NAME; its port stays open.")
)


@main.command()
@config_option
@click.option("--interval", default=5.0, show_default=True, help="Seconds between refreshes (at least 0.5).")
def watch(config: str | None, interval: float) -> None:
    """Redraw the model table every --interval seconds until Ctrl-C."""
    if interval < 0.5:
        fail("--interval must be at least 0.5 seconds", code=2)
    url, client = connect_hub(config)

    def frame() -> Group:
        try:
            status = client.status()
        except ClientError as exc:
            return Group(Text(f"{time.strftime('%H:%M:%S')} · {exc.message}", style="red"))
        header = Text(f"{time.strftime('%H:%M:%S')} · every {interval:g}s · Ctrl-C to quit\n", style="dim")
        return Group(header, views.summary(status, url), views.watch_table(status, time.time()))

    try:
        with Live(frame(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------------------- offline


@main.command()
@config_option
def models(config: str | None) -> None:
    """List the models hub.yaml configures (no running hub needed)."""
    path, cfg = load(config)
    table = Table(title=str(path), title_justify="left", box=None, header_style="bold")
    for column in ("NAME", "TYPE", "PORT", "JIT", "AUTO-UNLOAD", "GROUP", "DEFAULT", "MODEL"):
        table.add_column(column)
    for m in cfg.models:
        table.add_row(
            m.name,
            m.model_type,
            str(m.port) if m.port else "auto",  # a number or auto:<range>
            "yes" if m.jit_enabled else "no",
            f"{m.auto_unload_minutes:g} min" if m.auto_unload_minutes else "-",
            m.group or "-",
            "yes" if m.default else "no",
            m.model_path,
        )
    console.print(table)
    for group in cfg.groups:
        members = [m.name for m in cfg.models if m.group == group.name]
        limit = f"max_loaded {group.max_loaded}" if group.max_loaded else "no cap"
        console.print(f"group {group.name}: {limit}; members {', '.join(members) or 'none'}")


# ----------------------------------------------------------------------------- registry


for command in (
    registry_commands.scan,
    registry_commands.ensure,
    registry_commands.offload,
    registry_commands.export,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
